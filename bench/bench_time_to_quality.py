"""Time to quality: the demo's recipe against others, trained for 30, 60, 120 and 210 s on 2 cores (issue 29).

    python bench/bench_time_to_quality.py [--seconds 30,60,120,210] [--recipes eps,edm] [--mode separate|one-run]
                                          [--n 800] [--workdir runs/bench-time-to-quality] [--out DIR]
    python bench/bench_time_to_quality.py --mode steps --steps 400,856,1367 --recipes eps   # a busy machine
    python bench/bench_time_to_quality.py --calibrate      # the two-sample tests on real against real digits only

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
  size grows as the loss falls, so a short run favours small batches (McCandlish et al. 2018);
- ``edm-b64``, ``edm-b32``: EDM with batch 64 or 32, the two for a one-minute budget; ``edm-b32-nrb1``: batch 32 and
  one ResNet block a level instead of two (0.7x the time of a step on 2 threads, bench/bench_train_speed.py);
  ``edm-b32-lrhi``, ``-lrlo``, ``-sd75`` (sigma_data 0.75, the digits' own spread), ``-pm`` (P_mean -0.6),
  ``-sd75-pm`` and ``edm-b16``: the other one-minute candidates of two ResNet blocks;
- ``edm-b32-nrb1-b2`` (Adam beta2 0.99), ``-lr3`` (lr 3e-3), ``-b2-lr3`` (both: the 90-second demo's recipe) and
  ``-b2-lr4`` (lr 4e-3): the one-block network's optimizer; ``-b2-lr3-pm16``: that recipe with P_mean -1.6;
- ``edm-b48-nrb1-b2-lr3``, ``edm-b64-nrb1-b2-lr3``: that recipe at batch 48 or 64, and ``edm-b48-nrb1-b2-lr4``
  (the demo's recipe, ``ddpmkit.demo.DEMO_RECIPE``) at batch 48 with lr 4e-3. A step of the one-block network has a
  large part that does not grow with the batch, so batch 48 costs 1.15x to 1.27x the time of a step at 32 for 1.5x
  the images, and batch 64 1.5x (``bench/bench_train_speed.py``).

``NAME+sK`` is recipe NAME trained from seed K instead of 0 (``--recipes edm-b32-nrb1-b2-lr3+s1``): the spread
between training runs, which at batch 32 and a minute is as large as the judges' standard errors.

In the default ``--mode separate`` every (recipe, S) is its own run with ``time_limit`` S, exactly "train for S
seconds" as the demo does (its learning rate decays to 0 at S): sum(--seconds) of training per recipe. ``--mode
one-run`` trains once for the largest S and judges the EMA weights saved as each smaller S passes: cheaper (max S per
recipe), but at those points the learning rate has not decayed yet, so they read worse than a run of that length.
Training measures nothing on the way (no ``--eval-every``, no sample grids): S is all training. Each run lives in
``--workdir/RECIPE-Ss`` (one-run: ``RECIPE-one-run-Ss``) and is reused when finished; results are cached per
(mode, recipe, S, guidance weight) in ``--out/results.json`` (with n, seed, sampler and the recipe), so a rerun
adds only what is missing, and a run dir may be deleted once its result is in. ``--mode steps`` trains runs of N
optimizer steps instead (``--steps``, the learning rate decayed to 0 at N), in ``--workdir/RECIPE-Nsteps``: the
same runs whatever else the machine is doing, for when it is not quiet; a quiet machine's table gives the steps a
recipe takes in S seconds (its ms/step), which turns a step count back into time.

The judge draws ``--n`` samples from each run's EMA weights as ``ddpmkit sample RUN --class all`` does with its
defaults (dpmpp-2m-sde at its default 20 steps, guidance weight ``DEFAULT_GUIDANCE`` = 0.2, or ``--guidance W``;
sample i of digit i mod 10 from the noise stream (``--seed``, i)) and gives:

- FD: the digits classifier's Frechet distance to its training split (1,438 real digits), with its jackknife
  standard error (``QualityProbe.score``). Floor: the 359 held-out real digits (biased up by about 1/n, and n is
  359 there against 800 for the samples).
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
- Agreement: how often the digits classifier calls a sample the digit it was drawn as (recorded, not a judge of
  realism: guidance raises it while the samples drift from the real digits, docs/guidance.md).
- The pixels' two-sample accuracy (``pixel_two_sample_accuracy``, bench/pixel_two_sample.py): a small CNN trained
  in the same 5-fold cross-validation to tell the n samples, as uint8 images at the run's size (8x8), from the same n
  real digits at that size as the run trained on them. It sees what the classifier's features ignore (the grain of a
  background, the texture and edges of strokes), so it stays sharp where the features' test sits at its floor: real
  against real at n = 800 it scores 0.519 and 0.496 (two pairs; binomial standard error 0.012), while Gaussian noise
  of sd 8/255 on one side gives 0.66 (the features' test needs 32/255 for 0.61), 16/255 0.91, 0.9 contrast 0.92 and
  a half blur 1.00. Its floor is printed beside the features' (``--pixel-repeats`` pairs).

The table (markdown): recipe | S | steps | ms/step | FD +- se | both two-sample accuracies +- se, with the floors;
``--out`` holds ``results.json`` and ``time_to_quality.png`` (the three figures against S, one line per recipe,
floors dashed). The last lines say, for each recipe, the first S at which it reaches the reference (``--reference``,
default the largest-S ``eps`` run) on all three figures (each no worse than the reference's by more than one
combined standard error, sqrt(se^2 + se_ref^2)): what decides the demo's recipe. Training, sampling and judging
are timed in wall-clock seconds; other jobs on the machine slow them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_tools import balanced_real_indices, noise_images, two_sample_accuracy  # noqa: E402
from pixel_two_sample import PIXEL_TEST, pixel_two_sample_accuracy  # noqa: E402

from ddpmkit.cli.sample import SAMPLE_DEFAULT_SAMPLER  # noqa: E402
from ddpmkit.diffusion.denoiser import DEFAULT_GUIDANCE  # noqa: E402
from ddpmkit.images import to_uint8  # noqa: E402
from ddpmkit.metrics.quality import QualityProbe, classifier_view, draw_samples, frechet_stderr  # noqa: E402

_ONE_BLOCK = dict(precond="edm", batch_size=32, num_res_blocks=1)  # the one-block recipes' common part
# name -> (TrainConfig overrides on top of the demo's, why); the module docstring says more
RECIPES: dict[str, tuple[dict, str]] = {
    "eps": ({}, "the demo today"),
    "v-minsnr": (dict(objective="v", loss_weight="min-snr"), "v prediction, Min-SNR-5 weight (Hang et al. 2023)"),
    "edm": (dict(precond="edm"), "EDM preconditioning and loss (Karras et al. 2022)"),
    "lr-hi": (dict(lr=4e-3, ema_decay=0.995), "lr 4e-3, EMA 0.995 (with its warm-up)"),
    "b64": (dict(batch_size=64), "batch 64: more steps, below the critical batch (McCandlish et al. 2018)"),
    "edm-b64": (dict(precond="edm", batch_size=64), "EDM, batch 64"),
    "edm-b32": (dict(precond="edm", batch_size=32), "EDM, batch 32"),
    "edm-b32-nrb1": (dict(_ONE_BLOCK), "EDM, batch 32, one ResNet block a level"),
    "edm-b32-lrhi": (dict(precond="edm", batch_size=32, lr=4e-3, ema_decay=0.995), "EDM, batch 32, lr 4e-3, EMA 0.995"),
    "edm-b32-lrlo": (dict(precond="edm", batch_size=32, lr=1e-3), "EDM, batch 32, lr 1e-3"),
    "edm-b32-sd75": (dict(precond="edm", batch_size=32, edm_sigma_data=0.75), "EDM, batch 32, the digits' sigma_data"),
    "edm-b32-pm": (dict(precond="edm", batch_size=32, p_mean=-0.6), "EDM, batch 32, P_mean -0.6"),
    "edm-b32-sd75-pm": (dict(precond="edm", batch_size=32, edm_sigma_data=0.75, p_mean=-0.6),
                        "EDM, batch 32, sigma_data 0.75, P_mean -0.6"),
    "edm-b16": (dict(precond="edm", batch_size=16), "EDM, batch 16"),
    "edm-b32-nrb1-b2": (dict(_ONE_BLOCK, adam_beta2=0.99), "EDM, batch 32, one ResNet block a level, Adam beta2 0.99"),
    "edm-b32-nrb1-b2-lr3": (dict(_ONE_BLOCK, adam_beta2=0.99, lr=3e-3),
                            "EDM, batch 32, one ResNet block a level, Adam beta2 0.99, lr 3e-3"),
    "edm-b32-nrb1-b2-lr4": (dict(_ONE_BLOCK, adam_beta2=0.99, lr=4e-3),
                            "EDM, batch 32, one ResNet block a level, Adam beta2 0.99, lr 4e-3"),
    "edm-b32-nrb1-b2-lr3-pm16": (dict(_ONE_BLOCK, adam_beta2=0.99, lr=3e-3, p_mean=-1.6),
                                 "the demo's recipe with P_mean -1.6"),
    "edm-b32-nrb1-lr3": (dict(_ONE_BLOCK, lr=3e-3), "EDM, batch 32, one ResNet block a level, lr 3e-3"),
    "edm-b48-nrb1-b2-lr3": (dict(_ONE_BLOCK, batch_size=48, adam_beta2=0.99, lr=3e-3),
                            "EDM, batch 48, one ResNet block a level, Adam beta2 0.99, lr 3e-3"),
    "edm-b48-nrb1-b2-lr4": (dict(_ONE_BLOCK, batch_size=48, adam_beta2=0.99, lr=4e-3),
                            "EDM, batch 48, one ResNet block a level, Adam beta2 0.99, lr 4e-3"),
    "edm-b64-nrb1-b2-lr3": (dict(_ONE_BLOCK, batch_size=64, adam_beta2=0.99, lr=3e-3),
                            "EDM, batch 64, one ResNet block a level, Adam beta2 0.99, lr 3e-3"),
}


def parse_recipe(name: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME+sK`` (recipe NAME trained from seed K: the spread between training runs) -> (NAME, K or
    None); ValueError when K is not a number."""
    base, sep, seed = name.partition("+s")
    if sep and not seed.isdigit():
        raise ValueError(name)
    return base, int(seed) if sep else None


