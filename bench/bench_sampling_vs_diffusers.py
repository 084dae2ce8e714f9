"""DDIM sampling speed of the 35.7M-parameter CIFAR-10 U-Net: ddpmkit's against diffusers', and ddpmkit's overhead.

    python bench/bench_sampling_vs_diffusers.py                      # 64 images, 50 steps, all cores, 2 rounds
    python bench/bench_sampling_vs_diffusers.py --n 8 --steps 3 --rounds 1 --threads 1   # a quick smoke test
    python bench/bench_sampling_vs_diffusers.py --nchw               # ddpmkit's model in NCHW, not channels_last
    python bench/bench_sampling_vs_diffusers.py --peer-channels-last # diffusers' model in channels_last too

Ours is ``ddpmkit.samplers.sample(Denoiser(...), sampler="ddim")`` (eta 0, uniform spacing) over
``unet_from_preset("cifar10")`` in
channels_last, as ``ddpmkit sample`` runs it on the CPU (``--nchw``: in the default layout). The peer is the
loop a diffusers user writes (the one its DDIMPipeline runs): ``DDIMScheduler.set_timesteps(steps)``, then
``unet(x, t).sample`` and ``scheduler.step(eps, t, x, eta=0).prev_sample`` for each timestep, under
``torch.inference_mode()`` (a little faster than the pipeline's ``torch.no_grad()``), over
diffusers' ``UNet2DModel`` in the configuration of google/ddpm-cifar10-32 (linear betas, clipped x0, the
same 35,746,307 parameters). Both visit the same timesteps (0, 1000/S, ... for S steps, last step to
alpha_bar = 1) from the same x_T; the script first checks on a small model that diffusers' scheduler loop
(with ``use_clipped_model_output=True``, the noise implied by the clipped x0, which the Denoiser gives; the
timed loop keeps diffusers' default) and ours give the same samples from the same network.

The two contenders alternate (ours, diffusers, diffusers, ours, ...) for ``--rounds`` rounds, after one
untimed forward each; the speed ratio is the median over the rounds of each round's diffusers/ours wall-time
ratio (> 1: ours is faster; the two runs of a round are next to each other in time, so that a change in the
machine's load between rounds cancels out). Both spend nearly all of their time in the S network calls at
batch n, so the ratio does not depend on --steps: a few steps give it when a full run (several seconds per
forward of 64 images on a laptop CPU) takes too long. --n is the batch of every network call, at which each
network has its own efficiency, so keep the batch you care about (the time per step grows with n; the ratio
moved little between 8 and 64).

The sampler overhead is ours alone: the DDIM wall time over S times one network forward at batch n, where
the forward is timed inside each DDIM run (each network call timed, a figure that drift in the machine's
speed between runs cannot move); the ratio with the median of ``--forwards`` standalone forwards, timed next
to our DDIM runs, is printed beside it. 1.00 means the sampler costs nothing beside the network (the target
is at most 1.03). ``bench/bench_sampler_overhead.py`` measures it without diffusers, for any preset.
The last line is the speed ratio, the line before it the overhead ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_train_vs_diffusers import all_cores, diffusers_cifar10_unet, quiet_diffusers  # noqa: E402
from ddpmkit.diffusion import Denoiser  # noqa: E402
from ddpmkit.samplers import sample  # noqa: E402
from ddpmkit.diffusion import NoiseSchedule  # noqa: E402
from ddpmkit.models.unet import unet_from_preset  # noqa: E402


def our_model(preset: str, channels_last: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = unet_from_preset(preset).eval()
    # the zero-initialised output layers would make every prediction 0; give them weights, as training would
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
                torch.nn.init.normal_(m.weight, std=0.02)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def ours_sampler(model, schedule: NoiseSchedule, steps: int):
    def run(x_T: torch.Tensor) -> torch.Tensor:
        return sample(Denoiser(model, schedule), x_T, sampler="ddim", steps=steps, eta=0.0)
    return run


def diffusers_sampler(unet, steps: int, *, output=lambda o: o.sample, clipped_eps: bool | None = None):
    """DDIM as a diffusers user writes it: the scheduler's set_timesteps, then unet + scheduler.step per step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=True)  # google/ddpm-cifar10-32's schedule

    def run(x_T: torch.Tensor) -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = x_T
        with torch.inference_mode():
            for t in scheduler.timesteps:
                eps = output(unet(x, t))
                x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=clipped_eps).prev_sample
        return x
    return run


def check_same_ddim(steps: int = 10) -> float:
    """Max |difference| between our DDIM and diffusers' DDIM loop over the same small network."""
    model = our_model("digits", False, seed=1)
    sched = NoiseSchedule.from_name("linear", 1000)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    a = ours_sampler(model, sched, steps)(x_T)
    # the Denoiser gives the noise implied by the clipped x0 (use_clipped_model_output in diffusers' terms)
    b = diffusers_sampler(model, steps, output=lambda o: o, clipped_eps=True)(x_T)
    return float((a - b).abs().max())


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


