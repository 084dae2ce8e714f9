"""The page's requests, apart from HTTP: one run opened once, each request resolved as the command line resolves it,
the work done one request at a time, the chain handed out step by step.

A request is a JSON object (its fields below). :meth:`App.handle` checks it, waits for its turn at the model, then
calls ``emit(event)`` for each event of the work:

- ``start``: what will be drawn (the sampler or method, steps, labels, guidance);
- ``step``: one step of the chain, x_t and x0_hat of the first samples as PNG data URLs (thinned to at most
  ``MAX_FRAMES`` steps; step -1 is the starting noise);
- ``done``: the results, PNG data URLs at the run's size.

Every refusal happens before the first event: a :class:`RequestError`, or the library's own one-line
:class:`~ddpmkit.errors.DdpmkitError` (``status_of`` gives both their HTTP status and JSON body). A draw is
``ddpmkit sample`` with the same settings (the same :class:`~ddpmkit.request.Request`, the same noise streams), an
inpainting ``ddpmkit inpaint`` of one image with ``--n`` results, an edit ``ddpmkit edit`` at one strength; what
differs is that nothing is written: the images travel in the answer.

Fields:

- ``/api/sample``: ``sampler``, ``steps``, ``spacing``, ``options`` (the sampler's own, ``{"eta": 0.5}``), ``seed``,
  ``n``, ``class`` (a label or name; ``none``: the null class, the unconditional model; absent: the classes in
  turn), ``guidance``;
- ``/api/inpaint``: ``image`` and ``mask`` (data URLs; the mask white where known, at the run's size), ``resize``,
  ``steps``, ``jump``, ``resample``, ``seed``, ``n``, ``class``, ``guidance``;
- ``/api/edit``: ``image``, ``resize``, ``strength`` and the sampler's fields, ``seed``, ``n``, ``class``,
  ``guidance``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import io
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import numpy as np
import torch

from ..edit import (DEFAULT_JUMP, DEFAULT_RESAMPLE, check_mask, check_strength, latent_factor, latent_mask, repaint,
                    repaint_model_calls)
from ..edit.commands import DEFAULT_INPAINT_STEPS, edit_conditioning
from ..edit.latent import encode_images, repaint_latent, sdedit_latent
from ..edit.sdedit import sdedit, sdedit_timesteps
from ..errors import CheckpointError, DdpmkitError, SettingError
from ..images import from_uint8, to_uint8
from ..request import Conditioning, Request, SampleOptions, guidance_weight, one_class_label
from ..run import Run
from ..samplers import SAMPLERS, SPACINGS, PerSampleNoise, sampler_names, timesteps
from ..samplers.batches import sample_batches

__all__ = ["App", "RequestError", "status_of", "png_data_url", "MAX_N", "MAX_FRAMES", "MAX_BODY", "MAX_WAITING"]

MAX_N = 16  # images one request draws (a page shows them side by side)
CHAIN_SAMPLES = 8  # samples whose chain is streamed
MAX_FRAMES = 60  # chain steps streamed per request; a longer chain is thinned evenly, its last step always sent
MAX_WAITING = 16  # requests queued behind the one at work; one more is answered 503
MAX_BODY = 16 * 2**20  # bytes of one request (an uploaded image as a data URL)
MAX_UPLOAD_SIDE = 4096  # pixels along a side of an uploaded image, read from its header before it is decoded
MAX_UPLOAD_PIXELS = 2**24
MAX_JUMP, MAX_RESAMPLE = 1000, 100  # RePaint's J and R
MAX_REPAINT_LEVELS = 1_000_000  # steps x resample: the length of RePaint's walk
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
DENOISERS_KEPT = 2  # Denoisers (each with its copy of the weights) kept for reuse, one per guidance weight

FIELD_OF = {"classes": "class"}  # the settings whose field on the page has another name

_SAMPLER_FIELDS = ("sampler", "steps", "spacing", "options")
_COMMON_FIELDS = ("seed", "n", "class", "guidance")


class RequestError(DdpmkitError):
    """A request the page (or any client) got wrong: a one-line message, an HTTP status, the field it names."""

    def __init__(self, message: str, status: int = 400, field: str | None = None):
        super().__init__(message)
        self.status, self.field = status, field


def status_of(e: DdpmkitError) -> tuple[int, dict]:
    """The HTTP status and JSON body of a refused request: ``{"error": one line, "field": the field or absent}``.

    A refused setting names the page's field (``class``, not the flag ``--class``); every other error of the
    library is the user's too (a bad image, a class the run lacks), so it is a 400 with its own line.
    """
    if isinstance(e, RequestError):
        body = {"error": str(e)}
        if e.field:
            body["field"] = e.field
        return e.status, body
    if isinstance(e, SettingError):
        field = FIELD_OF.get(e.setting, e.setting)
        return 400, {"error": e.named(field), "field": field}
    return 400, {"error": str(e)}


# ---------------------------------------------------------------------------------------------- fields
def _check_fields(body, allowed, required=()) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: this request takes {', '.join(sorted(allowed))}",
                           field=unknown[0])
    for name in required:
        if body.get(name) is None:
            raise RequestError(f"missing field {name!r}", field=name)
    return body


def _typed(body: dict, name: str, default, fits, kind: str):
    """Field ``name`` of ``body`` (``default`` when absent or null), refused in one line unless ``fits`` it."""
    v = body.get(name)
    if v is None:
        return default
    if not fits(v):
        raise RequestError(f"{name} must be {kind}, got {_show(v)}", field=name)
    return v


def _int(body: dict, name: str, default=None):
    return _typed(body, name, default, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")


def _count(body: dict, name: str, default: int, most: int) -> int:
    """An integer field in [1, most]."""
    v = _int(body, name, default)
    if not 1 <= v <= most:
        raise RequestError(f"{name} must be an integer in [1, {most}], got {v}", field=name)
    return v


def _number(body: dict, name: str, default=None):
    return _typed(body, name, default, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")


def _text(body: dict, name: str, default=None):
    return _typed(body, name, default, lambda v: isinstance(v, str), "a string")


def _flag(body: dict, name: str, default: bool = False) -> bool:
    return _typed(body, name, default, lambda v: isinstance(v, bool), "true or false")


def _class(body: dict):
    """The ``class`` field as the command line's ``--class`` text: None when absent or empty."""
    v = body.get("class")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise RequestError(f"class must be a label, a class name or none, got {_show(v)}", field="class")
    text = str(v).strip()
    return text or None


