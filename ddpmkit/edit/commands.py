"""``ddpmkit inpaint`` and ``ddpmkit edit``: a run, an image and a mask or strengths in; PNGs and one figure out.

Result k of input i is sample number i * n + k of the noise streams (seed, index) (``PerSampleNoise``), so the
images do not depend on the batch size. Everything is checked (run, image, mask, settings) before any work, and
every file is written atomically.

A class-conditional run edits each image under one label: by default the image's own (``digits:K`` of a run trained
on the digits), guided with ``DEFAULT_GUIDANCE`` like ``sample``; an image without a label takes the null class (the
model as an unconditional one, unguided). ``--class K`` or ``--class none`` sets the label of every input.

A latent run works in pixels at its edges: the image and the mask are the decoded images' size, the image is
encoded once, the chain runs on latents, and what is written is decoded (:mod:`ddpmkit.edit.latent` says how, and
what inpainting that way costs).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from ..files import output_dir
from ..images import to_uint8
from ..run import Run
from ..samplers.noise import PerSampleNoise
from .latent import (PasteStats, encode_images, latent_factor, latent_mask, repaint_latent, sdedit_latent,
                     upsample_mask)
from .masks import EditError, load_images, masked_view, parse_mask
from .repaint import repaint, repaint_model_calls
from .sdedit import check_strength, sdedit, sdedit_timesteps

__all__ = ["inpaint_run", "edit_run", "parse_strengths", "edit_conditioning", "DEFAULT_INPAINT_STEPS"]

# RePaint section 5: 250 timesteps of the T = 1000 process (respaced), J = 10, R = 10
DEFAULT_INPAINT_STEPS = 250


def _tag(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", Path(s).stem if Path(s).suffix else s).strip("_") or "x"


def _check_count(name: str, v) -> int:
    from ..limits import check_int

    return check_int(f"--{name.replace('_', '-')}", v, 1, None, EditError)


def _denoiser(run: Run, *, ema: bool, variance, clip_x0: bool, device, guidance=None):
    from ..diffusion import VARIANCES

    if variance is not None and variance not in VARIANCES:
        raise EditError(f"unknown variance {variance!r}: choose {' or '.join(VARIANCES)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return run.denoiser(ema=ema, variance=variance, clip_x0=clip_x0, device=dev, guidance=guidance)


def edit_conditioning(run: Run, classes, guidance, own: torch.Tensor | None, N: int):
    """``(labels [N] or None, guidance w or None, folder tag, description)`` for N input images whose labels are
    ``own`` (None: they have none); see the module's notes. One-line errors, before any work."""
    from ..data import parse_source
    from ..request import guidance_weight, one_class_label

    def weight() -> float | None:  # as `sample`: a number >= 0, DEFAULT_GUIDANCE by default; refused when unconditional
        return guidance_weight(guidance, run.class_names, run.null_class, run.distilled_guidance)

    label = one_class_label(classes, run.class_names, run.null_class)  # refuses a class of an unconditional run
    if not run.class_cond:
        weight()  # refuses --guidance
        return None, None, "", None
    if parse_source((run.config.get("train") or {}).get("data", "digits"))[0] != "digits":
        own = None  # a digit's label means nothing to a run trained on other images
    if label is None and own is None:
        if run.null_class is None:
            raise EditError(f"{run.dir} is class-conditional without a null class and the image has no label: "
                            f"pass --class K")
        label = run.null_class
    if label is not None and label == run.null_class:
        if guidance:
            raise EditError("--guidance: the null class (--class none, the default for an image without a label) "
                            "is the unconditional model, there is nothing to guide; give --class K to guide")
        return torch.full((N,), label, dtype=torch.int64), None, "-classnone", "the null class (unconditional)"
    if label is None and int(own.max()) >= len(run.class_names):
        raise EditError(f"the image's label {int(own.max())} is not a class of {run.dir}: pass --class K or none")
    w = weight()
    labels = own.clone() if label is None else torch.full((N,), label, dtype=torch.int64)
    what = "each image's own label" if label is None else f"class {run.class_names[label]}"
    tag = ("" if label is None else f"-class{label}") + f"-w{w:g}"
    return labels, w or None, tag, f"{what}, guidance w = {w:g}"


