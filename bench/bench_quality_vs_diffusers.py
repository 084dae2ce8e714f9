"""Quality per CPU-minute on the digits: ddpmkit's digits preset against a diffusers model of the same size.

    python bench/bench_quality_vs_diffusers.py                        # budgets of 5 and 20 CPU-minutes
    python bench/bench_quality_vs_diffusers.py --minutes 0.5 --n 64   # a quick smoke test (about a minute)
    python bench/bench_quality_vs_diffusers.py --sequential --threads 2   # one after the other, 2 threads each

Both contenders train on the 1,797 embedded digits at 16x16 (``ddpmkit.data.load_dataset("digits")``, batches
from ``ddpmkit.data.Batcher`` for both, no flips) for the same budget of CPU time, and the EMA weights at each
budget in ``--minutes`` are kept (one run per contender gives every budget). Afterwards each snapshot draws
``--n`` samples with DDIM (``--steps`` steps, eta 0, clipped x0) from the same x_T, and the independent
digits judge (``bench/digits_judge.py``, a CNN trained on the real digits only) gives their Frechet distance
FD in its feature space, lower is better. An FD from N samples is biased upwards by about 1/N, so both
contenders use the same N, and the "real, n=N" row gives the floor at that N.

* ddpmkit: ``Trainer`` with ``config_from_preset("digits")`` (267,313 parameters; Adam lr 2e-3 with a 50-step
  warm-up, batch 32, gradient clipping 1.0, EMA 0.995 with warm-up), stepped with ``Trainer.train_step``,
  as ``ddpmkit train --preset digits`` runs it; sampled with ddpmkit's DDIM sampler.
* diffusers: ``UNet2DModel`` with block_out_channels (16, 32, 32), one layer per block, DownBlock2D and
  UpBlock2D x3, 8 norm groups (267,313 parameters too, with its mid-block attention, as ours has), trained the
  way diffusers' unconditional training example trains: AdamW lr 1e-4, betas (0.95, 0.999), weight decay
  1e-6, eps 1e-8; a cosine learning-rate schedule after a 500-step linear warm-up, decaying to 0 at the end of
  the largest budget (its length in steps is estimated from the measured step rate, re-estimated every 200
  steps, and the decay holds at 0 past it); ``EMAModel`` with warm-up (inv_gamma 1, power 3/4, max decay
  0.9999); ``DDPMScheduler`` (1000 linear steps) ``add_noise``; batch 16; eps-MSE loss; gradient clipping
  1.0. Sampled with ``DDIMScheduler`` steps over the EMA weights.

The budgets count the CPU time of the training steps (``time.process_time`` of the process, with one torch
thread each: CPU-minutes) unless ``--clock wall``; sampling and judging are not counted. By default the two
contenders train at the same time, each in its own process pinned to its own core
(``os.sched_setaffinity``) with ``torch.set_num_threads(1)``: that is fair (one core each) and halves the
wall time. ``--sequential`` runs them one after the other with ``--threads`` threads each (then the CPU
clock counts every thread's time). The last line is the ratio of the FDs, ours over diffusers', at each
budget (below 1: ours is better).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

CONTENDERS = ("ddpmkit", "diffusers")
IMAGE_SHAPE = (1, 16, 16)

# diffusers' unconditional training example, its defaults
PEER_LR, PEER_BETAS, PEER_WEIGHT_DECAY, PEER_EPS, PEER_WARMUP, PEER_BATCH = 1e-4, (0.95, 0.999), 1e-6, 1e-8, 500, 16
PEER_EMA = dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
PEER_UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=8)


def parse_minutes(text: str) -> list[float]:
    try:
        mins = sorted({float(m) for m in text.split(",") if m.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--minutes takes numbers separated by commas, got {text!r}") from None
    if not mins or mins[0] <= 0 or not all(math.isfinite(m) for m in mins):
        raise argparse.ArgumentTypeError(f"--minutes needs positive budgets, got {text!r}")
    return mins


def log(name: str, msg: str) -> None:
    print(f"  [{name}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The two contenders, each run in its own process


class Ours:
    """ddpmkit's digits preset, stepped by its Trainer."""

    def __init__(self, seed: int, run_dir: Path):
        from ddpmkit.train import Trainer, config_from_preset

        big = 10 ** 9  # the budget ends the run; no checkpoints or sample grids on the way
        # the digits recipe this comparison was made with (16x16, width 16, batch 32), pinned since issue 19 moved
        # the preset to 8x8 (bench/bench_demo_recipe.py's "old16"), so that diffusers' twin stays the same network
        old16 = dict(image_size=16, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, batch_size=32,
                     warmup=50, lr_decay="none", ema_decay=0.995)
        self.cfg = config_from_preset("digits", device="cpu", seed=seed, steps=big, checkpoint_every=big,
                                      sample_every=big, log_every=big, num_samples=0, **old16)
        self.trainer = Trainer(self.cfg, run_dir, quiet=True, log=lambda m: log("ddpmkit", m))
        self.batch_size = self.cfg.batch_size
        self.params = self.trainer.model.num_parameters()

    def step(self) -> None:
        self.trainer.train_step()

    def snapshot(self):
        return copy.deepcopy(self.trainer.ema.state_dict())

    def sample(self, snap, x_T: torch.Tensor, steps: int) -> torch.Tensor:
        from ddpmkit.diffusion import Denoiser
        from ddpmkit.samplers import sample
        from ddpmkit.models.unet import UNet

        model = UNet(**self.cfg.model_config()).eval()
        model.load_state_dict(snap)
        return sample(Denoiser(model, self.trainer.schedule), x_T, sampler="ddim", steps=steps, eta=0.0)


