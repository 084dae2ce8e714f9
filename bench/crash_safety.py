"""Crash safety of training: SIGKILL at random moments, resume, and compare with an uninterrupted run.

Starts real training through the command line (``python -m ddpmkit train``) on a tiny configuration, kills
it with SIGKILL K times at seeded random moments, resuming with ``--resume`` after each kill. After every
kill, each checkpoint on disk is verified (SHA-256 of every file) and the latest is loaded; the steps lost
are the last step the killed process had finished (its last metrics.csv row, written every step) minus the
step of the checkpoint the resume starts from, and must not exceed the checkpoint interval. Then the run is
finished and its final weights, EMA and optimizer state are compared with an uninterrupted run of the same
configuration and seed (bit-identical on the CPU: a checkpoint holds every random state and the data order).

    OMP_NUM_THREADS=1 python bench/crash_safety.py [--kills 20] [--steps 600] [--checkpoint-every 2]
                                                   [--max-delay 2.0] [--seed 0] [--keep 3] [--workdir DIR]

A kill lands a random time (uniform in [0, --max-delay] s) after the process has shown progress past the
step it started from and at least one checkpoint exists (a run killed before its first checkpoint has
nothing to resume: it is started again from scratch, as a user would). The last line is the summary.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ddpmkit.store.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint  # noqa: E402
from ddpmkit.errors import CheckpointError  # noqa: E402

TINY = ["--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
        "--num-groups", "4", "--T", "40", "--batch-size", "8", "--sample-every", "100000",
        "--num-samples", "0", "--sample-steps", "5", "--log-every", "1", "--dropout", "0.1", "--quiet"]


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _cmd(out: Path, steps: int, checkpoint_every: int, seed: int, resume: bool, keep: int = 3) -> list[str]:
    cmd = [sys.executable, "-m", "ddpmkit", "train", "--out", str(out), "--steps", str(steps),
           "--checkpoint-every", str(checkpoint_every), "--seed", str(seed), "--keep", str(keep)] + TINY
    return cmd + (["--resume"] if resume else [])


def _last_logged_step(run: Path) -> int:
    """The step of the last complete metrics.csv row (-1 when there is none)."""
    try:
        text = (run / "metrics.csv").read_text()
    except OSError:
        return -1
    last = -1
    for line in text.splitlines()[1:] if text.endswith("\n") else text.splitlines()[1:-1]:
        try:
            last = int(line.split(",", 1)[0])
        except ValueError:
            pass
    return last


def _check_all(run: Path) -> tuple[int, int]:
    """(checkpoints on disk, unreadable ones): every one verified, the latest fully loaded."""
    cks = list_checkpoints(run)
    bad = 0
    for p in cks:
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            print(f"  UNREADABLE {p}: {e}")
            bad += 1
    return len(cks), bad


def _states_equal(a, b) -> tuple[bool, float]:
    eq, diff = True, 0.0
    pairs = [(a.model_state, b.model_state), (a.ema_state, b.ema_state)]
    for sa, sb in pairs:
        for k in sa:
            if not torch.equal(sa[k], sb[k]):
                eq = False
                diff = max(diff, (sa[k].double() - sb[k].double()).abs().max().item())
    for i, st in a.optimizer_state["state"].items():
        for name, v in st.items():
            w = b.optimizer_state["state"][i][name]
            if not torch.equal(v, w):
                eq = False
                if v.is_floating_point():
                    diff = max(diff, (v.double() - w.double()).abs().max().item())
    return eq, diff


def run_crash_safety(workdir: Path, *, kills: int = 20, steps: int = 800, checkpoint_every: int = 2,
                     max_delay: float = 2.0, seed: int = 0, keep: int = 3, log=print) -> dict:
    workdir = Path(workdir)
    rng = random.Random(seed)
    env = _env()
    straight, crashed = workdir / "straight", workdir / "crashed"
    for d in (straight, crashed):
        if d.exists():
            shutil.rmtree(d)

    t0 = time.perf_counter()
    r = subprocess.run(_cmd(straight, steps, checkpoint_every, seed, False), env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {r.stderr.strip()}")
    log(f"uninterrupted run: {steps} steps in {time.perf_counter() - t0:.1f} s")

    lost: list[int] = []
    resumes_ok = unreadable = restarts = 0
    started_from = 0
    seen = 0  # the furthest step a process has logged so far; a resume must get past it to count
    done_early = False
    for k in range(kills):
        resume = crashed.exists()
        proc = subprocess.Popen(_cmd(crashed, steps, checkpoint_every, seed, resume, keep), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if _last_logged_step(crashed) > max(seen, started_from) and list_checkpoints(crashed):
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            err = proc.stderr.read().strip()
            if proc.returncode != 0:
                raise RuntimeError(f"kill {k + 1}: training exited with {proc.returncode} before the kill: {err}")
            done_early = True
            log(f"kill {k + 1}: the run finished before it could be killed; increase --steps")
            break
        if resume:
            resumes_ok += 1  # it got past loading the checkpoint and trained on
        time.sleep(rng.uniform(0.0, max_delay))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        if proc.returncode != -signal.SIGKILL:  # it finished just before the signal
            done_early = True
            log(f"kill {k + 1}: the run finished before the signal; increase --steps")
            break
        progress = _last_logged_step(crashed)
        seen = progress
        n_ck, bad = _check_all(crashed)
        unreadable += bad
        try:
            ck = load_checkpoint(crashed)  # the one a resume starts from (verified)
            resumed_from = ck.step
        except CheckpointError as e:
            log(f"kill {k + 1}: no checkpoint to resume from ({e}); starting again")
            shutil.rmtree(crashed)
            restarts += 1
            resumed_from = seen = 0
        lost.append(max(progress, 0) - resumed_from)
        started_from = resumed_from
        log(f"kill {k + 1:2d}: last step done {progress:4d}, resumes from {resumed_from:4d} "
            f"(lost {lost[-1]}), {n_ck} checkpoints on disk, {bad} unreadable")

    r = subprocess.run(_cmd(crashed, steps, checkpoint_every, seed, crashed.exists(), keep), env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the final resume failed: {r.stderr.strip()}")
    if lost:
        resumes_ok += 1
    n_ck, bad = _check_all(crashed)
    unreadable += bad
    a, b = load_checkpoint(straight), load_checkpoint(crashed)
    equal, diff = _states_equal(a, b)
    res = {
        "kills": len(lost), "resumes": len(lost), "resumes_ok": resumes_ok, "restarts": restarts,
        "unreadable": unreadable, "max_lost": max(lost, default=0),
        "mean_lost": sum(lost) / len(lost) if lost else 0.0, "checkpoint_every": checkpoint_every,
        "final_steps": (a.step, b.step), "equal": equal and a.step == b.step, "max_abs_diff": diff,
        "done_early": done_early, "seconds": time.perf_counter() - t0,
    }
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--max-delay", type=float, default=2.0, help="seconds; kill delay is uniform in [0, this]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (a kill can land in the pruning)")
    p.add_argument("--workdir", default=None, help="where the two runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = None
    workdir = Path(args.workdir) if args.workdir else Path(tmp := tempfile.mkdtemp(prefix="crash_safety-"))
    try:
        r = run_crash_safety(workdir, kills=args.kills, steps=args.steps, checkpoint_every=args.checkpoint_every,
                             max_delay=args.max_delay, seed=args.seed, keep=args.keep)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    ok = (r["resumes_ok"] == r["resumes"] and r["unreadable"] == 0 and r["max_lost"] <= r["checkpoint_every"]
          and r["equal"] and not r["done_early"])
    print(f"kills:                  {r['kills']}")
    print(f"resumes succeeded:      {r['resumes_ok']}/{r['resumes']} (restarts from scratch: {r['restarts']})")
    print(f"unreadable checkpoints: {r['unreadable']}")
    print(f"steps lost per kill:    max {r['max_lost']}, mean {r['mean_lost']:.2f} "
          f"(checkpoint interval {r['checkpoint_every']})")
    print(f"final weights equal:    {'yes' if r['equal'] else 'no'} (max abs diff {r['max_abs_diff']:.3g}, "
          f"steps {r['final_steps'][0]} vs {r['final_steps'][1]})")
    print(f"{'PASS' if ok else 'FAIL'}: {r['kills']} SIGKILLs, {r['resumes_ok']}/{r['resumes']} resumes, "
          f"{r['unreadable']} unreadable checkpoints, max {r['max_lost']} steps lost "
          f"(<= {r['checkpoint_every']}), final weights {'bit-identical' if r['equal'] else 'DIFFERENT'}, "
          f"{r['seconds']:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
