"""Benchmark one training step of each training preset's U-Net on CPU: its size and its time per step and image.

    python bench/bench_presets.py                          # digits, cifar10, folder64, folder128, lsun256; 2 threads
    python bench/bench_presets.py --presets folder64 --repeats 5 --threads 4

For each preset the U-Net is the one `ddpmkit train --preset P` builds (its U-Net preset, 6 outputs where the preset
learns its variance), trained as the preset trains it: the preset's schedule and loss (L_simple, or L_hybrid with a
learned variance), dropout on, gradient clipping, an Adam step at the preset's learning rate. The batch is small
(one 256x256 image; the preset's own batch would not fit the time of a CPU benchmark) and stated in the output. After
--warmup untimed steps, the median (and min) of --repeats timed steps is reported, in ms per step and per image,
with the peak RSS of the process so far. The 1-minute load average is printed at the start and the end: on a shared
machine other processes make these timings slower and noisier. About 2-3 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_unet import peak_rss_mib, timed  # noqa: E402

from ddpmkit.diffusion import NoiseSchedule  # noqa: E402
from ddpmkit.diffusion.losses import training_loss  # noqa: E402
from ddpmkit.models import UNet  # noqa: E402
from ddpmkit.train import config_from_preset  # noqa: E402

# The batch each preset is timed at: as many images as keep a step within seconds on 2 cores.
BATCHES = {"digits": 32, "cifar10": 4, "folder64": 2, "folder128": 2, "lsun256": 1, "celebahq256": 1}


def bench(preset: str, batch: int, warmup: int, repeats: int, seed: int) -> dict:
    cfg = config_from_preset(preset, data="unused")  # a folder preset's --data is not read here
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = UNet(**cfg.model_config()).train()
    build_s = time.perf_counter() - t0
    schedule = NoiseSchedule.from_name(cfg.schedule, cfg.T)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1

    def step() -> None:
        loss = training_loss(model, schedule, x0, objective=cfg.objective, generator=g)  # the preset's loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    times = timed(step, warmup, repeats)
    out = dict(preset=preset, size=cfg.image_size, params=model.num_parameters(), batch=batch,
               median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times), build_s=build_s)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="digits,cifar10,folder64,folder128,lsun256",
                   help="comma-separated training presets (default: digits,cifar10,folder64,folder128,lsun256)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per preset (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per preset first (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    presets = [s for s in args.presets.split(",") if s]
    unknown = [s for s in presets if s not in BATCHES]
    if unknown or args.repeats < 1 or args.warmup < 0:
        p.error(f"presets must be among {', '.join(BATCHES)}; --repeats >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"one training step (forward, the preset's loss, backward, clipping, Adam), median of {args.repeats} after "
          f"{args.warmup} warm-up", flush=True)
    rows = []
    for name in presets:
        r = bench(name, BATCHES[name], args.warmup, args.repeats, args.seed)
        gc.collect()  # the model and its optimizer, before the next one is built
        rows.append(r)
        print(f"{name:<12} {r['size']:>3}x{r['size']:<3} {r['params']:>12,} parameters  batch {r['batch']:>2}  "
              f"median {r['median_ms']:9.0f} ms/step  min {r['min_ms']:9.0f}  {r['median_ms'] / r['batch']:8.0f} "
              f"ms/image  (built in {r['build_s']:.1f} s; peak RSS {peak_rss_mib():,.0f} MiB)", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print("| preset | resolution | parameters | batch | ms/step | ms/image |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| `{r['preset']}` | {r['size']}x{r['size']} | {r['params']:,} | {r['batch']} | {r['median_ms']:,.0f} | "
              f"{r['median_ms'] / r['batch']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
