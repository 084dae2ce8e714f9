"""The losses of the KL autoencoder of latent diffusion (Rombach et al. 2022; LDM's ``contperceptual.py``,
``LPIPSWithDiscriminator``), as plain functions the training task composes:

- the reconstruction: the mean absolute error per image (:func:`reconstruction_l1`), plus a perceptual distance from
  a network the user provides (:func:`load_perceptual`; nothing is downloaded);
- the KL term of the posterior against N(0, I), per image value (:func:`kl_per_pixel`), weighted 1e-6 as in LDM;
- the adversarial terms of a patch discriminator: the hinge loss of the discriminator (:func:`hinge_d_loss`) and
  the generator's -mean(logits) (:func:`generator_loss`), mixed in with LDM's adaptive weight
  (:func:`adaptive_weight`).

Images are the library's float [-1, 1], [B, C, H, W]. Per-sample losses are [B] so that the training loop can
average them over the whole batch (not the micro-batch) and report them per image.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["adaptive_weight", "generator_loss", "hinge_d_loss", "hinge_d_loss_per_sample", "kl_per_pixel",
           "load_perceptual", "reconstruction_l1"]

KL_WEIGHT = 1e-6  # LDM's kl_weight (configs/autoencoder/*.yaml), meant per image value: see kl_per_pixel
DISC_WEIGHT = 0.5  # LDM's disc_weight: the factor on the adaptive weight (configs/autoencoder/*.yaml)


def reconstruction_l1(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """|x - recon| averaged over C, H, W: [B] (LDM contperceptual.py, rec_loss = |inputs - reconstructions|)."""
    if x.shape != recon.shape:
        raise ValueError(f"images {list(x.shape)} and reconstructions {list(recon.shape)} differ in shape")
    return (x - recon).abs().flatten(1).mean(1)


def kl_per_pixel(posterior_kl: torch.Tensor, num_pixels: int) -> torch.Tensor:
    """The posterior's KL (summed over the latent's C, h, w), divided by the number of image values C * H * W: [B].

    LDM weighs the KL sum by ``kl_weight`` = 1e-6 against a reconstruction loss that is *summed* over the image
    (contperceptual.py: ``torch.sum(nll_loss) / nll_loss.shape[0]`` beside ``torch.sum(kl_loss) / kl_loss.shape[0]``).
    Here the reconstruction is *averaged* over the image values (:func:`reconstruction_l1`), i.e. divided by
    C * H * W; dividing the KL sum by the same number keeps the ratio of the two terms, so LDM's 1e-6 keeps its
    meaning: ``l1 + 1e-6 * kl_per_pixel`` is LDM's loss divided by C * H * W.
    """
    if isinstance(num_pixels, bool) or int(num_pixels) != num_pixels or num_pixels < 1:
        raise ValueError(f"num_pixels must be a positive integer (C * H * W of the images), got {num_pixels!r}")
    return posterior_kl / int(num_pixels)


def hinge_d_loss_per_sample(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss of each image pair: [B], the mean over each logit map."""
    real = F.relu(1.0 - logits_real).flatten(1).mean(1)
    fake = F.relu(1.0 + logits_fake).flatten(1).mean(1)
    return 0.5 * (real + fake)  # LDM discriminator.py hinge_d_loss; Lim & Ye 2017 (geometric GAN)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake)), a scalar; 0 once every
    real logit is >= 1 and every fake one <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())  # LDM hinge_d_loss


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's (the decoder's) adversarial loss: -mean(logits of the reconstructions), a scalar."""
    return -logits_fake.mean()  # LDM contperceptual.py, g_loss = -torch.mean(logits_fake)


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, reduce=None) -> torch.Tensor:
    """The weight of the adversarial loss that balances its gradient at the decoder's last layer against the
    reconstruction's: ||d rec / d last|| / (||d g / d last|| + 1e-4), clamped to [0, max_weight], detached
    (LDM eq. 6; contperceptual.py ``calculate_adaptive_weight``). LDM multiplies it by ``disc_weight`` (0.5).

    Both losses must be scalars of one graph through ``last_layer`` (the decoder's output conv weight); the graph is
    kept for the backward pass that follows. 0 when either loss does not depend on ``last_layer`` (a discriminator
    not yet switched on, a frozen decoder).

    ``reduce``, when given, maps each of the two gradients before its norm is taken: the mean over the processes of
    a distributed run, so that the weight is that of the global batch's gradients (on one process, the batch's),
    the same on every rank and for any number of them.
    """
    if not last_layer.requires_grad:
        raise ValueError("last_layer does not require a gradient: the adaptive weight needs the decoder's weight")
    zero = torch.zeros((), device=last_layer.device, dtype=last_layer.dtype)
    if not g_loss.requires_grad:
        return zero
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    if g_grad is None:
        return zero
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    if rec_grad is None:
        return zero
    if reduce is not None:
        rec_grad, g_grad = reduce(rec_grad), reduce(g_grad)
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)  # LDM eq. 6, with LDM's delta = 1e-4
    return weight.clamp(0.0, float(max_weight)).detach()


def load_perceptual(spec: str, *, image_shape=(3, 32, 32)) -> nn.Module:
    """A perceptual distance the user provides, named ``"package.module:factory"``: ``factory()`` must return an
    ``nn.Module`` mapping two image batches (x, y) in [-1, 1] [B, C, H, W] to a distance per image [B] (an
    LPIPS-style network; ddpmkit downloads nothing). Its parameters are frozen and it is put in eval mode.

    It is tried once on two random images of ``image_shape`` (C, H, W: those of the training data). Anything wrong
    (the spec, the import, the factory, its result, its output's shape) is one ConfigError line.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"perceptual loss {spec!r}: expected 'package.module:factory'")
    mod_name, attr = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # a missing module, or one that fails while importing
        raise ConfigError(f"perceptual loss {spec!r}: cannot import {mod_name} ({_why(e)})") from e
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ConfigError(f"perceptual loss {spec!r}: {mod_name} has no {attr}")
    if not callable(factory):
        raise ConfigError(f"perceptual loss {spec!r}: {attr} is not callable")
    try:
        net = factory()
    except Exception as e:
        raise ConfigError(f"perceptual loss {spec!r}: {attr}() failed ({_why(e)})") from e
    if not isinstance(net, nn.Module):
        raise ConfigError(f"perceptual loss {spec!r}: {attr}() returned a {type(net).__name__}, not an nn.Module")
    net.eval()
    net.requires_grad_(False)
    _check_perceptual(net, spec, tuple(image_shape))
    return net


def _why(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _check_perceptual(net: nn.Module, spec: str, shape: tuple) -> None:
    """Call the network once on two random images of ``shape`` and check that it gives a distance each, [2]."""
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x, y = (torch.rand(2, *shape, generator=g) * 2 - 1 for _ in range(2))
    try:
        with torch.no_grad():
            d = net(x.to(device), y.to(device))
    except Exception as e:
        raise ConfigError(f"perceptual loss {spec!r}: it fails on two {'x'.join(map(str, shape))} images in "
                          f"[-1, 1] ({_why(e)})") from e
    if not isinstance(d, torch.Tensor) or tuple(d.shape) != (2,):
        got = list(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ConfigError(f"perceptual loss {spec!r}: it must give one distance per image, [B] = [2], got {got}")
