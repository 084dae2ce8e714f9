"""Sampling from a trained run into files: per-sample PNGs, a grid, and optionally a GIF of the chain.

The model and schedule always come from the run itself (its config.json and checkpoint), never from the
current defaults.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_model, load_schedule, read_config, run_dir_of
from .errors import CheckpointError, ConfigError, DdpmkitError
from .images import to_uint8
from .sampling import SAMPLERS, SPACINGS, ddim_timesteps, num_model_calls, sample

__all__ = ["SampleOptions", "generate"]

GRID_MAX = 256  # samples shown in grid.png; the rest are written and dropped, so memory stays bounded


@dataclass
class SampleOptions:
    sampler: str = "ddim"
    steps: int | None = None  # DDIM steps (default 50); DDPM always takes all T
    eta: float = 0.0
    spacing: str = "uniform"
    variance: str = "small"
    clip_x0: bool = True
    n: int = 64
    batch_size: int = 64
    seed: int = 0
    ema: bool = True
    gif_samples: int = 8
    gif_frames: int = 40


def validate_options(opt: SampleOptions, T: int) -> None:
    if opt.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {opt.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if opt.spacing not in SPACINGS:
        raise ConfigError(f"unknown spacing {opt.spacing!r}: choose one of {', '.join(SPACINGS)}")
    if opt.variance not in ("small", "large"):
        raise ConfigError(f"unknown variance {opt.variance!r}: choose small or large")
    if opt.sampler == "ddim":
        try:
            ddim_timesteps(T, opt.steps if opt.steps is not None else min(50, T), opt.spacing)
        except ValueError as e:
            raise ConfigError(f"--steps: {e}") from None
        if not opt.eta >= 0:
            raise ConfigError(f"--eta must be >= 0, got {opt.eta}")
    for name in ("n", "batch_size"):
        v = getattr(opt, name)
        if v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def load_for_sampling(run_or_checkpoint, opt: SampleOptions, device):
    """The run's model (on ``device``), schedule and objective, checked sampler options, and the image shape.

    Returns ``(model, schedule, objective, steps, (C, H, W))``, where ``steps`` is the DDIM step count to use.
    """
    src = Path(run_or_checkpoint)
    config = read_config(run_dir_of(src))
    objective = (config.get("diffusion") or {}).get("objective", "eps")
    schedule = load_schedule(src)
    validate_options(opt, schedule.T)
    steps = opt.steps if opt.steps is not None else min(50, schedule.T)
    model = load_model(src, ema=opt.ema).to(device)
    if torch.device(device).type == "cpu":
        # channels_last on the CPU: side by side on an AVX2 CPU, DDIM over the CIFAR-10 model took 15-19% less
        # time, over the small digits model the same time (bench/bench_sampling_vs_diffusers.py --channels-last)
        model = model.to(memory_format=torch.channels_last)
    mc = model.config
    return model, schedule, objective, steps, (mc["in_channels"], mc["image_size"], mc["image_size"])


def generate(run_or_checkpoint, out_dir, opt: SampleOptions, *, gif_path=None, device=None, progress=True,
             log=print) -> dict:
    """Draw ``opt.n`` samples from a run and write them under ``out_dir``; returns paths and timings.

    Samples are written batch by batch and only the first ``GRID_MAX`` are kept (``result["images"]``, the grid), so
    memory does not grow with ``n``. A CUDA out-of-memory error halves the batch size and retries, with a warning.
    """
    from tqdm import tqdm

    from .plots import ChainRecorder, save_chain_gif, save_grid, save_images

    dev = torch.device(device) if device is not None else torch.device("cpu")
    model, schedule, objective, steps, chw = load_for_sampling(run_or_checkpoint, opt, dev)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cpu").manual_seed(opt.seed)
    calls = num_model_calls(schedule, opt.sampler, steps)
    def new_recorder():
        return ChainRecorder(calls, num_samples=min(opt.gif_samples, opt.n), num_frames=opt.gif_frames) \
            if gif_path else None

    recorder = new_recorder()
    grid_images, files = [], []  # only the first GRID_MAX samples stay in memory, for the grid
    batch_size = opt.batch_size
    t0 = time.perf_counter()
    with tqdm(total=opt.n, disable=not progress, unit="img", desc=f"{opt.sampler}") as bar:
        done = 0
        while done < opt.n:
            b = min(batch_size, opt.n - done)
            state = g.get_state()
            try:
                x_T = torch.randn((b, *chw), generator=g)
                if recorder is not None and done == 0:
                    recorder.initial(x_T)
                x = sample(model, schedule, (b, *chw), sampler=opt.sampler, steps=steps, eta=opt.eta,
                           spacing=opt.spacing, variance=opt.variance, clip_x0=opt.clip_x0, generator=g,
                           callback=recorder if done == 0 else None, x_T=x_T.to(dev), objective=objective,
                           device=dev)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise DdpmkitError(f"out of GPU memory on {dev} even at batch size 1") from None
                batch_size = max(1, batch_size // 2)
                log(f"warning: out of GPU memory on {dev}; retrying with batch size {batch_size} "
                    f"(samples from here on differ from those of the larger batch)")
                g.set_state(state)
                if done == 0:
                    recorder = new_recorder()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            u8 = to_uint8(x.cpu())
            files += save_images(u8, out_dir, prefix="sample", start=done)
            room = GRID_MAX - sum(len(i) for i in grid_images)
            if room > 0:
                grid_images.append(u8[:room])
            done += b
            bar.update(b)
    seconds = time.perf_counter() - t0
    images = torch.cat(grid_images)
    grid = save_grid(images, out_dir / "grid.png")
    result = {"n": opt.n, "seconds": seconds, "per_second": opt.n / max(seconds, 1e-9), "dir": out_dir,
              "grid": grid, "files": files, "images": images, "steps": calls}
    if recorder is not None:
        result["gif"] = Path(gif_path)
        result["gif_frames"] = save_chain_gif(recorder, gif_path)
    return result


def default_out_dir(run_dir, opt: SampleOptions) -> Path:
    if opt.sampler == "ddpm":
        tag = f"ddpm-{opt.variance}"
    else:
        tag = f"ddim-{opt.steps if opt.steps is not None else 50}-eta{opt.eta:g}-{opt.spacing}"
    return run_dir_of(Path(run_dir)) / "samples" / f"{tag}-seed{opt.seed}"


def check_run(path) -> None:
    """A clear error when ``path`` is not a run directory or checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    read_config(run_dir_of(p))
