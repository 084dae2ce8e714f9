"""Reverse variances on digits (issue 18): the bound and few-step DDPM with small, large, learned and analytic.

    python bench/bench_variances.py                    # trains the models once (cached in --cache), then measures
    python bench/bench_variances.py --vlb              # and a third model on L_vlb alone, for the bound
    python bench/bench_variances.py --steps 1000 --nll-n 32 --fd-n 400 --fd-n-1000 100   # a quick look

Models, the digits preset with one recipe and budget (``--steps``):

- ``L_simple``: DDPM's loss, fixed variance; measured with ``small`` (beta_tilde), ``large`` (beta) and the
  ``analytic`` variance of Analytic-DPM, whose Gamma_t is estimated once on ``--gamma-n`` training images
  (``ddpmkit eval variance``): no training;
- ``L_hybrid``: ``--learn-sigma`` (Improved DDPM), measured with its ``learned`` variance and with ``small``;
- ``L_vlb`` (with ``--vlb``): ``--learn-sigma --vlb-only --timestep-sampler loss-second-moment``, Improved DDPM's
  recipe for the bound (sec. 3.3), with its learned variance.

First, where the answer is known: Gaussian data with its exact noise predictor (no training), DDPM's samples with
each variance against the data's law. Then the digits. The bound is in bits/dim on the first ``--nll-n`` digits,
with the same images and the same noise for every row, so that each row's difference to ``L_simple / small`` is
paired: its standard error is that of the per-image differences. Sample quality is the Frechet distance (FD) of the
digits classifier's features (``ddpmkit.metrics.digits``; an FD of n samples is biased upward by about 1/n, so
compare within a column) for DDPM at S = 10, 25, 50, 100 respaced steps (``--fd-n`` samples), S = 1000
(``--fd-n-1000``) and S = 50 again with more samples (``--confirm-n``), and for DDIM with eta = 0.5 at S = 25 and
50 (at eta = 1 DDIM's chain is respaced DDPM's, and so are its samples). Sample i of every row starts from the same
noise and draws its step noise from the same stream (seed, i), so rows are paired too. Each FD is printed with the
difference to the same model's ``small`` row, +- its standard error, estimated from the spread of that difference
over four disjoint quarters of the samples (the standard deviation of the quarters' differences, halved: a
quarter's FD noise is about twice the whole set's). Every measurement is kept in ``--cache``/measured.json, keyed
by what it depends on, so a second invocation (``--vlb`` after a first without) measures only what is new.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ddpmkit.data import load_dataset  # noqa: E402
from ddpmkit.images import from_uint8, to_uint8  # noqa: E402
from ddpmkit.metrics.digits import DigitsClassifier  # noqa: E402
from ddpmkit.gamma import estimate_run_gamma  # noqa: E402
from ddpmkit.metrics.nll import bpd_terms  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.samplers import PerSampleNoise, sample  # noqa: E402
from ddpmkit.store import latest_checkpoint  # noqa: E402

DDPM_STEPS = (10, 25, 50, 100)
DDIM_STEPS = (25, 50)
DDIM_ETA = 0.5
MODELS = {  # name: (run folder, training settings, variances measured)
    "L_simple": ("simple", dict(), ("small", "large", "analytic")),
    "L_hybrid": ("hybrid", dict(learn_sigma=True), ("learned", "small")),
    "L_vlb": ("vlb", dict(learn_sigma=True, vlb_only=True, timestep_sampler="loss-second-moment"),
              ("learned", "small")),
}


def train(out: Path, steps: int, settings: dict) -> Path:
    from ddpmkit.train import Trainer, config_from_preset

    try:
        if latest_checkpoint(out)[0] is not None and Run.open(out).checkpoint(parts=("train",)).step >= steps:
            print(f"reusing {out}", flush=True)
            return out
    except Exception:  # noqa: BLE001 - no usable run there: train it
        pass
    cfg = config_from_preset("digits", steps=steps, sample_every=10 ** 9, num_samples=0, checkpoint_every=10 ** 9,
                             **settings)
    res = Trainer(cfg, out, quiet=True).run()
    print(f"trained {out.name}: {res['step']} steps in {res['seconds']:.0f} s, last loss {res['loss']:.4f}",
          flush=True)
    return out


def gaussian_table(n: int, seed: int) -> dict:
    """Where the answer is known: data N(M, s^2) per pixel, whose exact noise predictor and Gamma_t have closed
    forms. DDPM's samples with each variance, against the data law, by the Frechet distance of 1-d Gaussians
    (mu_1 - mu_2)^2 + (sd_1 - sd_2)^2 per dimension, from ``n`` sampled pixels."""
    from ddpmkit.diffusion import Denoiser, NoiseSchedule

    M, s = 0.3, 0.5
    sched = NoiseSchedule.linear(1000)
    ab = sched.alpha_bar.double()
    gamma = (1 - ab) / (ab * s * s + 1 - ab)  # E||E[eps | x_t]||^2 / d = bbar / Var(x_t)

    def exact(x, t):  # E[eps | x_t] = sqrt(bbar) (x_t - sqrt(abar) M) / Var(x_t)
        a = ab[t].view(-1, 1, 1, 1)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * M) / (a * s * s + 1 - a)).float()

    out = {}
    print("\n| Gaussian data, exact denoiser: DDPM | " + " | ".join(f"S={S}" for S in DDPM_STEPS) + " |")
    print("| --- |" + " --- |" * len(DDPM_STEPS))
    for var in ("small", "large", "analytic"):
        den = Denoiser(exact, sched, variance=var, clip_x0=False, gamma=gamma)
        cells = []
        for S in DDPM_STEPS:
            x = sample(den, (n, 1, 1, 1), sampler="ddpm", steps=S, noise=torch.Generator().manual_seed(seed))
            fd = (float(x.mean()) - M) ** 2 + (float(x.std()) - s) ** 2
            out[f"{var}/{S}"] = fd
            cells.append(f"{fd:.2e}")
        print(f"| {var} | " + " | ".join(cells) + " |", flush=True)
    return out


class Measured:
    """Measurements kept in ``--cache``/measured.json under keys that name everything they depend on (the run's
    checkpoint step, Gamma_t's images, the seed and sizes), so that a second invocation measures only what is new."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute):
        if key not in self.data:
            self.data[key] = compute()
            self.path.write_text(json.dumps(self.data))
        return self.data[key]


def paired(values: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """Mean difference and its standard error, over paired per-image values."""
    d = values - base
    return float(d.mean()), float(d.std(unbiased=True) / math.sqrt(d.numel()))


def fd_quarters(clf: DigitsClassifier, feats) -> tuple[float, list[float]]:
    """FD of the whole set and of its four disjoint quarters."""
    n = feats.shape[0]
    q = n // 4
    return clf.fd(feats=feats), [clf.fd(feats=feats[k * q:(k + 1) * q]) for k in range(4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="runs/bench-variances", help="where the runs are trained and kept")
    ap.add_argument("--steps", type=int, default=5000, help="training steps of each model (the preset's 5000)")
    ap.add_argument("--vlb", action="store_true", help="also train and bound a model on L_vlb alone")
    ap.add_argument("--gamma-n", type=int, default=256, help="images of the Gamma_t estimate")
    ap.add_argument("--nll-n", type=int, default=256, help="images of the bound")
    ap.add_argument("--fd-n", type=int, default=2000, help="samples per Frechet distance, S <= 100")
    ap.add_argument("--fd-n-1000", type=int, default=500, help="samples per Frechet distance at S = 1000 (0: skip)")
    ap.add_argument("--confirm-n", type=int, default=8000, help="samples of a second S = 50 column (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-fd", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    names = [m for m in MODELS if m != "L_vlb" or args.vlb]
    runs = {m: train(cache / MODELS[m][0], args.steps, MODELS[m][1]) for m in names}
    rows = [(m, v) for m in names for v in MODELS[m][2]]

    run = Run.open(runs["L_simple"])
    if run.gamma() is None or run.diffusion_config["analytic"].get("n") != args.gamma_n:
        t0 = time.perf_counter()
        gamma, note = estimate_run_gamma(run, n=args.gamma_n, seed=args.seed)
        run.save_gamma(gamma, note)
        print(f"Gamma_t on {note['n']} images in {time.perf_counter() - t0:.0f} s (min {float(gamma.min()):.3f}, "
              f"max {float(gamma.max()):.3f})", flush=True)
    results = {"args": vars(args), "bound": {}, "fd": {}, "gaussian": gaussian_table(10 ** 6, args.seed)}
    measured = Measured(cache / "measured.json")
    steps = {m: Run.open(runs[m]).checkpoint(parts=("train",)).step for m in names}

    def tag(m: str, var: str) -> str:
        gamma = f"-gamma{args.gamma_n}" if var == "analytic" else ""
        return f"{m}@{steps[m]}/{var}{gamma}/seed{args.seed}"

    # ---------------------------------------------------------------- the bound, paired over images and noise
    ds = load_dataset("digits", image_size=8, channels=1, progress=False)
    images = from_uint8(ds.images[:args.nll_n]) if ds.images.dtype == torch.uint8 else ds.images[:args.nll_n].float()
    def bound(m, var):
        den = Run.open(runs[m]).denoiser(variance=var)
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            b = torch.cat([bpd_terms(den, images[i:i + 16], generator=gen).double().sum(dim=1)
                           for i in range(0, images.shape[0], 16)])
        print(f"bound {m}/{var}: {time.perf_counter() - t0:.0f} s", flush=True)
        return b.tolist()

    per_image = {(m, var): torch.tensor(measured.get(f"bound/{args.nll_n}/{tag(m, var)}",
                                                     lambda m=m, var=var: bound(m, var)),
                                        dtype=torch.float64) for m, var in rows}
    base = per_image[("L_simple", "small")]
    print(f"\n| model | variance | bound (bits/dim), {args.nll_n} digits | difference to L_simple / small |")
    print("| --- | --- | --- | --- |")
    for m, var in rows:
        b = per_image[(m, var)]
        d, se = paired(b, base)
        results["bound"][f"{m}/{var}"] = {"bpd": float(b.mean()), "stderr": float(b.std() / math.sqrt(b.numel())),
                                          "diff": d, "diff_stderr": se}
        print(f"| {m} | {var} | {float(b.mean()):.4f} +- {float(b.std() / math.sqrt(b.numel())):.4f} | "
              f"{d:+.4f} +- {se:.4f} |", flush=True)

    if not args.skip_fd:
        clf = DigitsClassifier.load_or_train()
        cols = [("ddpm", S, args.fd_n) for S in DDPM_STEPS]
        if args.fd_n_1000 > 0:
            cols.append(("ddpm", 1000, args.fd_n_1000))
        if args.confirm_n > 0:
            cols.append(("ddpm", 50, args.confirm_n))
        cols += [("ddim", S, args.fd_n) for S in DDIM_STEPS]

        def frechet(sampler, S, n, m, var):
            den = Run.open(runs[m]).denoiser(variance=var)
            opts = {"eta": DDIM_ETA} if sampler == "ddim" else {}
            t0 = time.perf_counter()
            x = sample(den, (n, 1, 8, 8), sampler=sampler, steps=S, noise=PerSampleNoise(args.seed), **opts)
            fd = fd_quarters(clf, clf.features(to_uint8(x)))
            print(f"{sampler} S={S} n={n} {m}/{var}: FD {fd[0]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            return fd

        fds = {}
        for sampler, S, n in cols:
            for m, var in rows:
                if sampler == "ddim" and (m != "L_simple" or var == "large"):
                    continue  # DDIM reads only the analytic variance: small against analytic
                opt = f"-eta{DDIM_ETA:g}" if sampler == "ddim" else ""
                key = f"fd/{sampler}{opt}/{S}/{n}/{tag(m, var)}"
                fds[(sampler, S, n, m, var)] = measured.get(key, lambda a=(sampler, S, n, m, var): frechet(*a))
        for sampler in ("ddpm", "ddim"):
            mine = [(S, n) for smp, S, n in cols if smp == sampler]
            title = "DDPM" if sampler == "ddpm" else f"DDIM eta = {DDIM_ETA:g}"
            print(f"\n| {title}: model | variance | " + " | ".join(f"S={S} (n={n})" for S, n in mine) + " |")
            print("| --- | --- |" + " --- |" * len(mine))
            for m, var in rows:
                cells = []
                for S, n in mine:
                    if (sampler, S, n, m, var) not in fds:
                        continue
                    fd, q = fds[(sampler, S, n, m, var)]
                    results["fd"][f"{sampler}/{S}/{n}/{m}/{var}"] = {"fd": fd, "n": n, "quarters": q}
                    ref = fds.get((sampler, S, n, m, "small"))
                    if var == "small" or ref is None:  # the reference row, or a model measured without one
                        cells.append(f"{fd:.2f}")
                        continue
                    diff = [a - b for a, b in zip(q, ref[1])]
                    mean = sum(diff) / 4
                    se = math.sqrt(sum((v - mean) ** 2 for v in diff) / 3) / 2
                    results["fd"][f"{sampler}/{S}/{n}/{m}/{var}"].update(diff_to_small=fd - ref[0], diff_stderr=se)
                    cells.append(f"{fd:.2f} ({fd - ref[0]:+.2f} +- {se:.2f})")
                if cells:
                    print(f"| {m} | {var} | " + " | ".join(cells) + " |", flush=True)
    path = cache / "bench_variances.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