class Peer:
    """diffusers' UNet2DModel trained with the recipe of diffusers' unconditional training example."""

    def __init__(self, seed: int, max_budget_s: float, clock):
        import torch.nn.functional as F
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel

        from ddpmkit.data import Batcher, load_dataset

        torch.manual_seed(seed)
        self.F = F
        self.model = UNet2DModel(**PEER_UNET).train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=PEER_LR, betas=PEER_BETAS,
                                     weight_decay=PEER_WEIGHT_DECAY, eps=PEER_EPS)
        self.total_steps = None  # the cosine decay's length, estimated from the step rate
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        self.ema = EMAModel(self.model.parameters(), **PEER_EMA)
        data = load_dataset("digits", image_size=IMAGE_SHAPE[1], progress=False)
        self.batch_size = PEER_BATCH
        self.batcher = Batcher(data.images, PEER_BATCH, flip=False, seed=seed)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.steps = 0
        self.max_budget_s, self.clock = max_budget_s, clock
        self.mark = (0, None)  # (step, clock) where the current rate window began

    def lr_factor(self, step: int) -> float:
        if step < PEER_WARMUP:
            return step / PEER_WARMUP
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - PEER_WARMUP) / max(1, self.total_steps - PEER_WARMUP))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def estimate_total(self, used_s: float) -> None:
        step0, c0 = self.mark
        now = self.clock()
        if c0 is not None and self.steps > step0:
            per_step = (now - c0) / (self.steps - step0)
            self.total_steps = self.steps + max(0, int((self.max_budget_s - used_s) / per_step))
        self.mark = (self.steps, now)

    def step(self) -> None:
        x0 = self.batcher.next_batch()
        noise = torch.randn(x0.shape, generator=self.gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=self.gen)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        loss = self.F.mse_loss(self.model(x_t, t).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.step(self.model.parameters())
        self.steps += 1

    def snapshot(self):
        snap = copy.deepcopy(self.model).eval()
        self.ema.copy_to(snap.parameters())
        return snap

    def sample(self, snap, x_T: torch.Tensor, steps: int) -> torch.Tensor:
        from bench_sampling_vs_diffusers import diffusers_sampler

        return diffusers_sampler(snap, steps)(x_T)


def worker(args) -> None:
    name = args.worker
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(args.threads)
    if name == "diffusers":
        from bench_train_vs_diffusers import quiet_diffusers

        quiet_diffusers()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    budgets = [m * 60.0 for m in args.minutes]
    with tempfile.TemporaryDirectory(prefix="ddpmkit-quality-") as tmp:
        c = Ours(args.seed, Path(tmp) / "run") if name == "ddpmkit" else Peer(args.seed, budgets[-1], clock)
        where = f"core {args.core}" if args.core is not None else "any core"
        log(name, f"{c.params:,} parameters, batch {c.batch_size}, {torch.get_num_threads()} thread(s) on {where}")
        snaps, used, steps, wall0 = [], 0.0, 0, time.perf_counter()
        while len(snaps) < len(budgets):
            c0 = clock()
            c.step()
            used += clock() - c0
            steps += 1
            if name == "diffusers" and (steps == 50 or steps % 200 == 0):
                c.estimate_total(used)
            if used >= budgets[len(snaps)]:
                snaps.append((args.minutes[len(snaps)], steps, used, time.perf_counter() - wall0, c.snapshot()))
                log(name, f"{snaps[-1][0]:g} min budget: {steps} steps ({steps * c.batch_size} images) in "
                          f"{used:.0f} s {args.clock} time, {snaps[-1][3]:.0f} s wall")
        x_T = torch.randn((args.n, *IMAGE_SHAPE), generator=torch.Generator().manual_seed(args.seed + 1000))
        out = []
        for minutes, steps, used, wall, snap in snaps:
            t0 = time.perf_counter()
            x = c.sample(snap, x_T, args.steps)
            out.append(dict(minutes=minutes, steps=steps, images=steps * c.batch_size, clock_s=used, wall_s=wall,
                            sample_s=time.perf_counter() - t0,
                            samples=((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)))
    torch.save({"name": name, "params": c.params, "snapshots": out}, args.result)


# --------------------------------------------------------------------------------------------------
# The parent


def launch(name: str, args, core, result: Path, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", str(result),
           "--minutes", ",".join(f"{m:g}" for m in args.minutes), "--n", str(args.n), "--steps", str(args.steps),
           "--threads", str(threads), "--seed", str(args.seed), "--clock", args.clock]
    if core is not None:
        cmd += ["--core", str(core)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen(cmd, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=parse_minutes, default=parse_minutes("5,20"),
                   help="training budgets in minutes, comma-separated (default 5,20)")
    p.add_argument("--n", type=int, default=256, help="samples per snapshot (default 256)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--sequential", action="store_true", help="train one after the other, not concurrently")
    p.add_argument("--threads", type=int, default=1, help="torch threads per contender with --sequential (default 1)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="what the budget counts: process CPU time (default) or wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--core", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.n < 2 or not 1 <= args.steps <= 1000 or args.threads < 1:
        p.error("--n must be at least 2, --steps in [1, 1000], --threads positive")

    import digits_judge as dj
    from digits_tools import evaluate, reference_rows

    from ddpmkit.metrics.digits import DigitsClassifier

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    concurrent = not args.sequential and len(cores) >= 2
    how = (f"concurrently, pinned to cores {cores[0]} and {cores[1]}, 1 thread each" if concurrent else
           f"one after the other, {args.threads} thread(s) each")
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}")
    print(f"budgets {', '.join(f'{m:g}' for m in args.minutes)} min of {args.clock} time; contenders train {how}; "
          f"then DDIM {args.steps} steps for {args.n} samples from each snapshot's EMA weights", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddpmkit-quality-") as tmp:
        paths = {name: Path(tmp) / f"{name}.pt" for name in CONTENDERS}
        if concurrent:
            procs = [launch(name, args, core, paths[name], 1) for name, core in zip(CONTENDERS, cores)]
            codes = [pr.wait() for pr in procs]
        else:
            codes = [launch(name, args, None, paths[name], args.threads).wait() for name in CONTENDERS]
        if any(codes):
            print(f"error: a contender failed (exit statuses {codes})", file=sys.stderr)
            return 1
        res = {name: torch.load(paths[name]) for name in CONTENDERS}
    print(f"training and sampling took {time.perf_counter() - t0:.0f} s wall; load average {os.getloadavg()[0]:.2f}")

    judge = DigitsClassifier.load_or_train(log=lambda m: print(m, file=sys.stderr))
    dj.describe_classifier(judge)
    rows, fd = reference_rows(judge, ns=[args.n]), {}
    for i, minutes in enumerate(args.minutes):
        for name in CONTENDERS:
            s = res[name]["snapshots"][i]
            label = f"{name} {minutes:g} min: {s['steps']} steps, {s['images']} images"
            rows.append(evaluate(judge, s["samples"], label))
            fd[name, minutes] = rows[-1].fd
    print(f"ddpmkit {res['ddpmkit']['params']:,} parameters, diffusers {res['diffusers']['params']:,} parameters")
    print(dj.format_table(rows))
    print("FD ours/diffusers " + ", ".join(f"at {m:g} min = {fd['ddpmkit', m] / fd['diffusers', m]:.2f}"
                                            for m in args.minutes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