class TimedCalls(nn.Module):
    """The model, with the wall time of its calls added up in ``seconds`` (two clock reads per call)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seconds = model, 0.0

    def forward(self, x, t):
        t0 = time.perf_counter()
        out = self.model(x, t)
        self.seconds += time.perf_counter() - t0
        return out


def forward_timer(model, x_T: torch.Tensor):
    t = torch.full((x_T.shape[0],), 500, dtype=torch.long)

    def forward() -> None:
        with torch.inference_mode():
            model(x_T, t)
    return forward


def overhead_lines(ddim: list[float], inside: list[float], fwd: list[float], steps: int) -> list[str]:
    """The sampler overhead, DDIM wall time / (steps x one forward), with the forward timed two ways.

    ``inside``: the network time inside each DDIM run (its calls timed one by one), which drift in the machine's
    speed between runs cannot move; the headline. ``fwd``: standalone forwards timed next to the runs.
    """
    per_run = statistics.median(d / i for d, i in zip(ddim, inside))
    d, f = statistics.median(ddim), statistics.median(fwd)
    return [f"DDIM median {d:.3f} s; {(1 - 1 / per_run) * 100:.2f}% of it outside the network calls; "
            f"standalone forward median {f * 1e3:.2f} ms (min {min(fwd) * 1e3:.2f})",
            f"sampler overhead: DDIM wall / ({steps} steps x forward) = {per_run:.3f} with the forwards timed "
            f"inside the run ({d / (steps * f):.3f} with standalone forwards)"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=64, help="images per DDIM run (the batch; default 64)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--threads", type=int, default=all_cores(), help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs both contenders once (default 2)")
    p.add_argument("--forwards", type=int, default=3, help="standalone forwards timed per round (default 3)")
    p.add_argument("--nchw", action="store_true",
                   help="ddpmkit's model in NCHW (default: channels_last, as `ddpmkit sample` runs on the CPU)")
    p.add_argument("--peer-channels-last", action="store_true", help="diffusers' model in channels_last")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.n, args.steps, args.threads, args.rounds, args.forwards) < 1 or args.steps > 1000:
        p.error("--n, --threads, --rounds, --forwards must be positive and --steps in [1, 1000]")
    torch.set_num_threads(args.threads)
    quiet_diffusers()

    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.2f}")
    diff = check_same_ddim()
    print(f"same DDIM: max |ddpmkit DDIM - diffusers DDIMScheduler loop| over one small network = {diff:.2e}")

    ours = our_model("cifar10", not args.nchw, args.seed)
    torch.manual_seed(args.seed)
    theirs = diffusers_cifar10_unet(dropout=0.0).eval()
    if args.peer_channels_last:
        theirs = theirs.to(memory_format=torch.channels_last)
    schedule = NoiseSchedule.from_name("linear", 1000)
    x_T = torch.randn(args.n, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 1))
    layout = {False: "NCHW", True: "channels_last"}
    print(f"DDIM eta 0, {args.steps} steps, {args.n} images 3x32x32; ddpmkit {ours.num_parameters():,} and "
          f"diffusers {sum(p.numel() for p in theirs.parameters()):,} parameters; layout: ddpmkit "
          f"{layout[not args.nchw]}, diffusers {layout[args.peer_channels_last]}", flush=True)

    timed_ours = TimedCalls(ours)
    run = {"ddpmkit": ours_sampler(timed_ours, schedule, args.steps),
           "diffusers": diffusers_sampler(theirs, args.steps)}
    forward_timer(ours, x_T)()  # warm-up, one forward each
    forward_timer(lambda x, t: theirs(x, t), x_T)()
    walls = {"ddpmkit": [], "diffusers": []}
    fwd, inside = [], []
    forward = forward_timer(ours, x_T)
    for r in range(args.rounds):
        for name in (("ddpmkit", "diffusers") if r % 2 == 0 else ("diffusers", "ddpmkit")):
            if name == "ddpmkit" and r % 2 == 0:
                fwd += [timed(forward) for _ in range(args.forwards)]
            timed_ours.seconds = 0.0
            walls[name].append(timed(run[name], x_T))
            if name == "ddpmkit":
                inside.append(timed_ours.seconds)
            print(f"  round {r + 1} {name:<9} DDIM {walls[name][-1]:8.2f} s   load {os.getloadavg()[0]:.2f}",
                  flush=True)
            if name == "ddpmkit" and r % 2 == 1:
                fwd += [timed(forward) for _ in range(args.forwards)]

    med = {k: statistics.median(v) for k, v in walls.items()}
    for k in walls:
        print(f"{k:<9} DDIM median {med[k]:8.2f} s (min {min(walls[k]):.2f}): {med[k] / args.steps * 1e3:8.1f} ms "
              f"per step, {args.n / med[k] * args.steps / 50:7.3f} img/s (scaled to 50 steps)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print("\n".join(overhead_lines(walls["ddpmkit"], inside, fwd, args.steps)))
    per_round = [d / o for o, d in zip(walls["ddpmkit"], walls["diffusers"])]
    print(f"DDIM speed ours/diffusers = {statistics.median(per_round):.2f}x  (per round: "
          + ", ".join(f"{r:.3f}" for r in per_round) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