def _options(body: dict) -> dict:
    v = body.get("options")
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(x, (int, float, str, bool)) for x in v.values()):
        raise RequestError(f"options must map a sampler's option to a number, got {_show(v)}", field="options")
    return dict(v)


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------- images
def png_data_url(image: torch.Tensor) -> str:
    """A float image [C, H, W] in [-1, 1] (C = 1 or 3), or uint8, as a ``data:image/png;base64,...`` URL."""
    from PIL import Image

    u8 = image if image.dtype == torch.uint8 else to_uint8(image)
    a = u8.cpu().numpy()
    pil = Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)),
                                                                              "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _data_urls(x: torch.Tensor) -> list[str]:
    return [png_data_url(img) for img in to_uint8(x.detach().float().cpu())]


def _open_upload(url, what: str):
    """A PIL image from a ``data:`` URL, its size checked from the header before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(f"{what} must be a data URL (data:image/png;base64,...), got {_show(url)}", field=what)
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError(f"{what}: only base64 data URLs are read (data:image/png;base64,...)", field=what)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: the data URL's base64 is damaged", field=what) from None
    try:
        im = Image.open(io.BytesIO(raw), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError:
        raise RequestError(f"{what}: the image is too large", 413, what) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(f"{what}: not an image ({', '.join(UPLOAD_FORMATS)})", field=what) from None
    w, h = im.size
    if max(w, h) > MAX_UPLOAD_SIDE or w * h > MAX_UPLOAD_PIXELS:
        im.close()
        raise RequestError(f"{what}: {w}x{h} pixels is too large (at most {MAX_UPLOAD_SIDE} a side and "
                           f"{MAX_UPLOAD_PIXELS:,} pixels)", 413, what)
    try:
        im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        im.close()
        raise RequestError(f"{what}: a damaged image ({e})", field=what) from None
    return im


def _upload_image(url, chw, resize: bool) -> torch.Tensor:
    """An uploaded image as float [1, C, H, W] in [-1, 1]: converted to the run's channels (grayscale or RGB), and
    resized (bicubic, as ``--resize``) only when asked."""
    from PIL import Image

    C, H, W = chw
    im = _open_upload(url, "image")
    with im:
        mode = "L" if C == 1 else "RGB"
        pic = im.convert(mode) if im.mode != mode else im
        if pic.size != (W, H):
            if not resize:
                raise RequestError(f"image: {pic.size[0]}x{pic.size[1]} pixels, the model's images are {W}x{H} "
                                   f"(send resize: true to resize it)", field="image")
            pic = pic.resize((W, H), Image.Resampling.BICUBIC)
        a = np.asarray(pic, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return from_uint8(torch.from_numpy(a.copy())).unsqueeze(0)


def _upload_mask(url, size) -> torch.Tensor:
    """A mask as bool [1, 1, H, W], True where known: white (128 or more) where known, as a mask file of ``ddpmkit
    inpaint``, at the run's size exactly."""
    H, W = size
    im = _open_upload(url, "mask")
    with im:
        if im.size != (W, H):
            raise RequestError(f"mask: {im.size[0]}x{im.size[1]} pixels, the model's images are {W}x{H}",
                               field="mask")
        a = np.asarray(im.convert("L"), dtype=np.uint8)
    known = check_mask(torch.from_numpy(a >= 128).view(1, 1, H, W), (1, H, W), what="mask")
    if bool(known.all()):
        raise RequestError("mask: every pixel is known: paint over the part to fill in", field="mask")
    return known