def recipe_overrides(name: str) -> dict:
    """A recipe's overrides, its training seed included when the name gives one."""
    base, seed = parse_recipe(name)
    return dict(RECIPES[base][0], **({} if seed is None else {"seed": seed}))


def known_recipe(name: str) -> bool:
    try:
        return parse_recipe(name)[0] in RECIPES
    except ValueError:
        return False


TWO_SAMPLE = dict(folds=5, l2=1e-3, iters=100)  # the settings of the two-sample test, recorded with each result
DONE = "bench_done.json"  # in a run dir: the run finished (its steps and time points)


def sampler_steps(T: int = 1000) -> int:
    """The default step count of the default sampler (``ddpmkit sample``'s with no --steps)."""
    from ddpmkit.samplers import get_sampler

    return int(get_sampler(SAMPLE_DEFAULT_SAMPLER).steps_for(T, None))


def fmt_s(seconds: float) -> str:
    return f"{seconds:g}"


UNITS = {"seconds": "s", "steps": " steps"}  # a point's unit -> its suffix in names and lines


def demo_config(overrides: dict, point: float, keep: int = 3, unit: str = "seconds"):
    """The demo's training configuration for ``point`` seconds (or optimizer steps), measuring nothing on the way,
    plus ``overrides``; the learning rate's cosine decay ends at the time limit (or at the last step)."""
    from ddpmkit.train import config_from_preset

    budget = dict(time_limit=point, steps=1_000_000) if unit == "seconds" else dict(steps=int(point))
    return config_from_preset("digits", class_cond=True, sample_every=10**9, checkpoint_every=10**9, num_samples=0,
                              eval_every=0, keep=keep, **budget, **overrides)


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


