"""Time to quality: the demo's recipe against others, trained for 30, 60, 120 and 210 s on 2 cores (issue 29).

    python bench/bench_time_to_quality.py [--seconds 30,60,120,210] [--recipes eps,edm] [--mode separate|one-run]
                                          [--n 500] [--workdir runs/bench-time-to-quality] [--out DIR]
    python bench/bench_time_to_quality.py --calibrate      # the two-sample test on real against real digits only

Each recipe is a set of TrainConfig overrides on top of the demo's (``config_from_preset("digits",
class_cond=True, time_limit=S, steps=1_000_000)``, torch's own thread count as the demo has it: both cores here):

- ``eps``: the demo today (eps prediction, batch 128, lr 2e-3 with cosine decay to the time limit, EMA 0.999 with
  its warm-up);
- ``v-minsnr``: v prediction with the Min-SNR-5 loss weight (Hang et al. 2023, who report about 3x faster
  convergence);
- ``edm``: EDM's preconditioning, loss and log-normal noise levels (Karras et al. 2022; its objective is x0);
- ``lr-hi``: twice the learning rate (4e-3) and an EMA of horizon 200 steps instead of 1000 (0.995; the warm-up
  min(decay, (1+n)/(10+n)) stays on): a short run has few steps to average over;
- ``b64``: batch 64, twice the steps per second: below the critical batch size an example is worth more, and that
  size grows as the loss falls, so a short run favours small batches (McCandlish et al. 2018).

In the default ``--mode separate`` every (recipe, S) is its own run with ``time_limit`` S, exactly "train for S
seconds" as the demo does (its learning rate decays to 0 at S): sum(--seconds) of training per recipe. ``--mode
one-run`` trains once for the largest S and judges the EMA weights saved as each smaller S passes: cheaper (max S per
recipe), but at those points the learning rate has not decayed yet, so they read worse than a run of that length.
Training measures nothing on the way (no ``--eval-every``, no sample grids): S is all training. Each run lives in
``--workdir/RECIPE-Ss`` (one-run: ``RECIPE-one-run-Ss``) and is reused when finished; results are cached per
(mode, recipe, S) in ``--out/results.json`` (with n, seed, sampler, guidance and the recipe), so a rerun adds only
what is missing, and a run dir may be deleted once its result is in.

The judge draws ``--n`` samples from each run's EMA weights as ``ddpmkit sample RUN --class all`` does with its
defaults (dpmpp-2m-sde at its default 20 steps, guidance weight ``DEFAULT_GUIDANCE`` = 0.5; sample i of digit
i mod 10 from the noise stream (``--seed``, i)) and gives:

- FD: the digits classifier's Frechet distance to its training split (1,438 real digits), with its jackknife
  standard error (``QualityProbe.score``). Floor: the 359 held-out real digits (biased up by about 1/n, and n is
  359 there against 500 for the samples).
- Two-sample accuracy (``digits_tools.two_sample_accuracy``), a classifier two-sample test (Lopez-Paz & Oquab 2017)
  on the classifier's 64 penultimate features: the n samples against n real digits of the same class counts (n/10 of
  each digit, drawn at random with ``--seed`` from all 1,797 digits at 16x16: the 359 held-out digits are too few
  for n = 500); an L2-penalised logistic regression (standardised features, lambda 1e-3, 100 L-BFGS iterations) in
  5-fold cross-validation, each set split into 5 near-equal folds; the mean held-out accuracy over the 2n
  predictions, with its binomial standard error. 0.5: the classifier cannot tell samples from real digits; 1: it
  always can. Its floor, printed at the start: the same test on the comparisons' n real digits against n other real
  digits (disjoint, the same class counts), and the mean and spread of that over ``--null-repeats`` other pairs.
  Measured with ``--calibrate`` (n = 500, 20 pairs): real against real gives 0.483 on average, spread (sd) 0.017 over
  the pairs, about the binomial standard error of one pair (0.016); the pair of the default seed gives 0.514. The
  mean sits a little under 0.5: cross-validated accuracy is pessimistic when there is nothing to learn (a held-out
  point's own neighbourhood is missing from the training folds). The 359 held-out digits against as many of the
  classifier's training digits: 0.478 (spread 0.022): the features do not tell the digits the classifier learnt from
  from the others, so the real side may come from all 1,797. What it sees (the same pair, one side spoilt): Gaussian
  noise of sd 32/255 gives 0.61 (FD 16 against 3.4 unspoilt), a half blur 0.60 (FD 18), a shift by one pixel 0.74
  (FD 26), 0.8 contrast 0.77 (FD 53), Gaussian noise images 0.99. Being linear it reads the features' means in every
  direction more than their spread; it cannot see copies of training digits (memorisation), which read as real. It
  wants n well above the 64 features: at n = 40 even noise images score only 0.96.

The table (markdown): recipe | S | steps | FD +- se | two-sample accuracy +- se, with the floors; ``--out`` holds
``results.json`` and ``time_to_quality.png`` (FD and accuracy against S, one line per recipe, floors dashed). The last
lines say, for each recipe, the first S at which it reaches the largest-S ``eps`` run's FD and accuracy (each no
worse than that run's by more than one combined standard error, sqrt(se^2 + se_ref^2)): what decides the demo's
recipe. Training, sampling and judging are timed in wall-clock seconds; other jobs on the machine slow them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_tools import balanced_real_indices, noise_images, two_sample_accuracy  # noqa: E402

from ddpmkit.cli.sample import SAMPLE_DEFAULT_SAMPLER  # noqa: E402
from ddpmkit.diffusion.denoiser import DEFAULT_GUIDANCE  # noqa: E402
from ddpmkit.metrics.quality import QualityProbe, classifier_view, draw_samples, frechet_stderr  # noqa: E402

# name -> (TrainConfig overrides on top of the demo's, why); the module docstring says more
RECIPES: dict[str, tuple[dict, str]] = {
    "eps": ({}, "the demo today"),
    "v-minsnr": (dict(objective="v", loss_weight="min-snr"), "v prediction, Min-SNR-5 weight (Hang et al. 2023)"),
    "edm": (dict(precond="edm"), "EDM preconditioning and loss (Karras et al. 2022)"),
    "lr-hi": (dict(lr=4e-3, ema_decay=0.995), "lr 4e-3, EMA 0.995 (with its warm-up)"),
    "b64": (dict(batch_size=64), "batch 64: more steps, below the critical batch (McCandlish et al. 2018)"),
}
TWO_SAMPLE = dict(folds=5, l2=1e-3, iters=100)  # the settings of the two-sample test, recorded with each result
DONE = "bench_done.json"  # in a run dir: the run finished (its steps and time points)


def sampler_steps(T: int = 1000) -> int:
    """The default step count of the default sampler (``ddpmkit sample``'s with no --steps)."""
    from ddpmkit.samplers import get_sampler

    return int(get_sampler(SAMPLE_DEFAULT_SAMPLER).steps_for(T, None))


def fmt_s(seconds: float) -> str:
    return f"{seconds:g}"


def demo_config(overrides: dict, seconds: float, keep: int = 3):
    """The demo's training configuration for ``seconds``, measuring nothing on the way, plus ``overrides``."""
    from ddpmkit.train import config_from_preset

    return config_from_preset("digits", class_cond=True, time_limit=seconds, steps=1_000_000, sample_every=10**9,
                              checkpoint_every=10**9, num_samples=0, eval_every=0, keep=keep, **overrides)


def jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def fresh_dir(path: Path) -> None:
    """Remove an unfinished run of this script (a ddpmkit run dir without DONE) before training it again."""
    if path.exists():
        if not (path / "config.json").is_file() and any(path.iterdir()):
            raise SystemExit(f"{path} exists and is not a ddpmkit run: move it away or choose another --workdir")
        shutil.rmtree(path)


def finished(path: Path, overrides: dict) -> dict | None:
    """The DONE record of a finished run of these overrides, else None."""
    f = path / DONE
    if f.is_file():
        info = json.loads(f.read_text())
        if info.get("overrides") == jsonable(overrides):
            return info
    return None


def train_separate(name: str, seconds: float, work: Path) -> dict:
    """One run of ``seconds`` (time limit and cosine decay to it): {"path", "steps", "train_s", ...}."""
    from ddpmkit.train import Trainer

    overrides = RECIPES[name][0]
    run_dir = work / f"{name}-{fmt_s(seconds)}s"
    info = finished(run_dir, overrides)
    if info is None:
        fresh_dir(run_dir)
        tr = Trainer(demo_config(overrides, seconds), run_dir, quiet=True)
        params = tr.model.num_parameters()
        res = tr.run()
        info = {"overrides": jsonable(overrides), "params": params, "threads": torch.get_num_threads(),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "points": {fmt_s(seconds): {"steps": res["step"], "train_s": res["seconds"], "path": "."}}}
        (run_dir / DONE).write_text(json.dumps(info, indent=1))
        print(f"[{name} {fmt_s(seconds)} s] trained {res['step']} steps in {res['seconds']:.1f} s "
              f"({1000 * res['seconds'] / max(res['step'], 1):.0f} ms/step, {torch.get_num_threads()} threads) "
              f"-> {run_dir}", flush=True)
    p = info["points"][fmt_s(seconds)]
    return {**p, "path": str(run_dir / p["path"]), "params": info["params"], "threads": info["threads"],
            "finished": info["finished"]}


def train_one_run(name: str, seconds: list[float], work: Path) -> dict[str, dict]:
    """One run of max(seconds), its EMA weights saved as each smaller time point passes: {S: point}."""
    from ddpmkit.train import Trainer

    overrides = RECIPES[name][0]
    top = max(seconds)
    run_dir = work / f"{name}-one-run-{fmt_s(top)}s"
    info = finished(run_dir, overrides)
    if info is None or not all(fmt_s(s) in info["points"] for s in seconds):
        fresh_dir(run_dir)
        marks = sorted(s for s in seconds if s < top)

        class Marked(Trainer):  # a checkpoint at the first step that ends past each time point
            def train_step(self):
                out = super().train_step()
                elapsed = time.perf_counter() - self._t0
                while marks and elapsed >= marks[0]:
                    ckpt = self.save()
                    points[fmt_s(marks.pop(0))] = {"steps": self.step, "train_s": elapsed,
                                                   "path": str(Path(ckpt).resolve().relative_to(run_dir.resolve()))}
                return out

        points: dict[str, dict] = {}
        tr = Marked(demo_config(overrides, top, keep=len(seconds) + 1), run_dir, quiet=True)
        params = tr.model.num_parameters()
        res = tr.run()
        points[fmt_s(top)] = {"steps": res["step"], "train_s": res["seconds"],
                              "path": str(Path(res["checkpoint"]).resolve().relative_to(run_dir.resolve()))}
        info = {"overrides": jsonable(overrides), "params": params, "threads": torch.get_num_threads(),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "points": points}
        (run_dir / DONE).write_text(json.dumps(info, indent=1))
        print(f"[{name} one run of {fmt_s(top)} s] " + ", ".join(f"{k} s: {v['steps']} steps"
                                                                 for k, v in points.items()) + f" -> {run_dir}",
              flush=True)
    return {k: {**v, "path": str(run_dir / v["path"]), "params": info["params"], "threads": info["threads"],
                "finished": info["finished"]} for k, v in info["points"].items()}


class Judge:
    """The FD and the two-sample accuracy of ``n`` samples of a run, against fixed real digits."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.probe = QualityProbe.digits()
        clf = self.clf = self.probe.classifier
        self.labels = clf.labels.numpy()
        self.real_feats = clf.features(clf.images)  # all 1,797 real digits
        self.real_a = balanced_real_indices(self.labels, n, seed=seed)  # the real side of every comparison

    def settings(self) -> dict:
        return {"n": self.n, "seed": self.seed, "sampler": SAMPLE_DEFAULT_SAMPLER,
                "sampler_steps": sampler_steps(), "guidance": DEFAULT_GUIDANCE, "two_sample": TWO_SAMPLE}

    def floors(self, repeats: int) -> dict:
        """The real held-out digits' FD, and real against real digits in the two-sample test: the comparison's own
        real side against n disjoint real digits, and the mean and spread over ``repeats`` such pairs."""
        clf = self.clf
        fd = {"n": int(clf.test_feats.shape[0]), "fd": clf.fd(feats=clf.test_feats),
              "fd_stderr": frechet_stderr(clf.test_feats, clf.ref_mu, clf.ref_sigma)}
        # the largest n with two disjoint sets of the samples' class counts
        n2 = min(self.n, min(np.bincount(self.labels)) // 2 * 10)
        a = self.real_a if n2 == self.n else balanced_real_indices(self.labels, n2, seed=self.seed)
        b = balanced_real_indices(self.labels, n2, seed=self.seed + 1, exclude=a)
        pair = two_sample_accuracy(self.real_feats[a], self.real_feats[b], seed=self.seed, **TWO_SAMPLE)
        accs = []
        for r in range(repeats):
            a = balanced_real_indices(self.labels, n2, seed=10_000 + r)
            b = balanced_real_indices(self.labels, n2, seed=20_000 + r, exclude=a)
            accs.append(two_sample_accuracy(self.real_feats[a], self.real_feats[b], seed=r, **TWO_SAMPLE)["accuracy"])
        return {"real_heldout": fd, "real_vs_real": {**pair, "n": n2, "repeats": repeats,
                                                     "mean": float(np.mean(accs)) if accs else None,
                                                     "spread": float(np.std(accs, ddof=1)) if repeats > 1 else None}}

    def __call__(self, path: str) -> dict:
        from ddpmkit.run import Run

        t0 = time.perf_counter()
        run = Run.open(path)
        x, _ = draw_samples(run.denoiser(), self.n, run.image_shape, sampler=SAMPLE_DEFAULT_SAMPLER, steps=None,
                            seed=self.seed, num_classes=len(run.class_names), guidance=DEFAULT_GUIDANCE,
                            null_class=run.null_class)
        sample_s = time.perf_counter() - t0
        q = self.probe.score(x)
        feats = self.clf.features(classifier_view(x, 16))
        ts = two_sample_accuracy(feats, self.real_feats[self.real_a], seed=self.seed, **TWO_SAMPLE)
        return {"fd": q["fd"], "fd_stderr": q["fd_stderr"], "confidence": q["confidence"], "acc": ts["accuracy"],
                "acc_stderr": ts["stderr"], "sample_s": sample_s, "judge_s": time.perf_counter() - t0}


def calibrate(n: int, repeats: int) -> None:
    """The two-sample test on real digits only: real against real at n, held-out against training digits."""
    judge = Judge(n, 0)
    clf, labels, feats = judge.clf, judge.labels, judge.real_feats
    t0 = time.perf_counter()
    fl = judge.floors(repeats)["real_vs_real"]
    print(f"real against real digits, n = {fl['n']} each: {fl['mean']:.3f} mean over {repeats} draws, spread (sd) "
          f"{fl['spread']:.3f}; the binomial standard error of one draw {fl['stderr']:.3f} "
          f"({time.perf_counter() - t0:.1f} s)")
    test = clf.test_idx
    counts = np.bincount(labels[test], minlength=10)
    accs = []
    for r in range(repeats):
        rng = np.random.RandomState(r)
        train = np.concatenate([rng.choice(np.intersect1d(np.flatnonzero(labels == c), clf.train_idx), counts[c],
                                           replace=False) for c in range(10)])
        accs.append(two_sample_accuracy(feats[test], feats[train], seed=r, **TWO_SAMPLE)["accuracy"])
    print(f"the {len(test)} held-out digits against as many of the classifier's training digits: {np.mean(accs):.3f} "
          f"mean over {repeats} draws, spread {np.std(accs, ddof=1):.3f}")
    # its power: real digits against other real digits spoilt a little (the FD of the spoilt set beside it)
    a = judge.real_a
    b = balanced_real_indices(labels, n, seed=1, exclude=a)
    x = clf.images[torch.from_numpy(b)].float() / 127.5 - 1.0
    gen = torch.Generator().manual_seed(0)
    spoilt = {"unchanged": x, "Gaussian noise, sd 32/255": x + torch.randn(x.shape, generator=gen) * 64 / 255,
              "shifted one pixel right": torch.roll(x, 1, -1),
              "half blurred (3x3 box)": 0.5 * x + 0.5 * torch.nn.functional.avg_pool2d(x, 3, 1, 1,
                                                                                       count_include_pad=False),
              "contrast 0.8": (x + 1.0) * 0.8 - 1.0,
              "replaced by Gaussian noise images": noise_images(len(b)).float() / 127.5 - 1.0}
    for name, y in spoilt.items():
        f = clf.features(((y.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8))
        r = two_sample_accuracy(feats[a], f, seed=0, **TWO_SAMPLE)
        print(f"n real digits against n others {name}: accuracy {r['accuracy']:.3f} +- {r['stderr']:.3f}; "
              f"their FD {clf.fd(feats=f):.2f} +- {frechet_stderr(f, clf.ref_mu, clf.ref_sigma):.2f}")


def cached(results: dict, key: str, want: dict) -> dict | None:
    """The cached result under ``key`` when it was judged with the settings ``want`` (n, seed, ..., the recipe)."""
    r = results.get(key)
    return r if r is not None and all(r.get(k) == v for k, v in want.items()) else None


def reaches(row: dict, ref: dict) -> bool:
    """Whether a result is no worse than the reference by more than one combined standard error, on both figures."""
    return (row["fd"] - ref["fd"] <= math.hypot(row["fd_stderr"], ref["fd_stderr"])
            and row["acc"] - ref["acc"] <= math.hypot(row["acc_stderr"], ref["acc_stderr"]))


def table(rows: list[dict], floors: dict) -> str:
    lines = ["| recipe | seconds | steps | ms/step | FD +- se | two-sample accuracy +- se |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {fmt_s(r['seconds'])} | {r['steps']:,} | "
                     f"{1000 * r['train_s'] / max(r['steps'], 1):.0f} | {r['fd']:.2f} +- {r['fd_stderr']:.2f} | "
                     f"{r['acc']:.3f} +- {r['acc_stderr']:.3f} |")
    h, rr = floors["real_heldout"], floors["real_vs_real"]
    lines.append(f"| real held-out digits (n = {h['n']}) | | | | {h['fd']:.2f} +- {h['fd_stderr']:.2f} | |")
    spread = (f" (mean of {rr['repeats']} other pairs {rr['mean']:.3f}, sd {rr['spread']:.3f})"
              if rr.get("spread") is not None else "")
    lines.append(f"| real vs real digits (n = {rr['n']}) | | | | | {rr['accuracy']:.3f} +- {rr['stderr']:.3f}"
                 f"{spread} |")
    return "\n".join(lines)


def plot(rows: list[dict], floors: dict, path: Path, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["recipe"] for r in rows):
        rs = sorted((r for r in rows if r["recipe"] == name), key=lambda r: r["seconds"])
        s = [r["seconds"] for r in rs]
        axes[0].errorbar(s, [r["fd"] for r in rs], yerr=[r["fd_stderr"] for r in rs], marker="o", capsize=3,
                         label=name)
        axes[1].errorbar(s, [r["acc"] for r in rs], yerr=[r["acc_stderr"] for r in rs], marker="o", capsize=3,
                         label=name)
    h, rr = floors["real_heldout"], floors["real_vs_real"]
    axes[0].axhline(h["fd"], color="k", ls="--", lw=1, label=f"real held-out (n = {h['n']})")
    axes[1].axhline(rr["accuracy"], color="k", ls="--", lw=1, label=f"real vs real (n = {rr['n']})")
    axes[1].axhline(0.5, color="grey", ls=":", lw=1)
    axes[0].set(xlabel="training seconds", ylabel="Frechet distance (digits classifier)", yscale="log",
                title="FD of the samples")
    axes[1].set(xlabel="training seconds", ylabel="held-out accuracy", title="two-sample accuracy (0.5: real-like)")
    for ax in axes:
        ax.set_xticks(sorted({r["seconds"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n = rows[0]["n"] if rows else 0
    fig.suptitle(f"time to quality, {mode} runs; {n} samples, {SAMPLE_DEFAULT_SAMPLER} {sampler_steps()} steps, "
                 f"guidance {DEFAULT_GUIDANCE:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", default="30,60,120,210", help="training time points, comma-separated "
                                                              "(default 30,60,120,210)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)} "
                                                                 "(default: all)")
    ap.add_argument("--mode", choices=("separate", "one-run"), default="separate",
                    help="separate (default): an independent run of S seconds for every time point S, its learning "
                         "rate decayed to 0 at S, as the demo trains (sum of --seconds per recipe); one-run: one run "
                         "of the largest S, its EMA weights judged as each smaller S passes: cheaper, but there the "
                         "learning rate has not decayed yet, so early points read worse than runs of that length")
    ap.add_argument("--n", type=int, default=500, help="samples judged per point (default 500)")
    ap.add_argument("--seed", type=int, default=0, help="noise streams of the samples, the real digits they are "
                                                        "compared with and the folds (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, as the demo: "
                                                              "every core)")
    ap.add_argument("--null-repeats", type=int, default=10, help="draws of real-vs-real pairs for the floor's "
                                                                 "spread (default 10)")
    ap.add_argument("--workdir", default="runs/bench-time-to-quality", help="the training runs")
    ap.add_argument("--out", default="runs/bench-time-to-quality", help="results.json and time_to_quality.png")
    ap.add_argument("--table-only", action="store_true", help="print the cached results; train and judge nothing")
    ap.add_argument("--calibrate", action="store_true", help="only the two-sample test on real digits "
                                                             "(--null-repeats draws at --n), and stop")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.calibrate:
        calibrate(a.n, max(a.null_repeats, 2))
        return 0
    try:
        seconds = sorted({float(s) for s in a.seconds.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--seconds takes numbers, got {a.seconds!r}")
    names = [s.strip() for s in a.recipes.split(",") if s.strip()]
    bad = [s for s in names if s not in RECIPES]
    if bad or not names or not seconds or seconds[0] <= 0:
        ap.error(f"unknown recipe(s) {', '.join(bad)}: choose from {', '.join(RECIPES)}" if bad
                 else "give at least one recipe and positive --seconds")
    work, out = Path(a.workdir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    store = json.loads(res_path.read_text()) if res_path.is_file() else {}
    results = store.setdefault("results", {})

    t_start = time.perf_counter()
    judge = Judge(a.n, a.seed)
    settings = judge.settings()
    floors = judge.floors(a.null_repeats)
    store["floors"] = {**floors, "n": a.n, "seed": a.seed}
    rr = floors["real_vs_real"]
    h = floors["real_heldout"]
    print(f"floors: the {h['n']} real held-out digits, FD {h['fd']:.2f} +- {h['fd_stderr']:.2f}; real against real "
          f"digits (n = {rr['n']} each), two-sample accuracy {rr['accuracy']:.3f} +- {rr['stderr']:.3f}"
          + (f" (over {rr['repeats']} draws: mean {rr['mean']:.3f}, spread {rr['spread']:.3f})"
             if rr["spread"] is not None else ""), flush=True)

    def save():
        res_path.write_text(json.dumps(store, indent=1))

    rows = []
    for name in names:
        overrides = jsonable(RECIPES[name][0])
        want = {**settings, "overrides": overrides}
        found = {s: cached(results, f"{a.mode}/{name}/{fmt_s(s)}", want) for s in seconds}
        if a.table_only:
            rows += [r for r in found.values() if r is not None]
            continue
        missing = [s for s in seconds if found[s] is None]
        if missing and a.mode == "one-run":
            points = train_one_run(name, seconds, work)
        for s in missing:
            p = points[fmt_s(s)] if a.mode == "one-run" else train_separate(name, s, work)
            row = {"recipe": name, "mode": a.mode, "seconds": s, **want, "steps": p["steps"], "train_s": p["train_s"],
                   "params": p["params"], "threads": p["threads"], "run": p["path"], **judge(p["path"])}
            results[f"{a.mode}/{name}/{fmt_s(s)}"] = found[s] = row
            save()
            print(f"[{name} {fmt_s(s)} s] {row['steps']} steps: FD {row['fd']:.2f} +- {row['fd_stderr']:.2f}, "
                  f"two-sample accuracy {row['acc']:.3f} +- {row['acc_stderr']:.3f} (judged in {row['judge_s']:.0f} "
                  f"s, sampling {row['sample_s']:.0f} s)", flush=True)
        rows += [found[s] for s in seconds]
    save()
    print()
    print(f"{a.mode} runs; {a.n} samples each ({SAMPLE_DEFAULT_SAMPLER}, {sampler_steps()} steps, guidance "
          f"{DEFAULT_GUIDANCE:g}), seed {a.seed}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(table(rows, floors))
    if rows:
        plot(rows, floors, out / "time_to_quality.png", a.mode)
        print(f"\nresults: {res_path}\nplot:    {out / 'time_to_quality.png'}")
    top = max(seconds)
    ref = next((r for r in rows if r["recipe"] == "eps" and r["seconds"] == top), None)
    print()
    if ref is None:
        print(f"(no eps run of {fmt_s(top)} s among these results: nothing to compare with)")
    else:
        print(f"the reference: eps at {fmt_s(top)} s, FD {ref['fd']:.2f} +- {ref['fd_stderr']:.2f}, two-sample "
              f"accuracy {ref['acc']:.3f} +- {ref['acc_stderr']:.3f}")
        for name in dict.fromkeys(r["recipe"] for r in rows):
            hit = next((r for r in sorted((r for r in rows if r["recipe"] == name), key=lambda r: r["seconds"])
                        if reaches(r, ref)), None)
            print(f"{name}: " + (f"reaches it at {fmt_s(hit['seconds'])} s ({hit['steps']:,} steps; FD "
                                 f"{hit['fd']:.2f}, accuracy {hit['acc']:.3f})" if hit is not None
                                 else f"does not reach it within {fmt_s(top)} s"))
    print(f"\n({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
