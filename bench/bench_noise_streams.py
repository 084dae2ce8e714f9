"""What per-sample noise streams cost: DDPM with one stream per sample against one generator for the batch.

    python bench/bench_noise_streams.py                      # digits U-Net, 64 images, 100 steps, 3 rounds
    python bench/bench_noise_streams.py --n 256 --steps 50

Sample i of ``ddpmkit sample`` draws its noise from its own generator (seed, i), so that an image does not depend
on the batch size; a stochastic sampler then draws B small tensors per step instead of one. Both runs take the same
network calls over the same random-weight U-Net, alternating (one generator, then per-sample, then per-sample,
then one generator, ...). The last line is the ratio of the medians: per-sample over one generator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ddpmkit.diffusion import Denoiser, NoiseSchedule  # noqa: E402
from ddpmkit.models.unet import unet_from_preset  # noqa: E402
from ddpmkit.samplers import PerSampleNoise, sample  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    net = unet_from_preset(args.preset).eval().to(memory_format=torch.channels_last)
    c, s = net.config["in_channels"], net.config["image_size"]
    den = Denoiser(net, NoiseSchedule.linear(1000))
    shape = (args.n, c, s, s)

    def run(per_sample: bool) -> float:
        noise = PerSampleNoise(0) if per_sample else torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        sample(den, shape, sampler="ddpm", steps=args.steps, noise=noise)
        return time.perf_counter() - t0

    run(False)  # warm-up
    times = {False: [], True: []}
    for r in range(args.rounds):
        for per_sample in ((False, True) if r % 2 == 0 else (True, False)):
            times[per_sample].append(run(per_sample))
            print(f"  round {r + 1} {'per-sample' if per_sample else 'one generator'}: {times[per_sample][-1]:.3f} s",
                  flush=True)
    one, per = statistics.median(times[False]), statistics.median(times[True])
    print(f"DDPM, {args.steps} steps, batch {'x'.join(map(str, shape))}, {args.preset} U-Net: "
          f"one generator {one:.3f} s, "
          f"per-sample streams {per:.3f} s")
    print(f"per-sample noise streams: time ratio {per / one:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
