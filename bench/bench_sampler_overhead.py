"""What ddpmkit's DDIM sampler costs beyond its network calls, on the CPU.

    python bench/bench_sampler_overhead.py                           # CIFAR-10 U-Net, 64 images, 50 steps
    python bench/bench_sampler_overhead.py --preset digits --n 256   # the small digits model (seconds)
    python bench/bench_sampler_overhead.py --n 8 --steps 5 --rounds 2 --threads 1   # a quick smoke test

Times ``ddpmkit.samplers.sample(..., sampler="ddim")`` (eta 0, through a Denoiser) over
``unet_from_preset(--preset)`` (in channels_last, as
``ddpmkit sample`` runs it on the CPU, unless ``--nchw``) and, alternating with it
(forwards then DDIM, then DDIM then forwards, ...), ``--forwards`` standalone network forwards at the same
batch under ``torch.inference_mode``. The overhead is the DDIM wall time over (steps x one forward): 1.00
means the sampler adds nothing to its network calls (the target is at most 1.03). The headline times the
forwards inside each DDIM run (every network call timed, the rest of the run is the sampler's), a figure
that drift in the machine's speed between runs cannot move; the ratio with the median standalone forward is
printed beside it, and is only as steady as the machine. The overhead ratio is the last line.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_sampling_vs_diffusers import TimedCalls, forward_timer, our_model, overhead_lines, timed  # noqa: E402
from bench_train_vs_diffusers import all_cores  # noqa: E402
from ddpmkit.diffusion import Denoiser  # noqa: E402
from ddpmkit.samplers import sample  # noqa: E402
from ddpmkit.diffusion import NoiseSchedule  # noqa: E402
from ddpmkit.models.unet import UNET_PRESETS  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cifar10", choices=sorted(UNET_PRESETS), help="UNet preset (default cifar10)")
    p.add_argument("--n", type=int, default=64, help="images per DDIM run (the batch; default 64)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--threads", type=int, default=all_cores(), help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=2, help="DDIM runs (default 2)")
    p.add_argument("--forwards", type=int, default=3, help="standalone forwards timed per round (default 3)")
    p.add_argument("--nchw", action="store_true",
                   help="the model in NCHW (default: channels_last, as `ddpmkit sample` runs on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.n, args.steps, args.threads, args.rounds, args.forwards) < 1 or args.steps > 1000:
        p.error("--n, --threads, --rounds, --forwards must be positive and --steps in [1, 1000]")
    torch.set_num_threads(args.threads)

    model = our_model(args.preset, not args.nchw, args.seed)
    cfg = model.config
    shape = (args.n, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    schedule = NoiseSchedule.from_name("linear", 1000)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 1))
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"UNet preset {args.preset} ({model.num_parameters():,} parameters"
          f", {'NCHW' if args.nchw else 'channels_last'}), DDIM eta 0, {args.steps} steps, "
          f"batch {'x'.join(map(str, shape))}", flush=True)

    wrapped = TimedCalls(model)
    forward = forward_timer(model, x_T)
    forward()  # warm-up
    ddim, fwd, inside = [], [], []
    for r in range(args.rounds):
        for what in (("forwards", "ddim") if r % 2 == 0 else ("ddim", "forwards")):
            if what == "forwards":
                fwd += [timed(forward) for _ in range(args.forwards)]
                continue
            wrapped.seconds = 0.0
            ddim.append(timed(lambda: sample(Denoiser(wrapped, schedule), x_T, sampler="ddim", steps=args.steps)))
            inside.append(wrapped.seconds)
            print(f"  round {r + 1} DDIM {ddim[-1]:8.3f} s, {(1 - inside[-1] / ddim[-1]) * 100:5.2f}% of it "
                  f"outside the network calls   load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print("\n".join(overhead_lines(ddim, inside, fwd, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
