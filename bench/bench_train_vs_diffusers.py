"""Training throughput of the 35.7M-parameter CIFAR-10 U-Net: ddpmkit's against diffusers' UNet2DModel.

    python bench/bench_train_vs_diffusers.py                          # batch 16, all cores, 3 rounds of 5 steps
    python bench/bench_train_vs_diffusers.py --rounds 2 --steps 2 --warmup 1 --threads 1   # a quick smoke test
    python bench/bench_train_vs_diffusers.py --channels-last          # ddpmkit's model in channels_last
    python bench/bench_train_vs_diffusers.py --compile                # ddpmkit's model under torch.compile
    python bench/bench_train_vs_diffusers.py --channels-last --peer-levers   # the same lever on both sides

The peer is diffusers' ``UNet2DModel`` in the configuration of google/ddpm-cifar10-32 (35,746,307 parameters,
the same count as ``unet_from_preset("cifar10")``), trained with its own ``DDPMScheduler.add_noise``. Both sides
run the same training step on 32x32 RGB batches: draw t ~ U{0..999} and the noise, q_sample, eps-MSE loss with
dropout 0.1, backward, gradient-norm clipping to 1.0, Adam (lr 2e-4) step. No EMA on either side.

Each contender runs in its own subprocess, so that its peak RSS (``ru_maxrss``, which includes importing its
library) is its own; the subprocesses alternate ddpmkit, diffusers, diffusers, ddpmkit, ... for ``--rounds``
rounds, so that drift in the machine's speed hits both alike. Each subprocess does ``--warmup`` untimed steps
(with ``--compile``, the first of them compiles; its time is reported apart) and then ``--steps`` timed
ones. The median over all timed steps of a contender gives its img/s; the throughput ratio is the median over
the rounds of each round's ratio (the two runs of a round are next to each other in time, so that a change in
the machine's load between rounds cancels out). The 1-minute load average is printed at the start and at the
end: on a shared machine, other processes make multi-threaded timings slower and noisier. The last line is
the throughput ratio, with the peak-RSS ratio in brackets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONTENDERS = ("ddpmkit", "diffusers")

# google/ddpm-cifar10-32's UNet2DModel configuration (dropout set per use).
DIFFUSERS_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
)


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def diffusers_cifar10_unet(dropout: float):
    """diffusers' UNet2DModel with the configuration of google/ddpm-cifar10-32."""
    from diffusers import UNet2DModel

    return UNet2DModel(**DIFFUSERS_CIFAR10, dropout=dropout)


def quiet_diffusers() -> None:
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# --------------------------------------------------------------------------------------------------
# One contender, in its own process


def worker(args) -> dict:
    """Build one contender, train it for warm-up + timed steps; return its timings and memory."""
    import torch
    import torch.nn.functional as F

    from bench_unet import peak_rss_mib

    torch.set_num_threads(args.threads)
    name = args.worker
    levers = name == "ddpmkit" or args.peer_levers
    if name == "ddpmkit":
        from ddpmkit.diffusion import NoiseSchedule, training_losses
        from ddpmkit.models import unet_from_preset
    else:
        quiet_diffusers()
        from diffusers import DDPMScheduler
    rss_imports = current_rss_mib()

    torch.manual_seed(args.seed)
    B = args.batch_size
    if name == "ddpmkit":
        model = unet_from_preset("cifar10", dropout=0.1)
        schedule = NoiseSchedule.from_name("linear", 1000)
    else:
        model = diffusers_cifar10_unet(dropout=0.1)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    n_params = sum(p.numel() for p in model.parameters())
    fmt = torch.channels_last if (levers and args.channels_last) else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    fwd = torch.compile(model) if (levers and args.compile) else model
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x0 = (torch.rand(B, 3, 32, 32, generator=gen) * 2 - 1).contiguous(memory_format=fmt)  # a fixed "real" batch

    def step() -> None:
        t = torch.randint(0, 1000, (B,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen).contiguous(memory_format=fmt)
        if name == "ddpmkit":
            loss = training_losses(fwd, schedule, x0, t=t, noise=noise)[0].mean()  # q_sample, eps-MSE
        else:
            x_t = scheduler.add_noise(x0, noise, t)
            loss = F.mse_loss(fwd(x_t, t).sample.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    warm = []
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        step()
        warm.append(time.perf_counter() - t0)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"name": name, "params": n_params, "times": times, "warmup": warm, "rss_imports": rss_imports,
            "peak_rss": peak_rss_mib(), "threads": torch.get_num_threads(), "torch": torch.__version__}


# --------------------------------------------------------------------------------------------------
# The parent: alternate the subprocesses, collect, report


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seed", str(args.seed)]
    cmd += [flag for flag, on in (("--channels-last", args.channels_last), ("--compile", args.compile),
                                  ("--peer-levers", args.peer_levers)) if on]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the {name} worker failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=all_cores(), help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs both contenders once (default: 3)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per run (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run (default: 2)")
    p.add_argument("--channels-last", action="store_true", help="ddpmkit's model and batches in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile ddpmkit's model (compile time apart)")
    p.add_argument("--peer-levers", action="store_true", help="apply --channels-last/--compile to diffusers too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if min(args.batch_size, args.threads, args.rounds, args.steps) < 1 or args.warmup < 0:
        p.error("--batch-size, --threads, --rounds and --steps must be positive, --warmup >= 0")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the first step compiles)")

    levers = [f for f, on in (("channels_last", args.channels_last), ("torch.compile", args.compile)) if on]
    print(f"python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, batch {args.batch_size}x3x32x32, load average {os.getloadavg()[0]:.2f}")
    print(f"levers: {', '.join(levers) or 'none'} on ddpmkit" + (" and diffusers" if args.peer_levers and levers
                                                                  else ""))
    print(f"{args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed steps) per contender, "
          f"each run in its own process", flush=True)
    runs = {n: [] for n in CONTENDERS}
    for r in range(args.rounds):
        order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
        for name in order:
            res = run_worker(name, args)
            runs[name].append(res)
            print(f"  round {r + 1} {name:<9} median step {statistics.median(res['times']) * 1e3:8.1f} ms  "
                  f"peak RSS {res['peak_rss']:6.0f} MiB  load {os.getloadavg()[0]:.2f}", flush=True)

    summary = {}
    for name in CONTENDERS:
        times = [t for res in runs[name] for t in res["times"]]
        med = statistics.median(times)
        peak = statistics.median(res["peak_rss"] for res in runs[name])
        base = statistics.median(res["rss_imports"] for res in runs[name])
        first = statistics.median(res["warmup"][0] for res in runs[name]) if args.warmup else float("nan")
        summary[name] = (med, peak)
        print(f"{name:<9} {runs[name][0]['params']:,} parameters: median step {med * 1e3:8.1f} ms "
              f"(min {min(times) * 1e3:.1f}), {args.batch_size / med:6.2f} img/s; peak RSS {peak:6.0f} MiB "
              f"({base:.0f} MiB after imports)")
        if args.compile and (name == "ddpmkit" or args.peer_levers):
            print(f"{'':<9} first (compiling) step {first:.1f} s: compile time about {first - med:.1f} s")
    per_round = [statistics.median(d["times"]) / statistics.median(o["times"])
                 for o, d in zip(runs["ddpmkit"], runs["diffusers"])]
    po, pd = summary["ddpmkit"][1], summary["diffusers"][1]
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print("img/s ours/diffusers per round: " + ", ".join(f"{r:.3f}" for r in per_round))
    print(f"train img/s ours/diffusers = {statistics.median(per_round):.2f}x  "
          f"(peak RSS ours/diffusers = {po / pd:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