# ---------------------------------------------------------------------------------------------- the chain
class _Chain:
    """A sampler callback that emits x_t and x0_hat of the first samples at every step of ``total``, or at
    MAX_FRAMES steps evenly spaced from the first to the last (the steps of ``ChainRecorder``, which records the GIF
    of ``sample --gif``); ``decode`` turns a latent run's latents into images."""

    def __init__(self, emit: Callable, total: int, decode, samples: int, stopping: threading.Event):
        self.emit, self.total, self.decode, self.k = emit, max(int(total), 1), decode, samples
        self.stopping = stopping
        S, F = self.total, MAX_FRAMES
        self.wanted = set(range(S)) if S <= F else {(2 * k * (S - 1) + (F - 1)) // (2 * (F - 1)) for k in range(F)}

    def _urls(self, x):
        if x is None:
            return None
        x = x[: self.k]
        return _data_urls(x if self.decode is None else self.decode(x))

    def initial(self, x_T):
        self.emit({"type": "step", "step": -1, "total": self.total, "t": None, "x": self._urls(x_T), "x0": None})
        return self

    def __call__(self, i, t, x, x0_hat=None):
        if self.stopping.is_set():  # the server is stopping: the work ends at this step
            raise RequestError("the server is stopping", 503)
        i = int(i)
        if i not in self.wanted:
            return
        if isinstance(t, torch.Tensor):
            t = t.reshape(-1)[0].item() if t.numel() else None
        if isinstance(t, float) and t.is_integer():
            t = int(t)
        self.emit({"type": "step", "step": i, "total": self.total, "t": t, "x": self._urls(x),
                   "x0": self._urls(x0_hat)})


@dataclass
class _Job:
    """A checked request: the guidance weight of its Denoiser, what ``start`` says, and the work, which takes the
    Denoiser and ``emit`` and returns the results (float [n, C, H, W] in [-1, 1], images)."""

    guidance: float | None
    start: dict
    labels: list | None
    work: Callable


# ---------------------------------------------------------------------------------------------- the app
class App:
    """One opened diffusion run and the requests of its page, answered one at a time (a lock; at most
    ``MAX_WAITING`` wait).

    ``sample_sampler`` and ``edit_sampler``: the samplers a request that names none draws with, the command line's
    defaults of ``ddpmkit sample`` and ``ddpmkit edit`` (a distilled run's own sampler comes first, as there).
    """

    def __init__(self, run: Run, *, sample_sampler: str = "ddim", edit_sampler: str = "ddim", device=None,
                 log: Callable | None = None):
        if run.kind != "diffusion":
            raise CheckpointError(f"{run.dir} is an {run.kind} run; the page draws from a diffusion run")
        C = run.pixel_shape[0]
        if C not in (1, 3):
            raise CheckpointError(f"{run.dir} makes {C}-channel images; the page shows grayscale or RGB ones")
        self.run = run
        self.sample_sampler, self.edit_sampler = sample_sampler, edit_sampler
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.page = resources.files(__package__).joinpath("page.html").read_bytes()
        self._lock = threading.Lock()  # the model: one request at work
        self._guard = threading.Lock()  # the count of those waiting
        self._waiting = 0
        self._stopping = threading.Event()
        self._denoisers: dict = {}  # guidance weight -> Denoiser, the most recently used last

    @classmethod
    def open(cls, path, **kwargs) -> App:
        """The app of the run at ``path`` (``Run.open``), its weights loaded now, so that a broken run fails at once
        in one line (a DdpmkitError), before any request."""
        app = cls(Run.open(path), **kwargs)
        run = app.run
        w = guidance_weight(None, run.class_names, run.null_class, run.distilled_guidance)  # a default draw's
        with app._lock:
            app._denoiser(w)
        return app

    # ------------------------------------------------------------------ the run, for the page
    def info(self) -> dict:
        """What the page needs to build its form: the run's shape, classes, guidance, samplers and limits."""
        run = self.run
        C, H, W = run.pixel_shape
        own = run.sampling_defaults()
        samplers = []
        for name in sampler_names():
            info = SAMPLERS[name]
            try:
                plan = SampleOptions(sampler=name).plan(run.schedule, own)
            except DdpmkitError:  # a sampler this run cannot use at its default settings
                continue
            samplers.append({"name": name, "summary": info.summary, "steps": plan.steps, "spacing": plan.spacing,
                             "options": [{"name": o.name, "type": o.type.__name__, "default": o.default,
                                          "help": o.help, "min": o.minimum, "max": o.maximum}
                                         for o in info.options]})
        names = run.class_names
        default_w = guidance_weight(None, names, run.null_class, run.distilled_guidance)
        return {"run": str(run.dir), "name": run.dir.name, "image": [C, H, W], "latent": run.is_latent,
                "T": run.schedule.T, "classes": None if names is None else list(names),
                "null_class": run.null_class is not None,
                "guidance": None if names is None else {"default": default_w,
                                                        "fixed": run.distilled_guidance is not None},
                "sampler": own.get("sampler") or self.sample_sampler,
                "edit_sampler": own.get("sampler") or self.edit_sampler,
                "samplers": samplers, "spacings": list(SPACINGS),
                "inpaint": {"steps": min(DEFAULT_INPAINT_STEPS, run.schedule.T), "jump": DEFAULT_JUMP,
                            "resample": DEFAULT_RESAMPLE},
                "limits": {"n": MAX_N, "body": MAX_BODY, "upload_side": MAX_UPLOAD_SIDE, "frames": MAX_FRAMES,
                           "jump": MAX_JUMP, "resample": MAX_RESAMPLE}}

    # ------------------------------------------------------------------ requests
    def handle(self, kind: str, body, emit: Callable[[dict], None]) -> dict:
        """Check the request ``body`` of ``kind`` (``sample``, ``inpaint`` or ``edit``), wait for the model, do the
        work, emitting its events; returns the ``done`` event. Every refusal (a DdpmkitError) comes before the first
        event; an exception ``emit`` raises (the client went away) stops the work."""
        plans = {"sample": self._plan_sample, "inpaint": self._plan_inpaint, "edit": self._plan_edit}
        if kind not in plans:
            raise RequestError(f"no request {kind!r}: there are {', '.join(plans)}", 404)
        job = plans[kind](body)
        with self._turn():
            den = self._denoiser(job.guidance)
            t0 = time.perf_counter()
            emit({"type": "start", "kind": kind, **job.start, "labels": job.labels})
            images = job.work(den, emit)
            done = {"type": "done", "kind": kind, "images": _data_urls(images), "labels": job.labels,
                    "seconds": round(time.perf_counter() - t0, 3)}
            emit(done)
            return done

    def stop(self, timeout: float | None = None) -> bool:
        """Refuse new requests (503), end the one at work at its next step, and wait up to ``timeout`` seconds (None:
        as long as it takes) for the model to be free; whether it is."""
        self._stopping.set()
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._lock.release()
        return True

    @contextlib.contextmanager
    def _turn(self):
        """Wait for the model (the lock); RequestError 503 when MAX_WAITING requests wait already, or the app is
        stopping."""
        with self._guard:
            if self._stopping.is_set():
                raise RequestError("the server is stopping", 503)
            if self._waiting >= MAX_WAITING:
                raise RequestError(f"busy: {self._waiting} requests are waiting for the model; try again later", 503)
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._guard:
                self._waiting -= 1
        try:
            if self._stopping.is_set():
                raise RequestError("the server is stopping", 503)
            yield
        finally:
            self._lock.release()

    def _denoiser(self, guidance):
        """The run's Denoiser at ``guidance``, as ``ddpmkit sample`` and ``edit`` build it (EMA weights, the run's
        variance, x0 clipped); the last DENOISERS_KEPT are kept. Called under the lock."""
        den = self._denoisers.pop(guidance, None)
        if den is None:
            den = self.run.denoiser(ema=True, variance=None, clip_x0=True, device=self.device, guidance=guidance)
        self._denoisers[guidance] = den
        while len(self._denoisers) > DENOISERS_KEPT:
            self._denoisers.pop(next(iter(self._denoisers)))
        return den

    def _n(self, body) -> int:
        return _count(body, "n", 1, MAX_N)

    def _plan_sample(self, body) -> _Job:
        _check_fields(body, _SAMPLER_FIELDS + _COMMON_FIELDS)
        run, n, cls = self.run, self._n(body), _class(body)
        w = _number(body, "guidance")
        none = cls is not None and cls.lower() == "none"
        opt = SampleOptions(sampler=_text(body, "sampler"), default_sampler=self.sample_sampler,
                            steps=_int(body, "steps"), spacing=_text(body, "spacing"), options=_options(body),
                            n=n, batch_size=n, seed=_int(body, "seed", 0), ema=True,
                            classes=None if none else cls, guidance=None if none else w)
        req = Request.resolve(run, opt)  # the command line's checks: sampler, steps, options, class, guidance
        if none:  # the null class: the unconditional model, as `edit --class none`
            label = one_class_label("none", run.class_names, run.null_class)
            if w:
                raise SettingError("guidance", ": class none is the null class, the unconditional model; there is "
                                               "nothing to guide (send guidance 0 or none)")
            req = dataclasses.replace(req, conditioning=Conditioning(torch.full((n,), label, dtype=torch.int64),
                                                                     None, None))
        if req.n > MAX_N:
            raise RequestError(f"n: {req.n} images in all ({n} of each of {req.n // n} classes), more than the "
                               f"{MAX_N} a page draws at once", field="n")
        plan, cond = req.plan, req.conditioning
        labels = None if cond.labels is None else [int(y) for y in cond.labels]

        def work(den, emit):
            chain = _Chain(emit, plan.steps, den.decoder, min(req.n, CHAIN_SAMPLES), self._stopping)
            parts = [x.cpu() for _, x in sample_batches(den, n=req.n, shape=run.image_shape, sampler=plan,
                                                        seed=opt.seed, batch_size=req.n, labels=cond.labels,
                                                        on_first_batch=chain.initial, log=self.log)]
            return torch.cat(parts)

        start = {"sampler": plan.sampler, "steps": plan.steps, "spacing": plan.spacing, "options": plan.options,
                 "model_calls": plan.model_calls, "n": req.n, "seed": opt.seed, "guidance": cond.guidance,
                 "total": plan.steps}
        return _Job(cond.guidance, start, labels, work)

    def _edit_inputs(self, body):
        """The image, the labels and guidance of an edit, the number of results and the seed."""
        run = self.run
        image = _upload_image(body["image"], run.pixel_shape, _flag(body, "resize"))
        n = self._n(body)
        labels, w, _, conditioning = edit_conditioning(run, _class(body), _number(body, "guidance"), None, 1)
        ys = None if labels is None else labels.repeat_interleave(n, 0)
        return image, n, ys, w, conditioning, _int(body, "seed", 0)

    def _plan_inpaint(self, body) -> _Job:
        _check_fields(body, ("image", "mask", "resize", "steps", "jump", "resample") + _COMMON_FIELDS,
                      required=("image", "mask"))
        run = self.run
        C, H, W = run.pixel_shape
        T = run.schedule.T
        S = _int(body, "steps", min(DEFAULT_INPAINT_STEPS, T))
        jump = _count(body, "jump", DEFAULT_JUMP, MAX_JUMP)
        resample = _count(body, "resample", DEFAULT_RESAMPLE, MAX_RESAMPLE)
        try:
            tau = timesteps(run.schedule, S, "uniform")  # computed once, as `inpaint` does
        except ValueError as e:
            raise RequestError(f"steps: {e}", field="steps") from None
        if S * resample > MAX_REPAINT_LEVELS:
            raise RequestError(f"steps x resample = {S * resample:,} is more than the {MAX_REPAINT_LEVELS:,} a page "
                               f"request may walk", field="resample")
        known = _upload_mask(body["mask"], (H, W))
        f = latent_factor(run.pixel_shape, run.image_shape) if run.is_latent else None
        if f is not None and not bool(latent_mask(known, f).any()):
            raise RequestError(f"mask: no {f}x{f} block of the mask is wholly known, so the latent model (f = {f}) "
                               f"sees nothing of the image", field="mask")
        image, n, ys, w, conditioning, seed = self._edit_inputs(body)
        calls = repaint_model_calls(S, jump, resample)

        def work(den, emit):
            db = den if ys is None else den.with_cond(ys.to(den.device))
            x0 = image.repeat_interleave(n, 0)
            chain = _Chain(emit, calls, den.decoder, min(n, CHAIN_SAMPLES), self._stopping)
            kw = dict(jump=jump, resample=resample, noise=PerSampleNoise(seed, 0), timesteps=tau, callback=chain)
            if f is None:
                return repaint(db, x0, known, **kw).cpu()
            z0 = encode_images(run.latent_space(), image, 1, den.device).repeat_interleave(n, 0)
            return repaint_latent(db, x0, known, z0, factor=f, **kw)[0].cpu()

        start = {"method": "repaint", "steps": S, "jump": jump, "resample": resample, "model_calls": calls, "n": n,
                 "seed": seed, "guidance": w, "conditioning": conditioning, "total": calls}
        return _Job(w, start, None if ys is None else [int(y) for y in ys], work)

    def _plan_edit(self, body) -> _Job:
        _check_fields(body, ("image", "resize", "strength") + _SAMPLER_FIELDS + _COMMON_FIELDS, required=("image",))
        run = self.run
        strength = check_strength(_number(body, "strength", 0.5))
        n = self._n(body)
        opt = SampleOptions(sampler=_text(body, "sampler"), default_sampler=self.edit_sampler,
                            steps=_int(body, "steps"), spacing=_text(body, "spacing"), options=_options(body),
                            n=n, batch_size=n, seed=_int(body, "seed", 0), ema=True, classes=_class(body),
                            guidance=_number(body, "guidance"))
        plan = opt.plan(run.schedule, run.sampling_defaults())
        f = latent_factor(run.pixel_shape, run.image_shape) if run.is_latent else None
        image, n, ys, w, conditioning, seed = self._edit_inputs(body)
        visited = len(sdedit_timesteps(plan.timesteps, run.schedule.T, strength))

        def work(den, emit):
            db = den if ys is None else den.with_cond(ys.to(den.device))
            chain = _Chain(emit, visited, den.decoder, min(n, CHAIN_SAMPLES), self._stopping)
            kw = dict(sampler=plan, noise=PerSampleNoise(seed, 0), callback=chain)
            if f is None:
                return sdedit(db, image.repeat_interleave(n, 0), strength, **kw).cpu()
            z0 = encode_images(run.latent_space(), image, 1, den.device).repeat_interleave(n, 0)
            return sdedit_latent(db, z0, strength, **kw).cpu()

        start = {"method": "sdedit", "strength": strength, "sampler": plan.sampler, "steps": plan.steps,
                 "options": plan.options, "model_calls": visited * plan.model_calls // max(plan.steps, 1), "n": n,
                 "seed": seed, "guidance": w, "conditioning": conditioning, "total": visited}
        return _Job(w, start, None if ys is None else [int(y) for y in ys], work)
