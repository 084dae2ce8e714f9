"""Are the demo's digits recognizable? Judge its DDPM and DDIM samples with a classifier of the real digits.

Runs ``ddpmkit demo --out <dir> --quiet`` (or takes a finished demo folder with ``--dir``), then judges
``samples_ddpm/`` and ``samples_ddim/`` with the independent judge of ``bench/digits_judge.py`` (a small
CNN trained on the real digits only, cached after its first training) and prints its table: the real and
noise reference rows first, then the two samplers. The last line gives the Frechet distance in the
judge's feature space ("FDD", lower is better) of the DDIM and of the DDPM samples. When the demo fails
after writing its samples (in a later plotting step, say), the samples are still judged and the exit status
is 1.

A Frechet distance from N samples is biased upwards by about 1/N: read the samplers' FD against the
"real, n=N" row (N held-out real digits), not against the 359-digit "real (held out)" row. More samples
(``--n``) make the numbers steadier, at the cost of sampling time (DDPM takes 1000 network calls).

    python bench/bench_digits_quality.py [--train-seconds 180] [--n 64] [--out DIR]
    python bench/bench_digits_quality.py --dir runs/demo
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_judge as dj  # noqa: E402

from ddpmkit.metrics.digits import DEFAULT_EPOCHS, DEFAULT_SEED, DigitsError  # noqa: E402

# the demo's folders: DPM-Solver++(2M) SDE and DDIM since issue 19 (DDPM before it)
SAMPLERS = (("DDPM", "samples_ddpm"), ("DPM++2M-SDE", "samples_dpmpp-2m-sde"), ("DDIM", "samples_ddim"))


def run_demo(out: Path, train_seconds: float | None, n: int | None) -> int:
    """Run ``ddpmkit demo`` into ``out``; return its exit status."""
    cmd = [sys.executable, "-m", "ddpmkit", "demo", "--out", str(out), "--quiet"]
    if train_seconds is not None:
        cmd += ["--train-seconds", str(train_seconds)]
    if n is not None:
        cmd += ["--n", str(n)]
    print("running: " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    print(f"demo {'finished' if rc == 0 else f'exited with status {rc}'} after {time.perf_counter() - t0:.0f} s",
          flush=True)
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description="Train the demo (or take a finished one) and judge its DDPM and "
                                            "DDIM samples with a classifier trained on the real digits.")
    p.add_argument("--dir", default=None, help="a finished demo folder (with samples_ddpm/ and samples_ddim/); "
                                               "skips running the demo")
    p.add_argument("--out", default=None, help="where to run the demo (default: a new temporary folder, kept)")
    p.add_argument("--train-seconds", type=float, default=None, help="passed to ddpmkit demo")
    p.add_argument("--n", type=int, default=None, help="samples per sampler, passed to ddpmkit demo")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the judge")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs of the judge")
    p.add_argument("--cache-dir", default=None, help="judge cache (default $DDPMKIT_CACHE or ~/.cache/ddpmkit)")
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error("--epochs must be at least 1")
    if a.dir is not None and (a.out is not None or a.train_seconds is not None or a.n is not None):
        p.error("--dir judges a finished demo; --out, --train-seconds and --n are for running one")
    demo_rc = 0
    try:
        if a.dir is not None:
            root = Path(a.dir).expanduser()
            if not root.is_dir():
                raise DigitsError(f"no such directory: {root}")
        else:
            root = Path(a.out).expanduser() if a.out else Path(tempfile.mkdtemp(prefix="ddpmkit-quality-")) / "demo"
            if root.exists() and any(root.iterdir()):
                raise DigitsError(f"{root} is not empty; give an empty or new folder, or judge it with --dir")
            demo_rc = run_demo(root, a.train_seconds, a.n)
        found = [(name, root / sub) for name, sub in SAMPLERS
                 if (root / sub).is_dir() and any((root / sub).glob("*.png"))]
        if not found:
            raise DigitsError(f"no samples in {root}/samples_ddpm/ or {root}/samples_ddim/"
                                + (f" (ddpmkit demo exited with status {demo_rc})" if demo_rc else ""))
        _, rows = dj.judge_dirs([d for _, d in found], labels=[f"{name} ({d.name})" for name, d in found],
                                    seed=a.seed, epochs=a.epochs, cache_dir=a.cache_dir)
    except DigitsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"demo folder: {root}")
    print(dj.format_table(rows))
    fd = {name: row.fd for (name, _), row in zip(found, rows[-len(found):])}
    print("FD  " + "  ".join(f"{name} {fd[name]:.3f}" for name in ("DDIM", "DDPM", "DPM++2M-SDE") if name in fd))
    return 1 if demo_rc else 0  # samples written before a later step of the demo failed are still judged


if __name__ == "__main__":
    sys.exit(main())