def train_separate(name: str, seconds: float, work: Path, unit: str = "seconds") -> dict:
    """One run of ``seconds`` (time limit and cosine decay to it; with ``unit`` "steps": of that many optimizer
    steps): {"path", "steps", "train_s", ...}."""
    from ddpmkit.train import Trainer

    overrides = recipe_overrides(name)
    run_dir = work / f"{name}-{fmt_s(seconds)}{UNITS[unit].strip()}"
    info = finished(run_dir, overrides)
    if info is None:
        fresh_dir(run_dir)
        tr = Trainer(demo_config(overrides, seconds, unit=unit), run_dir, quiet=True)
        params = tr.model.num_parameters()
        res = tr.run()
        info = {"overrides": jsonable(overrides), "params": params, "threads": torch.get_num_threads(),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "points": {fmt_s(seconds): {"steps": res["step"], "train_s": res["seconds"], "path": "."}}}
        (run_dir / DONE).write_text(json.dumps(info, indent=1))
        print(f"[{name} {fmt_s(seconds)}{UNITS[unit]}] trained {res['step']} steps in {res['seconds']:.1f} s "
              f"({1000 * res['seconds'] / max(res['step'], 1):.0f} ms/step, {torch.get_num_threads()} threads) "
              f"-> {run_dir}", flush=True)
    p = info["points"][fmt_s(seconds)]
    return {**p, "path": str(run_dir / p["path"]), "params": info["params"], "threads": info["threads"],
            "finished": info["finished"]}


