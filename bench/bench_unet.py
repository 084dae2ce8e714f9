"""Benchmark the DDPM U-Net on CPU: inference forward and a full training step.

    python bench/bench_unet.py                      # CIFAR-10 model, batch 16, 2 threads
    python bench/bench_unet.py --channels-last --iters 3 --threads 4

A training step is forward + eps-MSE loss + backward + gradient clipping + Adam step. Each phase runs its
warm-up iterations first, then reports the median (and min) of --iters timed ones, and the peak RSS of
the process so far. The 1-minute load average is printed too: on a shared machine other processes make
multi-threaded CPU timings slower and noisier.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import torch

from ddpmkit.models import unet_from_preset


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def timed(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def report(name: str, times: list[float], batch: int) -> None:
    med = statistics.median(times)
    print(f"{name:<12} median {med * 1e3:8.1f} ms  min {min(times) * 1e3:8.1f} ms  "
          f"{batch / med:7.2f} img/s   peak RSS {peak_rss_mib():7.0f} MiB", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cifar10", help="UNet preset (default: cifar10)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per phase (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per phase (default: 1)")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last format")
    p.add_argument("--skip-train", action="store_true", help="time the forward only")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = unet_from_preset(args.preset)
    cfg = model.config
    B, C, S = args.batch_size, cfg["in_channels"], cfg["image_size"]
    x = torch.randn(B, C, S, S)
    eps = torch.randn(B, C, S, S)
    t = torch.randint(0, 1000, (B,))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        eps = eps.contiguous(memory_format=torch.channels_last)

    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"UNet preset {args.preset}: {model.num_parameters():,} parameters, batch {B}x{C}x{S}x{S}, "
          f"{'channels_last' if args.channels_last else 'contiguous (NCHW)'}")

    model.eval()

    def forward():
        with torch.no_grad():
            model(x, t)

    report("forward", timed(forward, args.warmup, args.iters), B)

    if not args.skip_train:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=2e-4)

        def train_step():
            loss = (model(x, t) - eps).square().mean()  # DDPM eq. 14 (the simple eps loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # DDPM appendix B: clip to norm 1
            opt.step()

        report("train step", timed(train_step, args.warmup, args.iters), B)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
