"""Evaluation: the variational bound (negative log-likelihood) in bits per dimension.

The bound is computed term by term as the official DDPM code does (Ho et al. 2020, eq. 5):

    L = L_T + sum_{t>=2} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                    (the prior term)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))  (for 1-indexed t >= 2)
    L_0     = -log p(x_0 | x_1)                              (a discretized Gaussian decoder, DDPM eq. 13)

With this library's 0-indexed timesteps, term ``t`` (t = 0..T-1) is the decoder NLL at t = 0 and the KL at
t >= 1; index T of the curves returned here is the prior term. Every term is the mean over the dimensions of
one image divided by ln 2, so the terms add up to the bound in bits/dim. Each term draws its own x_t from
q(x_t | x_0), and many timesteps share one network call (the batch is replicated over a chunk of t values).

A class-conditional model is evaluated as -log p(x_0 | y): by default y is each image's true label from the data
source; one label for all images (``--class 3``) or the null class (``--class none``: the model as the unconditional
one its label dropout trained) can be asked for instead. A guidance weight w > 0 makes the reverse chain the guided
one, eps = (1 + w) eps(x, y) - w eps(x, null) (Ho & Salimans 2022 eq. 6) with the run's variance: the chain DDPM's
ancestral sampler walks with guidance. The bound holds for any Gaussian reverse chain (DDPM eq. 5), so it then bounds
-log of what that sampler draws, not of the unguided model.

A latent diffusion run (Rombach et al. 2022) diffuses the scaled latents z = (mean(q(z | x)) - shift) * scale of
its autoencoder, so its data are the encoded images and the bound is computed on them. DDPM's decoder is a
discretized Gaussian over 256 pixel levels, which means nothing for continuous latents; there L_0 is the continuous
Gaussian -log N(z_0; mu_theta(z_1, 1), sigma_1^2) (the continuous-data bound of Sohl-Dickstein et al. 2015, VDM's
continuous likelihood). The sum is then in bits per latent dimension: a bound on -log of the density of the *scaled*
latents, not on the images' likelihood (the autoencoder's own reconstruction term and the log-determinant of the
scale are not in it), not comparable with pixel bits/dim, and possibly negative (a density, not a probability).
:func:`unscaled_nats` adds the log-determinant of the scale: the bound on the density of the unscaled posterior means.

Plotting the per-t curve belongs to ``viz.plots``; :func:`write_terms_csv` writes it to a file.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..diffusion import Denoiser, NoiseSchedule, extract, q_sample
# the terms themselves live in the diffusion package (the training loss of a learned variance uses them too)
from ..diffusion.bound import (approx_standard_normal_cdf, discretized_gaussian_log_likelihood,  # noqa: F401
                              normal_kl, vlb_term_bits)
from ..errors import ConfigError, DataError
from ..files import atomic_write_text

__all__ = [
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "continuous_decoder_bits",
    "DECODERS",
    "prior_bpd",
    "bpd_terms",
    "nll_bpd",
    "write_terms_csv",
    "unscaled_nats",
    "evaluate_nll",
    "LATENT_UNIT",
    "LATENT_NOTE",
]

_LN2 = math.log(2.0)

# the decoder term L_0: DDPM's discretized Gaussian over 8-bit pixels, or a continuous Gaussian density (latents)
DECODERS = ("discretized", "continuous")

LATENT_UNIT = "bits per latent dimension"
LATENT_NOTE = ("a bound on -log2 of the density of the scaled latents (continuous Gaussian L_0), not comparable with "
               "pixel bits/dim and not a likelihood of the images: the autoencoder's reconstruction term and the "
               "log-determinant of the scale are not in it; it can be negative (a density, not a probability)")


# ---------------------------------------------------------------------------------------- the bound


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_var)), the continuous density, in nats per element (arguments broadcast)."""
    # Gaussian log-density: -0.5 (log 2 pi + log sigma^2 + (x - mu)^2 / sigma^2)
    return -0.5 * (math.log(2.0 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def continuous_decoder_bits(x0: torch.Tensor, model_mean: torch.Tensor, model_log_var: torch.Tensor) -> torch.Tensor:
    """L_0 = -log N(x_0; mu_theta(x_1, 1), sigma_1^2) per image in bits/dim [B]: the decoder of continuous data."""
    # Sohl-Dickstein et al. 2015 / VDM: the continuous-data bound's L_0 = -log p(x_0 | x_1), / ln 2 for bits
    return -gaussian_log_likelihood(x0, model_mean, model_log_var.expand_as(x0)).flatten(1).mean(dim=1) / _LN2


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per image [B]."""
    T = schedule.T
    t = torch.full((x0.shape[0],), T - 1, dtype=torch.long, device=x0.device)
    # DDPM eq. 4: q(x_T | x_0) = N(sqrt(ab_T) x_0, (1 - ab_T) I)
    mean = extract(schedule.sqrt_alpha_bar, t, x0.ndim) * x0
    logvar = extract(schedule.log_one_minus_alpha_bar, t, x0.ndim)
    # DDPM eq. 5: L_T = KL(q(x_T|x_0) || p(x_T)), p(x_T) = N(0, I); / ln 2 for bits
    return _mean_flat(normal_kl(mean, logvar, 0.0, 0.0).expand_as(x0)) / _LN2


def _auto_t_batch(B: int, T: int) -> int:
    return max(1, min(T, 256 // max(B, 1)))


@torch.inference_mode()
def bpd_terms(denoiser: Denoiser, x0: torch.Tensor, *, generator: torch.Generator | None = None,
              t_batch: int | None = None, noise: torch.Tensor | None = None, cond=None,
              decoder: str = "discretized") -> torch.Tensor:
    """Every term of the variational bound for a batch, in bits/dim: a tensor [B, T+1].

    Column t (0 <= t < T) is the decoder NLL -log p(x_0 | x_1) at t = 0 and
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) at t >= 1 (1-indexed x's); column T is the prior term.
    The row sum is the bound on -log2 p(x_0) per dimension.

    ``decoder``: ``discretized`` (DDPM eq. 13; ``x0`` [B, C, H, W] in [-1, 1] on the 256-level grid) or
    ``continuous`` (a Gaussian density; any real ``x0``, e.g. a latent run's latents): only column 0 differs.
    p(x_{t-1} | x_t) is the ``denoiser``'s
    (``Denoiser.p_mean_variance``: its objective, variance and clipping). ``t_batch`` timesteps share one
    network call (B * t_batch inputs; default: about 256 inputs). ``noise`` ([T, B, C, H, W], optional) fixes
    the eps of x_t for every t; otherwise it is drawn from ``generator`` (independently for every t). ``cond``
    (default the denoiser's own): the class labels of the images, int64 [B], or one label for all of them.
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}: choose one of {', '.join(DECODERS)}")
    x0 = x0.float()
    device = x0.device
    den = denoiser if denoiser.schedule.device == device else denoiser.to(device)
    if den.variance == "analytic" and den.clip_sigma:  # the sampling-only clip of the last noisy step stays out
        den = den._replace(clip_sigma=False)
    sched = den.schedule
    T, B = sched.T, x0.shape[0]
    if noise is not None and tuple(noise.shape) != (T, *x0.shape):
        raise ValueError(f"noise must have shape {(T, *x0.shape)}, got {tuple(noise.shape)}")
    k = _auto_t_batch(B, T) if t_batch is None else max(1, min(int(t_batch), T))
    cond = den.cond if cond is None else cond
    if cond is not None:
        cond = torch.as_tensor(cond, device=device)
        cond = cond.expand(B) if cond.ndim == 0 else cond
        if tuple(cond.shape) != (B,):
            raise ValueError(f"cond must hold one label per image ({B}), got shape {tuple(cond.shape)}")
    out = torch.empty(B, T + 1, dtype=torch.float32, device=device)

    for start in range(0, T, k):
        ts = torch.arange(start, min(start + k, T), device=device)
        kk = ts.shape[0]
        t = ts.repeat_interleave(B)                                   # [kk*B]: t-major, images inner
        xs = x0.repeat(kk, *([1] * (x0.ndim - 1)))                    # [kk*B, C, H, W]
        if noise is not None:
            eps = noise[start:start + kk].reshape(xs.shape).to(device=device, dtype=torch.float32)
        else:
            gen_device = generator.device if generator is not None else device
            eps = torch.randn(xs.shape, generator=generator, device=gen_device).to(device)
        x_t = q_sample(sched, xs, t, eps)                             # DDPM eq. 4
        c = None if cond is None else cond.repeat(kk)                 # the labels follow the images' layout
        model_mean, model_logvar, _ = den.p_mean_variance(x_t, t, c)  # DDPM eq. 7 with x0_hat
        # DDPM eq. 5 (KL terms) and eq. 13 (the decoder), bits/dim: diffusion/bound.py
        terms = vlb_term_bits(sched, xs, x_t, t, model_mean, model_logvar)
        if decoder == "continuous":  # L_0 of continuous data; the KL terms are the same
            terms = torch.where(t == 0, continuous_decoder_bits(xs, model_mean, model_logvar), terms)
        out[:, start:start + kk] = terms.reshape(kk, B).T
    out[:, T] = prior_bpd(sched, x0)
    return out


def _iter_batches(images, n: int | None, batch_size: int) -> Iterable[torch.Tensor]:
    """Float batches in [-1, 1] from a uint8/float tensor [N, C, H, W] or an iterable of such batches."""
    from ..images import from_uint8

    def convert(b: torch.Tensor) -> torch.Tensor:
        return from_uint8(b) if b.dtype == torch.uint8 else b.float()

    seen = 0
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise DataError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        total = images.shape[0] if n is None else min(n, images.shape[0])
        for i in range(0, total, batch_size):
            yield convert(images[i:min(i + batch_size, total)])
        return
    for b in images:
        if n is not None and seen >= n:
            return
        b = b if n is None else b[:n - seen]
        seen += b.shape[0]
        yield convert(b)


def nll_bpd(denoiser: Denoiser, images, *, n: int | None = None, batch_size: int = 16, seed: int = 0,
            t_batch: int | None = None, device=None, progress: Callable[[int], None] | None = None,
            labels=None, encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
            decoder: str = "discretized") -> dict:
    """The variational bound in bits/dim of ``denoiser`` over ``n`` images (all when None).

    ``images``: uint8 [N, C, H, W] (converted to [-1, 1]), float [N, C, H, W] in [-1, 1], or an iterable of
    such batches. ``device`` defaults to the network's. Returns a dict: ``bpd`` (mean bound), ``bpd_stderr``
    (standard error over images), ``terms`` (mean bits/dim per term, length T+1: index t < T is term t, index
    T the prior), ``prior_bpd``, ``decoder_bpd``, ``n`` (images used), ``seconds``. ``labels`` (a
    class-conditional denoiser): int64 [N], image i's label, or one label (an int) for all images.

    ``encode`` (a latent run: its latent space's ``encode``) maps each batch, on ``device``, to the data the
    denoiser diffuses before the bound is computed; ``decoder`` is :func:`bpd_terms`'s.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if n is not None and n < 1:
        raise ConfigError(f"n must be positive, got {n}")
    per_image = torch.is_tensor(labels) and labels.ndim == 1
    if per_image and not (isinstance(images, torch.Tensor) and labels.shape[0] == images.shape[0]):
        raise DataError("labels [N] need an image tensor [N, C, H, W]: one label per image")
    device = denoiser.device if device is None else torch.device(device)
    den = denoiser.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    rows = []
    count = 0
    for b in _iter_batches(images, n, batch_size):
        y = labels[count:count + b.shape[0]] if per_image else labels
        b = b.to(device)
        if encode is not None:
            b = encode(b).to(device)
        rows.append(bpd_terms(den, b, generator=generator, t_batch=t_batch, cond=y, decoder=decoder).cpu().double())
        count += b.shape[0]
        if progress is not None:
            progress(count)
    if not rows:
        raise DataError("no images to evaluate")
    terms = torch.cat(rows)                                           # [N, T+1]
    totals = terms.sum(dim=1)                                         # DDPM eq. 5: the bound, bits/dim
    N = totals.shape[0]
    stderr = float(totals.std(unbiased=True) / math.sqrt(N)) if N > 1 else float("nan")
    curve = terms.mean(dim=0)
    return {
        "bpd": float(totals.mean()),
        "bpd_stderr": stderr,
        "terms": [float(v) for v in curve],
        "prior_bpd": float(curve[-1]),
        "decoder_bpd": float(curve[0]),
        "n": N,
        "seconds": time.perf_counter() - start,
    }


def write_terms_csv(path, curve, *, column: str = "bits") -> Path:
    """Write the per-term curve (length T+1, the last entry the prior at t = T) as CSV ``t,<column>`` (``bits``
    per dimension; a latent run's ``bits_per_latent_dim``), atomically."""
    lines = [f"t,{column}"] + [f"{i},{float(v):.8g}" for i, v in enumerate(curve)]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def unscaled_nats(bits_per_dim: float, scale, latent_shape) -> dict:
    """A latent bound moved from the scaled latents z = (m - shift) * scale to the unscaled posterior means m.

    ``bits_per_dim``: the bound on -log2 p(z) per latent dimension; ``scale``: one number per latent channel (or
    one for all); ``latent_shape``: (C, h, w). Returns ``nats`` (the bound on -log p(m) of one latent, in nats),
    ``nats_per_dim`` and ``log_det_nats`` (the term added: -sum over dimensions of log scale).
    """
    C, h, w = (int(v) for v in latent_shape)
    s = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
    s = s.expand(C) if s.numel() == 1 else s
    if s.numel() != C:
        raise ValueError(f"scale must hold one number or one per latent channel ({C}), got {s.numel()}")
    D = C * h * w
    # change of variables: p_m(m) = p_z(z) |det dz/dm| with dz/dm = diag(scale), so
    # -log p_m(m) = -log p_z(z) - sum_dims log scale (the shift does not change a density)
    log_det = -float(h * w * torch.log(s).sum())
    nats = float(bits_per_dim) * D * _LN2 + log_det
    return {"nats": nats, "nats_per_dim": nats / D, "log_det_nats": log_det}


# ---------------------------------------------------------------------------------------- a run directory


def evaluate_nll(run_dir, *, data=None, split: str = "test", n: int | None = 256, batch_size: int = 16,
                 ema: bool = True, variance: str | None = None, seed: int = 0, t_batch: int | None = None,
                 clip_x0: bool = True, progress: Callable[[int], None] | None = None, classes=None,
                 guidance: float | None = None) -> dict:
    """The variational bound in bits/dim of a trained run on its data (or ``data``).

    The run (a Run, or any path ``Run.open`` accepts) gives the Denoiser: its network (EMA weights by default),
    schedule and objective, and ``variance`` unless given (the config's ``diffusion.variance``, else
    ``small``). The data source, size and channels come from the run's config unless ``data`` names another
    source. Sources with one split (digits, folders) fall back to ``train``; the result's ``split`` and
    ``note`` say so.

    A class-conditional run is conditioned on the images' true labels, or on ``classes`` (one class, or ``none``:
    the null class), and guided with weight ``guidance`` (default 0: the model itself; see the module's notes).
    The result's ``conditioning`` says which (None for an unconditional run), ``tag`` is a file-name suffix for it.
    Every setting is checked before the model is loaded.

    A latent run's images (of its ``pixel_shape``) are encoded batch by batch by its autoencoder and the bound is
    computed on the scaled latents with a continuous Gaussian L_0 (see the module's notes): ``space`` is then
    ``latent``, ``unit`` and ``space_note`` say what the number is, ``latent_shape`` gives its dimensions and
    ``unscaled`` the same bound on the unscaled posterior means (:func:`unscaled_nats`). A pixel run's ``space``
    is ``pixel``.
    """
    from ..data import load_dataset, parse_source
    from ..run import Run
    from ..request import guidance_weight, one_class_label

    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)  # an opened Run is used as it is
    label = one_class_label(classes, run.class_names, run.null_class)
    null = label is not None and label == run.null_class
    if null and guidance:
        raise ConfigError("--guidance: with --class none the model is the unconditional one; there is nothing to "
                          "guide (give a class, or leave out --guidance)")
    w = None
    if guidance is not None:  # checked (a number >= 0, a null class to guide with) as `sample` does
        w = guidance_weight(guidance, run.class_names, run.null_class) or None
    if variance is None:
        variance = run.variance
    train = run.config.get("train") or {}
    source = data if data is not None else train.get("data", "digits")
    note = None
    kind, _ = parse_source(source)
    if split != "train" and kind != "cifar10":
        note = f"the {kind} source has only a train split; evaluated on train images"
        split = "train"
    image_size, channels = train.get("image_size"), train.get("channels")
    if run.is_latent:  # the images the autoencoder encodes, not the latents' shape
        channels, image_size, _ = run.pixel_shape
    ds = load_dataset(source, image_size=image_size, channels=channels,
                      data_dir=train.get("data_dir"), download=False, split=split, progress=False)
    labels, conditioning, tag = None, None, ""
    if run.class_cond and label is None:
        if ds.labels is None:
            raise DataError(f"{run.dir} is class-conditional and {source} has no labels: pass --class none for the "
                            f"bound under the null class, or --class K for one class")
        if ds.labels.numel() and int(ds.labels.max()) >= len(run.class_names):
            raise DataError(f"{source} has labels up to {int(ds.labels.max())}, {run.dir} knows "
                            f"{len(run.class_names)} classes: pass --class none, or --class K for one class")
        labels, conditioning = ds.labels, "true labels"
    elif run.class_cond:
        labels = label
        conditioning = "null class (unconditional)" if null else f"class {run.class_names[label]}"
        tag = "-classnone" if null else f"-class{label}"
    if w:
        conditioning, tag = f"{conditioning}, guidance w = {w:g}", f"{tag}-w{w:g}"
    denoiser = run.denoiser(ema=ema, variance=variance, clip_x0=clip_x0, guidance=w)
    encode, decoder, space = None, "discretized", None
    if run.is_latent:  # the data of a latent run are its latents: encoded on the denoiser's device
        space = run.latent_space().to(denoiser.device)
        encode, decoder = space.encode, "continuous"
    result = nll_bpd(denoiser, ds.images, n=n, batch_size=batch_size, seed=seed, t_batch=t_batch,
                     progress=progress, labels=labels, encode=encode, decoder=decoder)
    result.update({"source": str(source), "split": split, "variance": variance, "objective": denoiser.objective,
                   "ema": ema, "T": denoiser.T, "conditioning": conditioning, "guidance": w, "tag": tag,
                   "seed": seed, "space": "pixel", "decoder": decoder})
    if space is not None:
        shape = run.image_shape  # the latents' (C, h, w)
        result.update({"space": "latent", "unit": LATENT_UNIT, "space_note": LATENT_NOTE,
                       "latent_shape": list(shape), "unscaled": unscaled_nats(result["bpd"], space.scale, shape)})
    if note is not None:
        result["note"] = note
    return result