def train_one_run(name: str, seconds: list[float], work: Path) -> dict[str, dict]:
    """One run of max(seconds), its EMA weights saved as each smaller time point passes: {S: point}."""
    from ddpmkit.train import Trainer

    overrides = recipe_overrides(name)
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

    def __init__(self, n: int, seed: int, guidance: float = DEFAULT_GUIDANCE):
        self.n, self.seed, self.guidance = n, seed, guidance
        self.probe = QualityProbe.digits()
        clf = self.clf = self.probe.classifier
        self.labels = clf.labels.numpy()
        self.real_feats = clf.features(clf.images)  # all 1,797 real digits
        self.real_a = balanced_real_indices(self.labels, n, seed=seed)  # the real side of every comparison
        self._real_pixels = {}  # side -> all 1,797 digits as uint8 at that side (the training data of a run)

    def real_pixels(self, side: int) -> torch.Tensor:
        """The digits as a run of ``side`` x ``side`` trains on them (``load_dataset``'s resize), in label order."""
        if side not in self._real_pixels:
            from ddpmkit.data import load_dataset

            ds = load_dataset("digits", image_size=side, progress=False)
            assert np.array_equal(ds.labels.numpy(), self.labels), "the digits' order changed"
            self._real_pixels[side] = ds.images
        return self._real_pixels[side]

    def settings(self) -> dict:
        return {"n": self.n, "seed": self.seed, "sampler": SAMPLE_DEFAULT_SAMPLER,
                "sampler_steps": sampler_steps(), "guidance": self.guidance, "two_sample": TWO_SAMPLE,
                "pixel_test": PIXEL_TEST}

    def floors(self, repeats: int, pixel_repeats: int = 0, side: int = 8) -> dict:
        """The real held-out digits' FD, and real against real digits in the two-sample tests: the comparison's own
        real side against n disjoint real digits, and the mean and spread over ``repeats`` (the pixel test's:
        ``pixel_repeats``, at ``side``) such pairs."""
        clf = self.clf
        fd = {"n": int(clf.test_feats.shape[0]), "fd": clf.fd(feats=clf.test_feats),
              "fd_stderr": frechet_stderr(clf.test_feats, clf.ref_mu, clf.ref_sigma)}
        # the largest n with two disjoint sets of the samples' class counts
        n2 = min(self.n, min(np.bincount(self.labels)) // 2 * 10)
        a0 = self.real_a if n2 == self.n else balanced_real_indices(self.labels, n2, seed=self.seed)
        b0 = balanced_real_indices(self.labels, n2, seed=self.seed + 1, exclude=a0)
        pairs = [(balanced_real_indices(self.labels, n2, seed=10_000 + r), r)
                 for r in range(max(repeats, pixel_repeats))]
        pairs = [(a, balanced_real_indices(self.labels, n2, seed=20_000 + r, exclude=a), r) for a, r in pairs]
        px = self.real_pixels(side)

        def summary(test, feats, k):
            accs = [test(feats[a], feats[b], seed=r)["accuracy"] for a, b, r in pairs[:k]]
            return {**test(feats[a0], feats[b0], seed=self.seed), "n": n2, "repeats": k,
                    "mean": float(np.mean(accs)) if accs else None,
                    "spread": float(np.std(accs, ddof=1)) if k > 1 else None}

        return {"real_heldout": fd,
                "real_vs_real": summary(partial(two_sample_accuracy, **TWO_SAMPLE), self.real_feats, repeats),
                "pixels_real_vs_real": {**summary(partial(pixel_two_sample_accuracy, **PIXEL_TEST), px,
                                                  pixel_repeats), "side": side}}

    def __call__(self, path: str) -> dict:
        from ddpmkit.run import Run

        t0 = time.perf_counter()
        run = Run.open(path)
        x, labels = draw_samples(run.denoiser(), self.n, run.image_shape, sampler=SAMPLE_DEFAULT_SAMPLER,
                                 steps=None, seed=self.seed, num_classes=len(run.class_names), guidance=self.guidance,
                                 null_class=run.null_class)
        sample_s = time.perf_counter() - t0
        q = self.probe.score(x)
        view = classifier_view(x, 16)
        feats = self.clf.features(view)
        # agreement: how often the digits classifier calls a sample the digit it was drawn as
        agree = float((self.clf.predict(view) == labels.numpy()).mean()) if labels is not None else None
        ts = two_sample_accuracy(feats, self.real_feats[self.real_a], seed=self.seed, **TWO_SAMPLE)
        real = self.real_pixels(run.image_shape[-1])[self.real_a]
        ps = pixel_two_sample_accuracy(to_uint8(x.cpu()), real, seed=self.seed, **PIXEL_TEST)
        return {"fd": q["fd"], "fd_stderr": q["fd_stderr"], "confidence": q["confidence"], "agree": agree,
                "acc": ts["accuracy"],
                "acc_stderr": ts["stderr"], "px": ps["accuracy"], "px_stderr": ps["stderr"], "sample_s": sample_s,
                "judge_s": time.perf_counter() - t0}


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
    # the pixels' test at the demo's 8x8: its floor, and what it sees of the same kinds of spoiling
    t0 = time.perf_counter()
    pr = judge.floors(0, pixel_repeats=repeats)["pixels_real_vs_real"]
    print(f"pixels, 8x8: real against real digits, n = {pr['n']} each: {pr['mean']:.3f} mean over {repeats} draws, "
          f"spread {pr['spread']:.3f}; the default seed's pair {pr['accuracy']:.3f} +- {pr['stderr']:.3f} "
          f"({time.perf_counter() - t0:.0f} s)")
    px = judge.real_pixels(8)
    xb = px[torch.from_numpy(b)].float()
    spoilt = {"Gaussian noise, sd 4/255": xb + torch.randn(xb.shape, generator=gen) * 4,
              "Gaussian noise, sd 8/255": xb + torch.randn(xb.shape, generator=gen) * 8,
              "Gaussian noise, sd 16/255": xb + torch.randn(xb.shape, generator=gen) * 16,
              "contrast 0.9": xb * 0.9,
              "half blurred (3x3 box)": 0.5 * xb + 0.5 * torch.nn.functional.avg_pool2d(xb, 3, 1, 1,
                                                                                        count_include_pad=False)}
    for name, y in spoilt.items():
        r = pixel_two_sample_accuracy(px[torch.from_numpy(a)], y.round().clamp(0, 255).to(torch.uint8), seed=0,
                                      **PIXEL_TEST)
        print(f"pixels, 8x8: n real digits against n others {name}: accuracy {r['accuracy']:.3f} +- "
              f"{r['stderr']:.3f}")


def judge_one(a) -> int:
    """--judge-run: one run's three figures, and whether it reaches --reference (a cached result in --out)."""
    import re

    from ddpmkit.run import Run

    run_dir = Path(a.judge_run)
    run = Run.open(run_dir)
    t0 = time.perf_counter()
    row = {"recipe": str(run_dir), **Judge(a.n, a.seed, a.guidance)(str(run_dir))}
    steps = max((int(m.group(1)) for p in (run_dir / "checkpoints").glob("step_*")
                 if (m := re.fullmatch(r"step_(\d+)", p.name))), default=0)
    print(f"{run_dir} ({steps:,} steps, precond {run.precond_sigma_data is not None and 'edm' or 'none'}): FD "
          f"{row['fd']:.2f} +- {row['fd_stderr']:.2f}, features' two-sample accuracy {row['acc']:.3f} +- "
          f"{row['acc_stderr']:.3f}, pixels' {row['px']:.3f} +- {row['px_stderr']:.3f}"
          + (f", agreement {row['agree']:.3f}" if row.get("agree") is not None else "")
          + f" ({time.perf_counter() - t0:.0f} s; {a.n} samples, {SAMPLE_DEFAULT_SAMPLER} {sampler_steps()} steps, "
          f"guidance {a.guidance:g}, seed {a.seed})")
    res_path = Path(a.out) / "results.json"
    results = json.loads(res_path.read_text()).get("results", {}) if res_path.is_file() else {}
    if a.reference:
        name, _, at = a.reference.partition("@")
        ref = next((r for k, r in results.items() if r["recipe"] == name and fmt_s(r["seconds"]) == at
                    and r.get("n") == a.n and r.get("seed") == a.seed and r.get("guidance") == a.guidance), None)
        if ref is None:
            print(f"(no cached {a.reference} result of n = {a.n}, seed {a.seed}, guidance {a.guidance:g} in "
                  f"{res_path})")
        else:
            print(f"the reference {a.reference} ({ref['steps']:,} steps): FD {ref['fd']:.2f} +- "
                  f"{ref['fd_stderr']:.2f}, features' {ref['acc']:.3f} +- {ref['acc_stderr']:.3f}, pixels' "
                  f"{ref['px']:.3f} +- {ref['px_stderr']:.3f}: {'reached' if reaches(row, ref) else 'not reached'}")
    return 0


def result_key(mode: str, name: str, point: float, guidance: float) -> str:
    """Where results.json keeps a result: MODE/RECIPE/POINT/wW, so that one run judged at several guidance weights
    keeps each, whatever ``sample``'s default weight is."""
    return f"{mode}/{name}/{fmt_s(point)}/w{guidance:g}"


def cached(results: dict, key: str, want: dict) -> dict | None:
    """The cached result under ``key`` when it was judged with the settings ``want`` (n, seed, ..., the recipe)."""
    r = results.get(key)
    return r if r is not None and all(r.get(k) == v for k, v in want.items()) else None


def reaches(row: dict, ref: dict) -> bool:
    """Whether a result is no worse than the reference by more than one combined standard error, on all three
    figures (the pixel test's when both have it)."""
    figures = [("fd", "fd_stderr"), ("acc", "acc_stderr")] + ([("px", "px_stderr")] if "px" in row and "px" in ref
                                                              else [])
    return all(row[k] - ref[k] <= math.hypot(row[se], ref[se]) for k, se in figures)


def _floor_text(rr: dict) -> str:
    spread = (f" (mean of {rr['repeats']} other pairs {rr['mean']:.3f}, sd {rr['spread']:.3f})"
              if rr.get("spread") is not None else "")
    return f"{rr['accuracy']:.3f} +- {rr['stderr']:.3f}{spread}"


def table(rows: list[dict], floors: dict) -> str:
    lines = ["| recipe | seconds | steps | ms/step | FD +- se | features' two-sample accuracy +- se | "
             "pixels' two-sample accuracy +- se | agreement |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        secs = fmt_s(r["seconds"]) if r.get("unit", "seconds") == "seconds" else f"({r['train_s']:.0f})"
        px = f"{r['px']:.3f} +- {r['px_stderr']:.3f}" if "px" in r else ""
        agree = f"{r['agree']:.3f}" if r.get("agree") is not None else ""  # not in results judged before it was
        lines.append(f"| {r['recipe']} | {secs} | {r['steps']:,} | "
                     f"{1000 * r['train_s'] / max(r['steps'], 1):.0f} | {r['fd']:.2f} +- {r['fd_stderr']:.2f} | "
                     f"{r['acc']:.3f} +- {r['acc_stderr']:.3f} | {px} | {agree} |")
    h, rr = floors["real_heldout"], floors["real_vs_real"]
    lines.append(f"| real held-out digits (n = {h['n']}) | | | | {h['fd']:.2f} +- {h['fd_stderr']:.2f} | | | |")
    pr = floors.get("pixels_real_vs_real")
    lines.append(f"| real vs real digits (n = {rr['n']}) | | | | | {_floor_text(rr)} | "
                 f"{_floor_text(pr) if pr else ''} | |")
    return "\n".join(lines)


def plot(rows: list[dict], floors: dict, path: Path, mode: str, guidance: float = DEFAULT_GUIDANCE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_steps = mode == "steps"
    x_of = (lambda r: r["steps"]) if by_steps else (lambda r: r["seconds"])
    pixels = any("px" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if pixels else 2, figsize=(16 if pixels else 11, 4.2))
    panels = [("fd", "fd_stderr"), ("acc", "acc_stderr")] + ([("px", "px_stderr")] if pixels else [])
    for name in dict.fromkeys(r["recipe"] for r in rows):
        rs = sorted((r for r in rows if r["recipe"] == name), key=x_of)
        for ax, (k, se) in zip(axes, panels):
            rk = [r for r in rs if k in r]
            ax.errorbar([x_of(r) for r in rk], [r[k] for r in rk], yerr=[r[se] for r in rk], marker="o", capsize=3,
                        label=name)
    h, rr = floors["real_heldout"], floors["real_vs_real"]
    axes[0].axhline(h["fd"], color="k", ls="--", lw=1, label=f"real held-out (n = {h['n']})")
    axes[1].axhline(rr["accuracy"], color="k", ls="--", lw=1, label=f"real vs real (n = {rr['n']})")
    xlabel = "optimizer steps" if by_steps else "training seconds"
    axes[0].set(xlabel=xlabel, ylabel="Frechet distance (digits classifier)", yscale="log", title="FD of the samples")
    axes[1].set(xlabel=xlabel, ylabel="held-out accuracy", title="two-sample test on the classifier's features")
    if pixels:
        pr = floors["pixels_real_vs_real"]
        axes[2].axhline(pr["accuracy"], color="k", ls="--", lw=1, label=f"real vs real (n = {pr['n']})")
        axes[2].set(xlabel=xlabel, ylabel="held-out accuracy", title="two-sample test on the pixels (a CNN)")
    for ax in axes[1:]:
        ax.axhline(0.5, color="grey", ls=":", lw=1)
    for ax in axes:
        ax.set_xticks(sorted({x_of(r) for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n = rows[0]["n"] if rows else 0
    fig.suptitle(f"time to quality, {mode} runs; {n} samples, {SAMPLE_DEFAULT_SAMPLER} {sampler_steps()} steps, "
                 f"guidance {guidance:g}", fontsize=10)
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
    ap.add_argument("--mode", choices=("separate", "one-run", "steps"), default="separate",
                    help="separate (default): an independent run of S seconds for every time point S, its learning "
                         "rate decayed to 0 at S, as the demo trains (sum of --seconds per recipe); one-run: one run "
                         "of the largest S, its EMA weights judged as each smaller S passes: cheaper, but there the "
                         "learning rate has not decayed yet, so early points read worse than runs of that length; "
                         "steps: an independent run of N optimizer steps for every N of --steps (decayed to 0 at "
                         "N), the same runs whatever else the machine is doing")
    ap.add_argument("--steps", default=None, help="with --mode steps: optimizer-step points, comma-separated (e.g. "
                                                  "the steps a quiet machine reaches in --seconds)")
    ap.add_argument("--n", type=int, default=800, help="samples judged per point (default 800)")
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, metavar="W",
                    help=f"the guidance weight of the samples (default {DEFAULT_GUIDANCE:g}, `ddpmkit sample`'s)")
    ap.add_argument("--seed", type=int, default=0, help="noise streams of the samples, the real digits they are "
                                                        "compared with and the folds (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, as the demo: "
                                                              "every core)")
    ap.add_argument("--null-repeats", type=int, default=10, help="draws of real-vs-real pairs for the floor's "
                                                                 "spread (default 10)")
    ap.add_argument("--pixel-repeats", type=int, default=4, help="the same for the pixels' test, which trains a CNN "
                                                                 "per fold (default 4)")
    ap.add_argument("--workdir", default="runs/bench-time-to-quality", help="the training runs")
    ap.add_argument("--out", default="runs/bench-time-to-quality", help="results.json and time_to_quality.png")
    ap.add_argument("--reference", default=None, help="RECIPE@POINT that the others must reach (default: eps at the "
                                                      "largest point)")
    ap.add_argument("--judge-run", default=None, metavar="RUN",
                    help="judge one finished run (e.g. the demo's, runs/demo) as the others are, print it beside "
                         "--reference (from --out's results) and stop; trains nothing")
    ap.add_argument("--table-only", action="store_true", help="print the cached results; train and judge nothing")
    ap.add_argument("--calibrate", action="store_true", help="only the two-sample test on real digits "
                                                             "(--null-repeats draws at --n), and stop")
    a = ap.parse_args(argv)
    if not (math.isfinite(a.guidance) and a.guidance >= 0):
        ap.error(f"--guidance takes a weight >= 0, got {a.guidance:g}")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.calibrate:
        calibrate(a.n, max(a.null_repeats, 2))
        return 0
    if (a.mode == "steps") != (a.steps is not None):
        ap.error("--mode steps takes its points from --steps, and --steps needs --mode steps")
    points = a.steps if a.mode == "steps" else a.seconds
    try:
        seconds = sorted({float(s) for s in points.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--seconds and --steps take numbers, got {points!r}")
    if a.judge_run:
        return judge_one(a)
    names = [s.strip() for s in a.recipes.split(",") if s.strip()]
    bad = [s for s in names if not known_recipe(s)]
    if bad or not names or not seconds or seconds[0] <= 0:
        ap.error(f"unknown recipe(s) {', '.join(bad)}: choose from {', '.join(RECIPES)}" if bad
                 else "give at least one recipe and positive --seconds")
    work, out = Path(a.workdir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    store = json.loads(res_path.read_text()) if res_path.is_file() else {}
    results = store.setdefault("results", {})

    t_start = time.perf_counter()
    judge = Judge(a.n, a.seed, a.guidance)
    settings = judge.settings()
    unit = "steps" if a.mode == "steps" else "seconds"
    floor_key = {"n": a.n, "seed": a.seed, "null_repeats": a.null_repeats, "pixel_repeats": a.pixel_repeats,
                 "two_sample": TWO_SAMPLE, "pixel_test": PIXEL_TEST}
    old = store.get("floors", {})
    if all(old.get(k) == v for k, v in floor_key.items()) and "pixels_real_vs_real" in old:
        floors = old  # measured already with these settings (the pixels' test takes a while)
    else:
        floors = judge.floors(a.null_repeats, a.pixel_repeats)
    store["floors"] = {**floors, **floor_key}
    rr = floors["real_vs_real"]
    h = floors["real_heldout"]
    print(f"floors: the {h['n']} real held-out digits, FD {h['fd']:.2f} +- {h['fd_stderr']:.2f}; real against real "
          f"digits (n = {rr['n']} each), two-sample accuracy {rr['accuracy']:.3f} +- {rr['stderr']:.3f}"
          + (f" (over {rr['repeats']} draws: mean {rr['mean']:.3f}, spread {rr['spread']:.3f})"
             if rr["spread"] is not None else "") + f"; on the pixels {_floor_text(floors['pixels_real_vs_real'])}",
          flush=True)

    def save():
        res_path.write_text(json.dumps(store, indent=1))

    rows = []
    for name in names:
        overrides = jsonable(recipe_overrides(name))
        want = {**settings, "overrides": overrides}
        key = partial(result_key, a.mode, name, guidance=a.guidance)
        found = {s: cached(results, key(s), want) for s in seconds}
        if a.table_only:
            rows += [r for r in found.values() if r is not None]
            continue
        missing = [s for s in seconds if found[s] is None]
        if missing and a.mode == "one-run":
            points = train_one_run(name, seconds, work)
        for s in missing:
            p = points[fmt_s(s)] if a.mode == "one-run" else train_separate(name, s, work, unit)
            row = {"recipe": name, "mode": a.mode, "seconds": s, "unit": unit, **want, "steps": p["steps"],
                   "train_s": p["train_s"], "params": p["params"], "threads": p["threads"], "run": p["path"],
                   **judge(p["path"])}
            results[key(s)] = found[s] = row
            save()
            print(f"[{name} {fmt_s(s)}{UNITS[unit]}] {row['steps']} steps: FD {row['fd']:.2f} +- "
                  f"{row['fd_stderr']:.2f}, two-sample accuracy {row['acc']:.3f} +- {row['acc_stderr']:.3f}, on the "
                  f"pixels {row['px']:.3f} +- {row['px_stderr']:.3f} (judged in {row['judge_s']:.0f} s, sampling "
                  f"{row['sample_s']:.0f} s)", flush=True)
        rows += [found[s] for s in seconds]
    save()
    print()
    print(f"{a.mode} runs; {a.n} samples each ({SAMPLE_DEFAULT_SAMPLER}, {sampler_steps()} steps, guidance "
          f"{a.guidance:g}), seed {a.seed}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(table(rows, floors))
    if rows:
        plot(rows, floors, out / "time_to_quality.png", a.mode, a.guidance)
        print(f"\nresults: {res_path}\nplot:    {out / 'time_to_quality.png'}")
    ref_name, _, ref_at = (a.reference or f"eps@{fmt_s(max(seconds))}").partition("@")
    ref = next((r for r in [*rows, *results.values()] if r["recipe"] == ref_name and fmt_s(r["seconds"]) == ref_at
                and r.get("unit", "seconds") == unit and all(r.get(k) == v for k, v in settings.items())), None)
    print()
    if ref is None:
        print(f"(no {ref_name} run of {ref_at}{UNITS[unit]} among these results: nothing to compare with)")
    else:
        print(f"the reference: {ref_name} at {ref_at}{UNITS[unit]}, FD {ref['fd']:.2f} +- {ref['fd_stderr']:.2f}, "
              f"two-sample accuracy {ref['acc']:.3f} +- {ref['acc_stderr']:.3f}, on the pixels "
              f"{ref['px']:.3f} +- {ref['px_stderr']:.3f}")
        for name in dict.fromkeys(r["recipe"] for r in rows):
            hit = next((r for r in sorted((r for r in rows if r["recipe"] == name), key=lambda r: r["seconds"])
                        if reaches(r, ref)), None)
            print(f"{name}: " + (f"reaches it at {fmt_s(hit['seconds'])}{UNITS[unit]} ({hit['steps']:,} steps; FD "
                                 f"{hit['fd']:.2f}, accuracy {hit['acc']:.3f}, on the pixels {hit['px']:.3f})"
                                 if hit is not None else "does not reach it at these points"))
    print(f"\n({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
