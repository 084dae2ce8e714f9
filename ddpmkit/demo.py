"""``ddpmkit demo``: the whole product on the embedded digits, within a few minutes on a laptop CPU.

Trains the ``digits`` preset class-conditionally for a fixed wall-clock budget, samples every digit with DDPM (1000
steps) and DDIM (50 steps) under classifier-free guidance, one grid row per digit, and writes grids, chain GIFs, the
schedule, forward-process and loss plots into one folder. (Class-conditional training costs the demo no quality:
at the same number of steps its samples are closer to the real digits than an unconditional model's, see the
README's guidance section.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .errors import DataError

DEFAULT_TRAIN_SECONDS = 150.0
MAX_FORWARD_PIXELS = 64_000_000  # the image of `plot forward --image` (8000x8000); it is drawn at 64x64


def free_dir(base: Path) -> Path:
    """``base`` if it is absent or empty, else the first of base-2, base-3, ... that is."""
    cand, k = base, 1
    while cand.exists() and any(cand.iterdir()):
        k += 1
        cand = base.parent / f"{base.name}-{k}"
    return cand


def forward_images(data: str = "digits", image: str | None = None, data_dir=None, n: int = 4) -> torch.Tensor:
    """A few images for the forward-process figure: one image file, or the first images of a data source."""
    from .data import load_dataset
    from .images import from_uint8

    if image:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image) as im:  # lazy: reads the header only, so the size is checked before decoding
                if im.width * im.height > MAX_FORWARD_PIXELS:
                    raise DataError(f"cannot read image {image}: {im.width}x{im.height} pixels is more than the "
                                    f"{MAX_FORWARD_PIXELS:,} allowed (a decompression bomb, or a photo to shrink "
                                    "first); the figure shows it at 64x64")
                im = im.convert("RGB")
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize((64, 64), Image.Resampling.LANCZOS)
                x = torch.from_numpy(__import__("numpy").asarray(im).copy()).permute(2, 0, 1)[None]
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {image}: {type(e).__name__}: {e}") from None
        return from_uint8(x)
    ds = load_dataset(data, data_dir=data_dir, progress=False)
    if ds.labels is not None:  # one image of each of the first classes reads better than four of one
        picks, seen = [], set()
        for i, y in enumerate(ds.labels.tolist()):
            if y not in seen:
                seen.add(y)
                picks.append(i)
            if len(picks) == n:
                break
        return from_uint8(ds.images[picks])
    return from_uint8(ds.images[:n])


def run_demo(out=None, train_seconds: float | None = None, quiet: bool = False, n: int = 64, log=print) -> dict:
    from .viz import figures as plots
    from .generate import SampleOptions, generate
    from .train import Trainer, config_from_preset

    t_start = time.perf_counter()
    out = Path(out) if out else free_dir(Path("runs") / "demo")
    seconds = DEFAULT_TRAIN_SECONDS if train_seconds is None else train_seconds
    cfg = config_from_preset("digits", time_limit=seconds, steps=1_000_000, sample_every=1_000_000, class_cond=True)
    trainer = Trainer(cfg, out, quiet=quiet)
    log(f"demo: training the digits preset ({trainer.model.num_parameters():,} parameters) for "
        f"{seconds:.0f} s on {trainer.device} into {out}")
    res = trainer.run()
    log(f"demo: trained {res['step']} steps, final loss {res['loss']:.4f}")
    del trainer

    files = {}
    per = max(1, n // 10)  # n samples: one row of n // 10 per digit
    for label, opt in [("DDPM, 1000 steps", SampleOptions(sampler="ddpm", n=per, batch_size=n, classes="all")),
                       ("DDIM, 50 steps", SampleOptions(sampler="ddim", steps=50, n=per, batch_size=n,
                                                        classes="all"))]:
        tag = opt.sampler
        r = generate(out, out / f"samples_{tag}", opt, gif_path=out / f"{tag}.gif", progress=not quiet, log=log)
        log(f"demo: {label}: {r['n']} samples in {r['seconds']:.1f} s")
        files[f"{label} grid"] = r["grid"]
        files[f"{label} GIF"] = r["gif"]
    files["schedules"] = plots.plot_schedule(out / "schedule.png")
    files["forward diffusion"] = plots.plot_forward(forward_images("digits"), out / "forward.png")
    files["training loss"] = plots.plot_loss(out / "metrics.csv", out / "loss.png")
    files["checkpoint"] = res["checkpoint"]
    from .viz.report import write_report

    files["report"] = write_report(out)
    log(f"demo: done in {time.perf_counter() - t_start:.0f} s. Files:")
    width = max(len(k) for k in files)
    for k, v in files.items():
        log(f"  {k:<{width}}  {v}")
    return {"out": out, "files": files, "train": res}