def parse_strengths(text) -> list[float]:
    """``0.5`` or ``0.2,0.5,1`` -> a list of strengths, each checked to lie in [0, 1]."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise EditError("--strength needs at least one number in [0, 1]")
    return [check_strength(p.strip()) for p in parts]


def inpaint_run(run_path, *, image: str, mask: str, out=None, jump: int = 10, resample: int = 10, n: int = 8,
                steps: int | None = None, spacing: str = "uniform", variance=None, clip_x0: bool = True,
                seed: int = 0, batch_size: int = 64, ema: bool = True, device=None, resize: bool = False,
                classes=None, guidance: float | None = None) -> dict:
    """Inpaint ``image`` (a file or ``digits:I[,J,...]``) where ``mask`` is unknown, ``n`` times each; write
    ``inpainted_<i>_<k>.png`` and the figure ``inpaint.png`` (rows of original, masked, results) under ``out``.
    ``classes`` (one class or ``none``) and ``guidance``: a class-conditional run's (see the module's notes).

    A latent run inpaints its latents and pastes the known pixels back over the decoding (:mod:`.latent`, whose
    notes say what that costs); the image and the mask are in pixels, and so are the files and the figure, whose
    "masked" column then shows the pixels of the latent cells the model saw as known. The result's ``"latent"``
    says what the paste changed, and ``"note"`` says it in words.
    """
    from ..samplers import timesteps
    from ..viz.editing import save_inpaint_figure
    from ..viz.grids import save_images

    run = run_path if isinstance(run_path, Run) else Run.open(run_path)  # an opened Run is used as it is
    C, H, W = run.pixel_shape  # a latent run reads and writes pixels; its latents are run.image_shape
    f = latent_factor(run.pixel_shape, run.image_shape) if run.is_latent else None
    T = run.schedule.T
    for name, v in (("n", n), ("batch_size", batch_size), ("jump", jump), ("resample", resample)):
        _check_count(name, v)
    S = min(DEFAULT_INPAINT_STEPS, T) if steps is None else steps
    try:
        tau = timesteps(run.schedule, S, spacing)  # computed once, checked before any work
    except ValueError as e:
        raise EditError(f"--steps/--spacing: {e}") from None
    images, labels, names = load_images(image, (C, H, W), resize=resize)
    known = parse_mask(mask, (H, W), seed=seed, resize=resize)
    lknown = None
    if f is not None:
        lknown = latent_mask(known, f)
        if not bool(lknown.any()):
            raise EditError(f"--mask {mask}: no {f}x{f} block of the mask is wholly known, so the latent model "
                            f"(f = {f}) sees nothing of the image; give a mask whose known part holds whole blocks")
    N = images.shape[0]
    labels, w, ctag, cdesc = edit_conditioning(run, classes, guidance, labels, N)
    den = _denoiser(run, ema=ema, variance=variance, clip_x0=clip_x0, device=device, guidance=w)
    out = Path(out) if out is not None else (
        run.dir / "edits" / f"inpaint-{_tag(image)}-{_tag(mask)}-{S}steps-j{jump}-r{resample}{ctag}-seed{seed}")
    with output_dir(out) as out:  # made after every check; removed again if the work below fails before writing
        x0 = images.repeat_interleave(n, 0)
        ys = None if labels is None else labels.repeat_interleave(n, 0)  # row i * n + k is input i's
        if f is not None:  # each input encoded once, its latents repeated like its pixels
            z0 = encode_images(run.latent_space(), images, batch_size, den.device).repeat_interleave(n, 0)
            stats = PasteStats(known)
        results = []
        t0 = time.perf_counter()
        for start in range(0, x0.shape[0], batch_size):
            xb = x0[start:start + batch_size]
            db = den if ys is None else den.with_cond(ys[start:start + batch_size].to(den.device))
            if f is None:
                y = repaint(db, xb, known, jump=jump, resample=resample, noise=PerSampleNoise(seed, start),
                            timesteps=tau)
            else:
                y, decoded = repaint_latent(db, xb, known, z0[start:start + batch_size], factor=f, jump=jump,
                                            resample=resample, noise=PerSampleNoise(seed, start), timesteps=tau)
                stats.add(xb, decoded)
            results.append(y.cpu())
        seconds = time.perf_counter() - t0
        res = torch.cat(results)
        files = []
        u8 = to_uint8(res)
        for i in range(N):
            files += save_images(u8[i * n:(i + 1) * n], out, prefix=f"inpainted_{i:03d}", start=0)
        shown = known if f is None else upsample_mask(lknown, f)  # what the model saw as known
        fig = save_inpaint_figure(images, masked_view(images, shown), res.view(N, n, C, H, W), out / "inpaint.png")
        calls = repaint_model_calls(S, jump, resample)
        latent = note = None
        if f is not None:
            k = known.all(dim=1, keepdim=True)
            latent = {"factor": f, "latent_mask": lknown, "known_pixels": int(k.sum()),
                      "regenerated_pixels": int((k & ~upsample_mask(lknown, f)).sum()),
                      "known_rms": stats.rms, "edge_mean": stats.edge_mean}
            note = _inpaint_note(run, latent)
        return {"dir": out, "figure": fig, "files": files, "n": N * n, "seconds": seconds, "model_calls": calls,
                "steps": S, "images": images, "labels": labels, "names": names, "mask": known, "results": res,
                "guidance": w, "conditioning": cdesc, "latent": latent, "note": note}


def _inpaint_note(run: Run, latent: dict) -> str:
    """Two lines: where the latent chain ran and what the paste measured (see :mod:`.latent`)."""
    c, h, w = run.image_shape
    cells, f = latent["latent_mask"], latent["factor"]
    return (f"latent run (f = {f}): RePaint on {c}x{h}x{w} latents, {int(cells.sum())} of {cells.numel()} cells known "
            f"(all {f}x{f} pixels known); {latent['regenerated_pixels']} of the {latent['known_pixels']} known pixels "
            f"share a cell with the hole and were regenerated before the paste\n"
            f"cost: the known pixels are the input's, pasted over the decoding (off there by "
            f"{latent['known_rms']:.1f}/255 RMS); the seam at the mask's edge is the decoder's, not harmonised at "
            f"pixel level (the paste moved the edge's known pixels by {latent['edge_mean']:.1f}/255 on average)")


def edit_run(run_path, *, image: str, strengths, sample_options, out=None, device=None, resize: bool = False) -> dict:
    """SDEdit ``image`` at each strength, ``sample_options.n`` times each, with the sampler of ``sample_options``;
    write ``edit_s<strength>_<i>_<k>.png`` and the strip ``sdedit.png`` (input, then each strength) under ``out``.
    ``sample_options.classes`` (one class or ``none``) and ``.guidance``: see the module's notes.

    A latent run encodes the image, edits its latents and decodes them (:mod:`.latent`): strength 0 then gives the
    autoencoder's reconstruction; ``"latent"`` of the result holds its error, ``"note"`` says it in words.
    """
    from ..errors import ConfigError, SettingError
    from ..viz.editing import save_sdedit_strip
    from ..viz.grids import save_images

    run = run_path if isinstance(run_path, Run) else Run.open(run_path)  # an opened Run is used as it is
    C, H, W = run.pixel_shape  # a latent run reads and writes pixels; its latents are run.image_shape
    f = latent_factor(run.pixel_shape, run.image_shape) if run.is_latent else None
    strengths = parse_strengths(strengths) if isinstance(strengths, str) else [check_strength(s) for s in strengths]
    opt = sample_options
    try:
        plan = opt.plan(run.schedule, run.sampling_defaults())
    except SettingError:
        raise  # names its setting; the command line shows the flag
    except ConfigError as e:
        raise EditError(str(e)) from None
    images, labels, names = load_images(image, (C, H, W), resize=resize)
    N, n = images.shape[0], opt.n
    labels, w, ctag, cdesc = edit_conditioning(run, opt.classes, opt.guidance, labels, N)
    den = _denoiser(run, ema=opt.ema, variance=opt.variance, clip_x0=opt.clip_x0, device=device, guidance=w)
    sgs = "-".join(f"{s:g}" for s in strengths)
    out = Path(out) if out is not None else (
        run.dir / "edits" / f"sdedit-{_tag(image)}-s{sgs}-{plan.tag()}{ctag}-seed{opt.seed}")
    with output_dir(out) as out:  # made after every check; removed again if the work below fails before writing
        x0 = images.repeat_interleave(n, 0)
        ys = None if labels is None else labels.repeat_interleave(n, 0)  # row i * n + k is input i's
        latent = note = None
        if f is not None:  # each input encoded once, its latents repeated like its pixels
            z = encode_images(run.latent_space(), images, opt.batch_size, den.device)
            d = to_uint8(den.to_pixels(z).cpu()).float() - to_uint8(images).float()
            latent = {"factor": f, "reconstruction_rms": float(d.pow(2).mean().sqrt())}
            c, h, w_ = run.image_shape
            note = (f"latent run (f = {f}): edited on {c}x{h}x{w_} latents and decoded; strength 0 gives the "
                    f"autoencoder's reconstruction, off the input by {latent['reconstruction_rms']:.1f}/255 RMS")
            z0 = z.repeat_interleave(n, 0)
        edits, files, calls = [], [], []
        t0 = time.perf_counter()
        for s in strengths:
            parts = []
            for start in range(0, x0.shape[0], opt.batch_size):
                db = den if ys is None else den.with_cond(ys[start:start + opt.batch_size].to(den.device))
                if f is None:
                    parts.append(sdedit(db, x0[start:start + opt.batch_size], s, sampler=plan,
                                        noise=PerSampleNoise(opt.seed, start)).cpu())
                else:
                    parts.append(sdedit_latent(db, z0[start:start + opt.batch_size], s, sampler=plan,
                                               noise=PerSampleNoise(opt.seed, start)).cpu())
            e = torch.cat(parts)
            edits.append(e)
            calls.append(len(sdedit_timesteps(plan.timesteps, run.schedule.T, s)) * plan.model_calls
                         // max(plan.steps, 1))
            u8 = to_uint8(e)
            for i in range(N):
                files += save_images(u8[i * n:(i + 1) * n], out, prefix=f"edit_s{s:g}_{i:03d}", start=0)
        seconds = time.perf_counter() - t0
        strip = save_sdedit_strip(x0, edits, strengths, out / "sdedit.png")
        return {"dir": out, "figure": strip, "files": files, "n": N * n * len(strengths), "seconds": seconds,
                "model_calls": calls, "strengths": strengths, "plan": plan, "images": images, "labels": labels,
                "edits": edits, "guidance": w, "conditioning": cdesc, "latent": latent, "note": note}
