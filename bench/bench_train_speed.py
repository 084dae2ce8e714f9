"""Time per training step of the demo's recipe and its neighbours, measured side by side in one process.

    python bench/bench_train_speed.py                     # interleaved rounds of train_step(), ms/step and ratios
    python bench/bench_train_speed.py --timed 60          # whole timed runs (Trainer.run with --time-limit 60),
                                                          # alternating, as the demo trains: steps reached
    python bench/bench_train_speed.py --variants demo,digits-b32 --rounds 10

Each variant is a TrainConfig on top of the demo's (``config_from_preset("digits", class_cond=True, ...)``, as
``ddpmkit demo`` builds it):

- ``demo``: the demo's recipe (``ddpmkit.demo.DEMO_RECIPE``): EDM, batch 48, one ResNet block a level;
- ``demo-unfused``: the same with torch's per-tensor Adam instead of the loop's fused one (``make_adam``);
- ``demo-b32``: the same at batch 32 (the 90-second demo's recipe);
- ``digits-b32``: EDM at batch 32 with the digits preset's two ResNet blocks a level;
- ``demo-before``: the 120-second demo (EDM, batch 128, two blocks), with the fused Adam.

Default mode: every variant is built first (its data, network and optimizer) and warmed up by ``--warmup`` steps;
then ``--rounds`` rounds run ``--steps`` optimizer steps of each variant in turn, so that a change in the machine's
speed hits them alike. The median over the rounds gives each variant's ms/step, and its ratio to the first variant;
"steps in 60 s" is 60 s over that median (the loop's own work between steps, about 2% here, is left out).

``--timed S``: ``--rounds`` rounds of one whole run of each variant with ``--time-limit S`` (the demo's loop:
its measurements of quality included, every ``DEMO_EVAL_EVERY`` steps), in turn; the steps each run reached,
their median and range. This is what the demo's time is: a shared machine drifts (here by up to a third over a
few minutes), so the ratios of the default mode are the steadier figure and the timed runs the direct one.
The 1-minute load average is printed at the start and the end: other processes slow multi-threaded timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmkit.demo import DEMO_EVAL_EVERY, DEMO_RECIPE  # noqa: E402
from ddpmkit.train import Trainer, config_from_preset  # noqa: E402
from ddpmkit.train import loop as train_loop  # noqa: E402

VARIANTS: dict[str, dict] = {
    "demo": dict(DEMO_RECIPE),
    "demo-unfused": dict(DEMO_RECIPE, _unfused=True),
    "demo-b32": dict(DEMO_RECIPE, batch_size=32),
    "digits-b32": dict(DEMO_RECIPE, batch_size=32, num_res_blocks=2),
    "demo-before": dict(DEMO_RECIPE, num_res_blocks=2, batch_size=128),
}


def build(name: str, run_dir: Path, **settings) -> Trainer:
    over = dict(VARIANTS[name])
    unfused = over.pop("_unfused", False)
    cfg = config_from_preset("digits", class_cond=True, steps=1_000_000, sample_every=1_000_000,
                             checkpoint_every=1_000_000, num_samples=0, **{**over, **settings})
    if not unfused:
        return Trainer(cfg, run_dir, quiet=True)
    make = train_loop.make_adam
    train_loop.make_adam = lambda params, **kw: torch.optim.Adam(params, **kw)  # torch's default implementation
    try:
        return Trainer(cfg, run_dir, quiet=True)
    finally:
        train_loop.make_adam = make


def load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def interleaved(names: list[str], rounds: int, steps: int, warmup: int) -> None:
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            trainers[name] = tr = build(name, Path(tmp) / name, eval_every=0)
            for _ in range(warmup):
                tr.train_step()
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(rounds):
            for name, tr in trainers.items():
                t = time.perf_counter()
                for _ in range(steps):
                    tr.train_step()
                times[name].append(1000 * (time.perf_counter() - t) / steps)
    base = statistics.median(times[names[0]])
    print(f"| variant | batch | ResNet blocks | ms/step (median) | range | ratio to {names[0]} | steps in 60 s |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for name in names:
        v, cfg = times[name], trainers[name].cfg
        m = statistics.median(v)
        print(f"| {name} | {cfg.batch_size} | {cfg.num_res_blocks} | {m:.1f} | {min(v):.1f}-{max(v):.1f} | "
              f"{m / base:.2f} | {60_000 / m:,.0f} |")


def timed(names: list[str], rounds: int, seconds: float) -> None:
    reached: dict[str, list[int]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name in names:
                tr = build(name, Path(tmp) / f"{name}-{r}", time_limit=seconds, eval_every=DEMO_EVAL_EVERY)
                res = tr.run()
                reached[name].append(res["step"])
                print(f"round {r + 1}: {name}: {res['step']} steps in {res['seconds']:.1f} s "
                      f"({res.get('eval_seconds', 0.0):.1f} s of it measuring quality)", flush=True)
    print(f"| variant | steps in {seconds:g} s (median) | range |")
    print("| --- | ---: | --- |")
    for name in names:
        v = reached[name]
        print(f"| {name} | {statistics.median(v):,.0f} | {min(v):,}-{max(v):,} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=25, help="timed steps of a variant per round (default 25)")
    ap.add_argument("--warmup", type=int, default=15, help="untimed steps of each variant first (default 15)")
    ap.add_argument("--timed", type=float, default=None, metavar="S",
                    help="whole runs of S seconds instead, as the demo trains")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, every core)")
    a = ap.parse_args(argv)
    names = [s.strip() for s in a.variants.split(",") if s.strip()]
    bad = [s for s in names if s not in VARIANTS]
    if bad or not names:
        ap.error(f"unknown variant(s) {', '.join(bad)}: choose from {', '.join(VARIANTS)}")
    if a.rounds < 1 or a.steps < 1 or a.warmup < 0 or (a.timed is not None and a.timed <= 0):
        ap.error("--rounds and --steps take a positive number, --warmup one >= 0, --timed positive seconds")
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load()}", flush=True)
    if a.timed:
        timed(names, a.rounds, a.timed)
    else:
        interleaved(names, a.rounds, a.steps, a.warmup)
    print(f"load average at the end {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
