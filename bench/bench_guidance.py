"""Classifier-free guidance on the digits: does the model draw the class it is asked for, and at what cost?

For each guidance weight w (default 0, 0.5, 1, 2, 4) it draws ``--n`` samples of every digit from a
class-conditional run (DDIM, 50 steps, clipping on) and measures, with the project's digits classifier
(``ddpmkit.metrics.digits``, trained on the real digits only):

- agreement: the fraction of the samples of class c that the classifier calls c, per class and overall;
- FD: the Frechet distance, in the classifier's features, of the samples of class c against the real digits of
  class c (the classifier's training split), and of all samples against all real digits (overall).

The same is measured for guidance combined on the clipped x0 predictions instead of on eps (``--x0-space``), and
for an unconditional run of the same training budget (its overall FD, and its per-class FD over the samples the
classifier assigns to each class). A table and a plot are written.

Runs are trained when absent, each for ``--train-seconds`` (torch threads = 1) or, for the unconditional run,
``--steps`` (the conditional run's own step count when not given), so the two get the same number of steps:

    python bench/bench_guidance.py --cond runs/bench-guidance/cond --uncond runs/bench-guidance/uncond --n 100 \
        --out bench/results/guidance

A Frechet distance from N samples is biased upwards by roughly 1/N: compare rows of equal N only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddpmkit.images import to_uint8
from ddpmkit.metrics.digits import DigitsClassifier
from ddpmkit.metrics.frechet import frechet_distance, mean_cov
from ddpmkit.run import Run
from ddpmkit.samplers.batches import sample_batches

WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)


def train(run_dir: Path, *, class_cond: bool, seconds: float | None, steps: int | None) -> None:
    from ddpmkit.train import Trainer, config_from_preset

    cfg = config_from_preset("digits", class_cond=class_cond, time_limit=seconds, steps=steps or 1_000_000,
                             sample_every=1_000_000, checkpoint_every=250, keep=1000)
    r = Trainer(cfg, run_dir, quiet=True).run()
    print(f"trained {run_dir}: {r['step']} steps in {r['seconds']:.0f} s, loss {r['loss']:.4f}", flush=True)


def draw(run: Run, labels: torch.Tensor | None, n: int, w: float | None, space: str, seed: int) -> torch.Tensor:
    den = run.denoiser(guidance=w)
    if w:
        den = den.guided(w, run.null_class, space)
    xs = [x for _, x in sample_batches(den, n=n, shape=run.image_shape, sampler="ddim", steps=50, seed=seed,
                                       batch_size=250, labels=labels, log=lambda m: None)]
    return to_uint8(torch.cat(xs))


def fd(clf: DigitsClassifier, feats: np.ndarray, ref: np.ndarray) -> float:
    if len(feats) < 2:
        return float("nan")
    try:
        return frechet_distance(*mean_cov(feats), *mean_cov(ref))
    except ValueError:  # too few samples for a full-rank covariance
        return float("nan")


def measure(clf, images, labels, ref_feats, ref_labels) -> dict:
    """Agreement and FD per class (``labels``: the class asked for, or for unconditional samples the predicted
    class) and overall."""
    feats = clf.features(images)
    pred = clf.predict(images)
    out = {"agree": {}, "fd": {}}
    for c in range(10):
        m = labels == c
        out["agree"][c] = float((pred[m] == c).mean()) if m.any() else float("nan")
        out["fd"][c] = fd(clf, feats[m], ref_feats[ref_labels == c])
    out["agree_all"] = float((pred == labels).mean())
    out["fd_all"] = fd(clf, feats, ref_feats)
    out["fd_class_mean"] = float(np.nanmean([out["fd"][c] for c in range(10)]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--cond", required=True, help="class-conditional run (trained here when absent)")
    p.add_argument("--uncond", required=True, help="unconditional run of the same budget (trained when absent)")
    p.add_argument("--train-seconds", type=float, default=300.0)
    p.add_argument("--steps", type=int, default=None, help="training steps of the unconditional run (default: "
                                                           "the conditional run's)")
    p.add_argument("--n", type=int, default=100, help="samples of each class at each weight")
    p.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS))
    p.add_argument("--no-x0-space", dest="x0_space", action="store_false", help="skip the x0-space variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/guidance")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cond_dir, uncond_dir, out = Path(args.cond), Path(args.uncond), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (cond_dir / "config.json").is_file():
        train(cond_dir, class_cond=True, seconds=args.train_seconds, steps=None)
    cond = Run.open(cond_dir)
    cond_steps = cond.checkpoint(parts=("train",)).step
    if not (uncond_dir / "config.json").is_file():
        train(uncond_dir, class_cond=False, seconds=None, steps=args.steps or cond_steps)
    uncond = Run.open(uncond_dir)
    uncond_steps = uncond.checkpoint(parts=("train",)).step

    clf = DigitsClassifier.load_or_train()
    ref_feats = clf.ref_feats
    ref_labels = clf.labels[torch.from_numpy(clf.train_idx)].numpy()
    floor = clf.fd(clf.test_images)
    n = args.n
    labels = torch.arange(10).repeat_interleave(n)
    rows = []
    weights = [float(w) for w in args.weights.split(",")]
    spaces = ["eps"] + (["x0"] if args.x0_space else [])
    for space in spaces:
        for w in weights:
            if space == "x0" and w == 0:
                continue  # the same model as eps-space at w = 0
            t0 = time.perf_counter()
            imgs = draw(cond, labels, 10 * n, w, space, args.seed)
            res = measure(clf, imgs, labels.numpy(), ref_feats, ref_labels)
            rows.append({"model": "class-cond", "space": space, "w": w, **res,
                         "seconds": time.perf_counter() - t0})
            print(f"{space:>3} w={w:<4g} agree {res['agree_all']:.3f}  FD all {res['fd_all']:.2f}  "
                  f"FD per class (mean) {res['fd_class_mean']:.2f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    t0 = time.perf_counter()
    imgs = draw(uncond, None, 10 * n, None, "eps", args.seed)
    pred = clf.predict(imgs)
    res = measure(clf, imgs, pred, ref_feats, ref_labels)
    res["agree_all"] = float("nan")
    res["agree"] = {c: float("nan") for c in range(10)}
    res["class_share"] = {c: float((pred == c).mean()) for c in range(10)}
    rows.append({"model": "unconditional", "space": "-", "w": None, **res, "seconds": time.perf_counter() - t0})
    print(f"unconditional FD all {res['fd_all']:.2f}  FD per predicted class (mean) {res['fd_class_mean']:.2f}",
          flush=True)

    meta = {"cond": str(cond_dir), "cond_steps": cond_steps, "uncond": str(uncond_dir), "uncond_steps": uncond_steps,
            "n_per_class": n, "sampler": "ddim-50, clip on", "seed": args.seed, "classifier": clf.key,
            "real_floor_fd": floor, "real_floor_n": int(len(clf.test_idx)), "command": " ".join(sys.argv)}
    (out / "guidance.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    table = _table(rows, meta)
    (out / "guidance.md").write_text(table)
    print(table)
    _plot(rows, weights, out / "guidance.png", meta)
    print(f"wrote {out / 'guidance.md'}, {out / 'guidance.json'}, {out / 'guidance.png'}")
    return 0


def _table(rows, meta) -> str:
    head = ("| model | guided on | w | agreement | FD, all | FD per class, mean | "
            + " | ".join(f"agree/FD {c}" for c in range(10)) + " |")
    lines = [head, "|" + " --- |" * (6 + 10)]
    for r in rows:
        w = "-" if r["w"] is None else f"{r['w']:g}"
        agree = "-" if np.isnan(r["agree_all"]) else f"{100 * r['agree_all']:.1f}%"
        per = " | ".join(("-" if np.isnan(r["agree"][c]) else f"{100 * r['agree'][c]:.0f}%") + f" / {r['fd'][c]:.1f}"
                         for c in range(10))
        lines.append(f"| {r['model']} | {r['space']} | {w} | {agree} | {r['fd_all']:.2f} | "
                     f"{r['fd_class_mean']:.2f} | {per} |")
    lines += ["", f"{meta['n_per_class']} samples per class ({10 * meta['n_per_class']} in all), DDIM 50 steps, "
                  f"clipping on; class-conditional run {meta['cond_steps']} steps, unconditional "
                  f"{meta['uncond_steps']} steps. Real held-out digits ({meta['real_floor_n']}) against the same "
                  f"reference: FD {meta['real_floor_fd']:.2f}. Unconditional per-class FD groups its samples by "
                  f"the classifier's prediction."]
    return "\n".join(lines) + "\n"


def _plot(rows, weights, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    unc = next(r for r in rows if r["model"] == "unconditional")
    for space, style in (("eps", "-o"), ("x0", "--s")):
        rs = [r for r in rows if r["model"] == "class-cond" and (r["space"] == space or r["w"] == 0)]
        if space == "x0" and len(rs) <= 1:
            continue
        ws = [r["w"] for r in rs]
        axes[0].plot(ws, [100 * r["agree_all"] for r in rs], style, label=f"overall, guided on {space}")
        axes[1].plot(ws, [r["fd_all"] for r in rs], style, label=f"all samples, guided on {space}")
        axes[1].plot(ws, [r["fd_class_mean"] for r in rs], style, alpha=0.5, label=f"per class (mean), {space}")
        if space == "eps":
            for c in range(10):
                axes[0].plot(ws, [100 * r["agree"][c] for r in rs], "-", color="gray", alpha=0.25, lw=0.8)
    axes[1].axhline(unc["fd_all"], color="k", ls=":", label="unconditional, all samples")
    axes[1].axhline(unc["fd_class_mean"], color="gray", ls=":", label="unconditional, per predicted class")
    axes[0].set(xlabel="guidance weight w", ylabel="classifier agrees with the class asked for (%)",
                title="agreement (gray: each class)")
    axes[1].set(xlabel="guidance weight w", ylabel="Frechet distance (digits classifier features)",
                title="distance to the real digits")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"classifier-free guidance on the digits: {meta['n_per_class']} samples per class, DDIM 50",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
