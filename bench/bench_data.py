"""What the data path costs inside a training step, on the CPU.

Times one training step (forward + backward + Adam step) of a small model on the digits at 16x16, with
the batch taken from ``Batcher.next_batch()`` inside the step (A) and with a ready-made tensor (B).
The two are interleaved (A then B, then B then A, ...) so that drift in the machine's speed hits both
alike; the medians and their ratio are printed, and on the last line the median of the ratio A / B within each
back-to-back pair, which drift between pairs cannot move.

    python bench/bench_data.py [--batch-size 64] [--repeats 10] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from ddpmkit.data import Batcher, load_dataset


class _SmallConvNet(nn.Module):
    """Stand-in for the U-Net when ``ddpmkit.models.unet`` is not available: a few convolutions, t ignored."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, x, t):
        return self.net(x)


def make_model(image_size: int, channels: int) -> tuple[nn.Module, str]:
    try:
        from ddpmkit.models.unet import UNet
    except ImportError:
        return _SmallConvNet(channels), "small conv net (ddpmkit.models.unet not found)"
    cfg = dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
               dropout=0.0, num_groups=8)
    model = UNet(image_size, channels, **cfg)
    n = sum(p.numel() for p in model.parameters())
    return model, f"UNet {cfg} ({n / 1e6:.2f}M parameters)"


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10, help="A/B pairs")
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed block")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    data = load_dataset("digits", image_size=16, progress=False)
    load_s = time.perf_counter() - t0
    batcher = Batcher(data.images, args.batch_size, seed=0)
    ready = batcher.next_batch().clone()  # the same kind of batch, made once
    model, desc = make_model(16, data.channels)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    gen = torch.Generator().manual_seed(1)

    def step(x: torch.Tensor) -> None:
        b = x.shape[0]
        t = torch.randint(0, 1000, (b,), generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        a = torch.rand(b, 1, 1, 1, generator=gen)
        x_t = a.sqrt() * x + (1 - a).sqrt() * eps  # a stand-in for q_sample
        loss = F.mse_loss(model(x_t, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def block(use_batcher: bool) -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            step(batcher.next_batch() if use_batcher else ready)
        return (time.perf_counter() - t) / args.steps

    for _ in range(2):  # warm-up: allocator, kernels, Adam state
        block(True)
        block(False)
    with_batcher, with_ready = [], []
    for r in range(args.repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        for use in order:
            (with_batcher if use else with_ready).append(block(use))

    fetch = []
    for _ in range(200):
        t = time.perf_counter()
        batcher.next_batch()
        fetch.append(time.perf_counter() - t)

    a, b = statistics.median(with_batcher), statistics.median(with_ready)
    print(f"data: {data!r}, loaded in {load_s:.2f} s")
    print(f"model: {desc}")
    print(f"batch {args.batch_size}, {args.repeats} A/B pairs x {args.steps} steps, "
          f"{torch.get_num_threads()} torch threads")
    print(f"Batcher.next_batch() alone: median {statistics.median(fetch) * 1e6:.0f} us")
    print(f"step with Batcher batches:  median {a * 1e3:.2f} ms")
    print(f"step with a ready tensor:   median {b * 1e3:.2f} ms")
    print(f"ratio of the medians: {a / b:.3f}")
    # each A/B pair ran back to back, so the ratio within a pair is the steadier figure when the load drifts
    paired = statistics.median(x / y for x, y in zip(with_batcher, with_ready))
    print(f"ratio (Batcher / ready tensor), median over the pairs: {paired:.3f}")


if __name__ == "__main__":
    main()
