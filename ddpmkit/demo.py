"""``ddpmkit demo``: the whole product on the embedded digits, within a few minutes on a laptop CPU.

Trains the ``digits`` preset class-conditionally, inside EDM's preconditioning, at batch 48 with one ResNet block a
level (:data:`DEMO_RECIPE`), for a fixed wall-clock budget,
measuring the quality of its samples as it goes (``--eval-every``: the Frechet distance by the digits classifier,
plotted beside the loss), samples every digit with the fast default sampler (DPM-Solver++(2M) SDE, 20 steps) and
with DDIM (50 steps) under classifier-free guidance, one grid row per digit, checks the samples for copies of
training digits, and writes grids, chain GIFs, the schedule, forward-process, loss and memorisation figures and a
report into one folder.
(Class-conditional training costs the demo no quality: at the same budget its samples are closer to the real
digits than an unconditional model's, bench/bench_demo_recipe.py and docs/guidance.md.)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .errors import DataError

# The demo's recipe: the digits preset with EDM's preconditioning, loss and noise levels (--precond edm), at batch 48
# with one ResNet block a level (0.71x the time of a step of the preset's two), Adam's learning rate 4e-3 and beta2
# 0.99, trained for 60 s (about 1,150 steps on 2 cores). A step at batch 48 costs 1.15x to 1.27x one at 32, for 1.5x
# the images. Its samples, drawn as `ddpmkit sample RUN --class all` draws them, are as hard to tell from real digits
# as those of the eps recipe after 210 s (the demo until EDM): in each of five training seeds by a CNN two-sample
# test on the pixels and a two-sample test on the digits classifier's features, in four of five by its Frechet
# distance (bench/bench_time_to_quality.py, docs/demo.md#time-to-quality). With sampling, about 75 s on 2 cores.
DEMO_RECIPE = dict(precond="edm", batch_size=48, num_res_blocks=1, lr=4e-3, adam_beta2=0.99)
DEFAULT_TRAIN_SECONDS = 60.0
# steps between quality measurements: 2 in the 60 s, about 5% of the training time (docs/demo.md); inside the
# time limit, as any run's --eval-every
DEMO_EVAL_EVERY = 400
DEMO_MEMORIZATION_N = 200  # samples of the memorisation check
# `demo --latent` keeps the recipe it was measured with (bench/bench_latent.py): eps prediction, 210 s in all (the
# autoencoder's LATENT_AE_SECONDS included), its samples at w = 0.1. The pixel demo draws at `sample`'s default weight.
LATENT_TRAIN_SECONDS = 210.0
LATENT_DEMO_GUIDANCE = 0.1
LATENT_EVAL_EVERY = 200  # the latent demo's quality measurements, as it was measured
# `demo --latent`: the digits at 32x32 through an f = 4 autoencoder (latents of 4x8x8, the side of the pixel demo's
# digits), which trains for the first LATENT_AE_SECONDS of the budget (bench/bench_latent.py, docs/latent.md)
LATENT_IMAGE_SIZE = 32
LATENT_AE_SECONDS = 60.0
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


def train_demo_autoencoder(out: Path, seconds: float, quiet: bool, log) -> Path:
    """The latent demo's first stage: ``ddpmkit autoencoder train``'s defaults (f = 4, digits at 32x32 to latents of
    4x8x8) for ``seconds``, measured on held-out digits at the end."""
    from .train.autoencoder_config import AutoencoderConfig
    from .train.loop import TrainingLoop
    from .train.tasks.autoencoder import AutoencoderTask

    cfg = AutoencoderConfig(time_limit=seconds, steps=1_000_000, sample_every=1_000_000, eval_every=1_000_000)
    loop = TrainingLoop(AutoencoderTask, cfg, out, quiet=quiet)
    ae = loop.models["autoencoder"]
    c, h, w = ae.latent_shape(cfg.image_size)
    log(f"demo: training the autoencoder ({ae.num_parameters():,} parameters, digits at {cfg.image_size}x"
        f"{cfg.image_size} to latents of {c}x{h}x{w}) for {seconds:.0f} s into {out}")
    res = loop.run()
    q = res.get("quality") or {}
    log(f"demo: autoencoder trained {res['step']} steps; held-out PSNR {q.get('psnr', float('nan')):.1f} dB")
    return out


def run_demo(out=None, train_seconds: float | None = None, quiet: bool = False, n: int = 64, log=print,
             latent: bool = False) -> dict:
    """The demo; ``latent``: latent diffusion, an autoencoder trained first (its time within ``train_seconds``) into
    ``OUT-autoencoder``, then the digits U-Net on its latents."""
    from .viz import plots
    from .generate import SampleOptions, generate
    from .train import Trainer, config_from_preset

    t_start = time.perf_counter()
    out = Path(out) if out else free_dir(Path("runs") / ("demo-latent" if latent else "demo"))
    from .diffusion.denoiser import DEFAULT_GUIDANCE

    seconds = (LATENT_TRAIN_SECONDS if latent else DEFAULT_TRAIN_SECONDS) if train_seconds is None else train_seconds
    guidance = LATENT_DEMO_GUIDANCE if latent else DEFAULT_GUIDANCE
    extra = {} if latent else dict(DEMO_RECIPE)
    if latent:
        ae_seconds = min(LATENT_AE_SECONDS, seconds / 2)
        ae_dir = free_dir(out.parent / f"{out.name}-autoencoder")
        train_demo_autoencoder(ae_dir, ae_seconds, quiet, log)
        seconds -= ae_seconds
        extra = dict(autoencoder=str(ae_dir), image_size=LATENT_IMAGE_SIZE)
    cfg = config_from_preset("digits", time_limit=seconds, steps=1_000_000, sample_every=1_000_000, class_cond=True,
                             eval_every=LATENT_EVAL_EVERY if latent else DEMO_EVAL_EVERY, **extra)
    trainer = Trainer(cfg, out, quiet=quiet)
    what = ", on latents" if latent else f", EDM preconditioning, batch {cfg.batch_size}"
    log(f"demo: training the digits preset ({trainer.model.num_parameters():,} parameters{what}) for {seconds:.0f} s "
        f"on {trainer.device} into {out}")
    res = trainer.run()
    quality = res.get("quality")
    log(f"demo: trained {res['step']} steps, final loss {res['loss']:.4f}"
        + (f", Frechet distance of {quality['n']} samples {quality['fd']:.2f} (digits classifier; "
           f"{res['eval_seconds']:.0f} s of measuring)" if quality else ""))
    del trainer

    files = {}
    per = max(1, n // 10)  # n samples: one row of n // 10 per digit
    for label, opt in [("DPM-Solver++(2M) SDE, 20 steps", SampleOptions(sampler="dpmpp-2m-sde", steps=20, n=per,
                                                                         batch_size=n, classes="all",
                                                                         guidance=guidance)),
                       ("DDIM, 50 steps", SampleOptions(sampler="ddim", steps=50, n=per, batch_size=n,
                                                        classes="all", guidance=guidance))]:
        tag = opt.sampler
        r = generate(out, out / f"samples_{tag}", opt, gif_path=out / f"{tag}.gif", progress=not quiet, log=log)
        log(f"demo: {label}: {r['n']} samples in {r['seconds']:.1f} s")
        files[f"{label} grid"] = r["grid"]
        files[f"{label} GIF"] = r["gif"]
    files["schedules"] = plots.plot_schedule(out / "schedule.png")
    if not latent:  # the forward process of pixels (a latent run's is of its latents)
        files["forward diffusion"] = plots.plot_forward(forward_images("digits"), out / "forward.png")
    files["training loss and quality"] = plots.plot_loss(out / "metrics.csv", out / "loss.png")
    from .metrics.memorization import evaluate_memorization

    mem = evaluate_memorization(out, n=DEMO_MEMORIZATION_N, sampler="ddim", steps=50, guidance=guidance, log=log)
    px = mem["pixels"]
    log(f"demo: memorisation check: {DEMO_MEMORIZATION_N} samples are closer to a training digit than real digits "
        f"are with probability {px['closer_than_real']:.2f} (0.5: alike); near copies {100 * px['near_copies']:.1f}% "
        f"(real digits {100 * px['real_near_copies']:.1f}%)")
    files["memorisation check"] = mem["figure"]
    files["checkpoint"] = res["checkpoint"]
    from .viz.report import write_report

    files["report"] = write_report(out)
    log(f"demo: done in {time.perf_counter() - t_start:.0f} s. Files:")
    width = max(len(k) for k in files)
    for k, v in files.items():
        log(f"  {k:<{width}}  {v}")
    return {"out": out, "files": files, "train": res}
