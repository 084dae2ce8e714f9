"""Reverse variances on digits (issue 18): the bound and few-step DDPM with small, large, learned and analytic.

    python bench/bench_variance.py                          # trains two models once (cached), then measures
    python bench/bench_variance.py --cache runs/bench-variance --steps 1500 --nll-n 32 --fd-n 200

Two models with the same recipe and budget (the digits preset, ``--steps`` steps, one CPU thread): ``fixed``
(L_simple, DDPM) and ``learned`` (``--learn-sigma``: L_hybrid, Improved DDPM). On ``fixed`` the bound and the
samples are measured with the small (beta_tilde) and large (beta) variances and with the analytic variance of
Analytic-DPM, whose Gamma_t is estimated once on ``--gamma-n`` training images (``ddpmkit eval variance``); on
``learned`` with its own learned variance. The bound is in bits/dim on ``--nll-n`` digits (the same images and
noise for every row); the sample quality is the Frechet distance of the digits classifier's features
(``ddpmkit.metrics.digits``) for ``--fd-n`` DDPM samples at S = 10, 25, 50, 100 respaced steps, from the same
initial noise (sample i from stream (seed, i)).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ddpmkit.images import to_uint8  # noqa: E402
from ddpmkit.metrics.digits import DigitsClassifier  # noqa: E402
from ddpmkit.metrics.nll import evaluate_nll  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.samplers import PerSampleNoise, sample  # noqa: E402
from ddpmkit.store import latest_checkpoint  # noqa: E402

STEPS = (10, 25, 50, 100)


def train(out: Path, steps: int, learn_sigma: bool) -> Path:
    from ddpmkit.train import Trainer, config_from_preset

    try:
        if latest_checkpoint(out)[0] is not None and Run.open(out).checkpoint(parts=("train",)).step >= steps:
            print(f"reusing {out}", flush=True)
            return out
    except Exception:  # noqa: BLE001 - no usable run there: train it
        pass
    cfg = config_from_preset("digits", steps=steps, learn_sigma=learn_sigma, sample_every=10 ** 9, num_samples=0,
                             checkpoint_every=10 ** 9)
    res = Trainer(cfg, out, quiet=True).run()
    print(f"trained {out.name}: {res['step']} steps in {res['seconds']:.0f} s, last loss {res['loss']:.4f}",
          flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="runs/bench-variance", help="where the two runs are trained and kept")
    ap.add_argument("--steps", type=int, default=1500, help="training steps of each model")
    ap.add_argument("--gamma-n", type=int, default=64, help="images of the Gamma_t estimate")
    ap.add_argument("--nll-n", type=int, default=32, help="images of the bound")
    ap.add_argument("--fd-n", type=int, default=200, help="samples per Frechet distance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-fd", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    fixed = train(cache / "fixed", args.steps, learn_sigma=False)
    learned = train(cache / "learned", args.steps, learn_sigma=True)

    run = Run.open(fixed)
    if run.gamma() is None or run.diffusion_config["analytic"].get("n") != args.gamma_n:
        t0 = time.perf_counter()
        gamma, note = run.estimate_gamma(n=args.gamma_n, seed=args.seed)
        run.save_gamma(gamma, note)
        print(f"Gamma_t on {note['n']} images in {time.perf_counter() - t0:.0f} s (min {float(gamma.min()):.3f}, "
              f"max {float(gamma.max()):.3f})", flush=True)
    rows = [("fixed", fixed, "small"), ("fixed", fixed, "large"), ("fixed", fixed, "analytic"),
            ("learned", learned, "learned"), ("learned", learned, "small")]
    results = {"args": vars(args), "nll": {}, "fd": {}}
    print("\n| model | variance | bound (bits/dim) | +- | prior | decoder | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, path, var in rows:
        r = evaluate_nll(path, n=args.nll_n, batch_size=16, variance=var, seed=args.seed)
        results["nll"][f"{name}/{var}"] = {k: r[k] for k in ("bpd", "bpd_stderr", "prior_bpd", "decoder_bpd", "n")}
        print(f"| {name} | {var} | {r['bpd']:.4f} | {r['bpd_stderr']:.4f} | {r['prior_bpd']:.4f} | "
              f"{r['decoder_bpd']:.4f} | {r['seconds']:.0f} |", flush=True)
    if not args.skip_fd:
        clf = DigitsClassifier.load_or_train()
        print("\n| model | variance | " + " | ".join(f"S={s}" for s in STEPS) + " |")
        print("| --- | --- |" + " --- |" * len(STEPS))
        for name, path, var in rows:
            den = Run.open(path).denoiser(variance=var)
            fds = []
            for S in STEPS:
                x = sample(den, (args.fd_n, *Run.open(path).image_shape), sampler="ddpm", steps=S,
                           noise=PerSampleNoise(args.seed))
                fds.append(clf.fd(to_uint8(x)))
            results["fd"][f"{name}/{var}"] = dict(zip(map(str, STEPS), fds))
            print(f"| {name} | {var} | " + " | ".join(f"{v:.2f}" for v in fds) + " |", flush=True)
    (cache / "bench_variance.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {cache / 'bench_variance.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
