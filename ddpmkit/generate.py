"""Sampling from a trained run into files: per-sample PNGs, a grid, and optionally a GIF of the chain.

The model, schedule and objective always come from the run itself (``Run.open``), never from the current defaults.
Sample i is drawn from the noise stream (seed, i), so a seed gives the same images at any batch size.

A class-conditional run draws the classes of ``opt.classes`` (``opt.n`` samples of each, class after class) or,
when none is named, every class in turn, with classifier-free guidance of weight ``opt.guidance``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .images import to_uint8
from .run import Run
from .samplers.options import Conditioning, SampleOptions, SamplingPlan, parse_classes

__all__ = ["SampleOptions", "SamplingPlan", "generate", "default_out_dir"]

GRID_MAX = 256  # samples shown in grid.png; the rest are written and dropped, so memory stays bounded
ROW_MAX = 16  # samples of each class shown in the grid with one row per class


def _conditioning(run, opt: SampleOptions) -> tuple[Conditioning, int]:
    """The run's conditioning for ``opt`` and the number of samples: ``opt.n`` per class asked for, else ``opt.n``."""
    classes = parse_classes(opt.classes, run.class_names)
    n = opt.n * (len(classes) if classes else 1)
    return Conditioning.of(opt, run.class_names, run.null_class, n, grouped=True), n


def generate(run_or_checkpoint, out_dir, opt: SampleOptions, *, gif_path=None, device=None, progress=True,
             log=print) -> dict:
    """Draw ``opt.n`` samples from a run and write them under ``out_dir``; returns paths and timings.

    Samples are written batch by batch and only the first ``GRID_MAX`` are kept (``result["images"]``, the grid), so
    memory does not grow with ``n``. A CUDA out-of-memory error halves the batch size and retries, with a warning;
    the images stay the same.
    """
    from .progress import steps_bar
    from .samplers.batches import sample_batches
    from .files import atomic_write_text, output_dir
    from .viz import ChainRecorder, save_chain_gif, save_grid, save_images, save_labelled_grid

    run = Run.open(run_or_checkpoint)
    plan = opt.plan(run.schedule)
    cond, n_total = _conditioning(run, opt)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    denoiser = run.denoiser(ema=opt.ema, variance=opt.variance, clip_x0=opt.clip_x0, device=dev,
                            guidance=cond.guidance)

    # the folder is made only now, after every setting was checked; a failure below removes it again if empty
    with output_dir(out_dir) as out_dir:
        recorder = None

        def start_recorder(x_T):  # the first batch's chain, recorded for the GIF (anew after an out-of-memory retry)
            nonlocal recorder
            recorder = ChainRecorder(plan.model_calls, num_samples=min(opt.gif_samples, n_total),
                                     num_frames=opt.gif_frames)
            recorder.initial(x_T)
            return recorder

        rows = cond.classes if cond.classes is not None and len(cond.classes) > 1 else None  # one grid row per class
        per_row = min(opt.n, ROW_MAX)
        grid_images, files = [], []  # only the samples shown in the grid stay in memory
        t0 = time.perf_counter()
        # a bar of network calls, so that a 1000-step DDPM batch moves at every step (progress.py)
        with steps_bar(denoiser.net, n=n_total, batch_size=opt.batch_size, calls_per_batch=plan.model_calls,
                       desc=plan.sampler, disable=not progress) as bar:
            for start, x in sample_batches(denoiser, n=n_total, shape=run.image_shape, sampler=plan.sampler,
                                           steps=plan.steps, spacing=plan.spacing, seed=opt.seed,
                                           batch_size=opt.batch_size, options=plan.options,
                                           on_first_batch=start_recorder if gif_path else None, log=log,
                                           labels=cond.labels):
                u8 = to_uint8(x.cpu())
                files += save_images(u8, out_dir, prefix="sample", start=start)
                if rows is not None:  # the first ROW_MAX samples of each class
                    keep = (torch.arange(start, start + u8.shape[0]) % opt.n) < per_row
                    grid_images.append(u8[keep])
                else:
                    room = GRID_MAX - sum(len(i) for i in grid_images)
                    if room > 0:
                        grid_images.append(u8[:room])
                bar.images(start + u8.shape[0])
        seconds = time.perf_counter() - t0
        images = torch.cat(grid_images)
        if rows is not None:
            names = [run.class_names[c] for c in rows]
            grid = save_labelled_grid(images, names, out_dir / "grid.png")
        else:
            grid = save_grid(images, out_dir / "grid.png")
        if cond.labels is not None:  # which class each file shows
            lines = ["file,label,class"] + [f"{f.name},{int(y)},{run.class_names[int(y)]}"
                                            for f, y in zip(files, cond.labels.tolist())]
            atomic_write_text(out_dir / "labels.csv", "\n".join(lines) + "\n")
        result = {"n": n_total, "seconds": seconds, "per_second": n_total / max(seconds, 1e-9), "dir": out_dir,
                  "grid": grid, "files": files, "images": images, "steps": plan.model_calls, "plan": plan,
                  "classes": cond.classes, "guidance": cond.guidance,
                  "labels": None if cond.labels is None else cond.labels}
        if recorder is not None:
            result["gif"] = Path(gif_path)
            result["gif_frames"] = save_chain_gif(recorder, gif_path)
        return result


def default_out_dir(run_or_checkpoint, opt: SampleOptions) -> Path:
    """``RUN/samples/<sampler>-<steps>-<spacing>[-<options>][-<variance>]-seed<K>``."""
    run = Run.open(run_or_checkpoint)
    plan = opt.plan(run.schedule)
    tag = plan.tag()
    if plan.reads_variance(opt.variance or run.variance):
        tag += f"-{opt.variance or run.variance}"
    if run.class_cond:  # the classes and the guidance weight: -class3.5.8-w1, -classall-w1, -w1
        cond, _ = _conditioning(run, opt)
        spec = opt.classes
        if spec is not None:
            spec = "all" if str(spec).strip() == "all" else ".".join(str(c) for c in cond.classes)
            tag += f"-class{spec}"
        tag += f"-w{cond.guidance:g}"
    return run.dir / "samples" / f"{tag}-seed{opt.seed}"
