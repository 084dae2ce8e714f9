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
from .request import Request, SampleOptions, SamplingPlan

__all__ = ["SampleOptions", "SamplingPlan", "Request", "generate", "default_out_dir"]

GRID_MAX = 256  # samples shown in grid.png; the rest are written and dropped, so memory stays bounded
ROW_MAX = 16  # samples of each class shown in the grid with one row per class


def _request(source, opt: SampleOptions | None) -> Request:
    """``source`` if it is a Request, else the request of ``opt`` on the run ``source`` (a Run or a path)."""
    if isinstance(source, Request):
        if opt is not None and opt is not source.options:
            raise ValueError("give the options of a resolved Request through Request.resolve, not beside it")
        return source
    if opt is None:
        raise TypeError("generate needs SampleOptions with a run (or a resolved Request)")
    return Request.resolve(source, opt)


def generate(request, out_dir, opt: SampleOptions | None = None, *, gif_path=None, device=None, progress=True,
             log=print) -> dict:
    """Draw ``opt.n`` samples from a run and write them under ``out_dir``; returns paths and timings.

    ``request`` is a resolved :class:`~ddpmkit.request.Request` (``opt`` then omitted), or a Run or a path to one
    with ``opt``.

    Samples are written batch by batch and only the first ``GRID_MAX`` are kept (``result["images"]``, the grid), so
    memory does not grow with ``n``. A CUDA out-of-memory error halves the batch size and retries, with a warning;
    the images stay the same.
    """
    from .progress import steps_bar
    from .samplers.batches import sample_batches
    from .files import atomic_write_text, output_dir
    from .viz import ChainRecorder, save_chain_gif, save_grid, save_images, save_labelled_grid

    req = _request(request, opt)
    run, opt, plan, cond, n_total = req.run, req.options, req.plan, req.conditioning, req.n
    denoiser = req.denoiser(device)

    # the folder is made only now, after every setting was checked; a failure below removes it again if empty
    with output_dir(out_dir) as out_dir:
        recorder = None

        def start_recorder(x_T):  # the first batch's chain, recorded for the GIF (anew after an out-of-memory retry)
            nonlocal recorder
            recorder = ChainRecorder(plan.model_calls, num_samples=min(opt.gif_samples, n_total),
                                     num_frames=opt.gif_frames, decode=denoiser.decoder)  # a latent run's decoder
            recorder.initial(x_T)
            return recorder

        rows = cond.classes if cond.classes is not None and len(cond.classes) > 1 else None  # one grid row per class
        per_row = min(opt.n, ROW_MAX)
        grid_images, files = [], []  # only the samples shown in the grid stay in memory
        t0 = time.perf_counter()
        # a bar of network calls, so that a 1000-step DDPM batch moves at every step (progress.py)
        with steps_bar(denoiser.net, n=n_total, batch_size=opt.batch_size, calls_per_batch=plan.model_calls,
                       desc=plan.sampler, disable=not progress) as bar:
            for start, x in sample_batches(denoiser, n=n_total, shape=run.image_shape, sampler=plan,
                                           seed=opt.seed, batch_size=opt.batch_size, log=log, labels=cond.labels,
                                           on_first_batch=start_recorder if gif_path else None):
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


def default_out_dir(request, opt: SampleOptions | None = None) -> Path:
    """``RUN/samples/<sampler>-<steps>-<spacing>[-<options>][-<variance>]-seed<K>`` (``Request.out_dir``);
    ``request`` as for :func:`generate`."""
    return _request(request, opt).out_dir()
