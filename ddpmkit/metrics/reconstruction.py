"""How well an autoencoder reconstructs images: PSNR per image, and the Frechet distance between the features of
the reconstructions and of the originals, with a figure of the two side by side.

The autoencoder is anything with ``encode(x) -> posterior`` and ``decode(z) -> images`` (the KL autoencoder of
``models.autoencoder``); an image is reconstructed from the posterior's mode (its mean), as LDM does when it
encodes data for the diffusion model, so the measure does not depend on a draw.

The features are those ``ddpmkit eval fid --features`` and the training probe (``metrics.quality``) use for a data
source: the digits classifier for the digits, Inception for anything else when its file is in the cache (never
downloaded here), none otherwise (the report then has ``fd = None`` and a note). The reference is the originals
themselves, not a training set: a perfect reconstruction has distance 0 (plus the rounding to uint8). The
``fd_stderr`` is the jackknife over the reconstructions (``quality.frechet_stderr``) with the originals' statistics
held fixed; the originals are a sample too, so it understates the spread over draws of both sets.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..images import from_uint8, to_uint8
from .frechet import frechet_distance, mean_cov
from .quality import classifier_view, frechet_stderr

__all__ = ["PSNR_CAP_DB", "ReconstructionReport", "evaluate_reconstruction", "feature_network",
           "missing_features_note", "psnr", "reconstruct", "save_reconstruction_figure"]

#: The PSNR of an exact reconstruction (MSE 0), and the most any image gets: the PSNR of an MSE of 4e-10, far below
#: the rounding of uint8 pixels (an error of half a level everywhere, (1/255)^2 = 1.5e-5, is 54.2 dB).
PSNR_CAP_DB = 100.0
_DATA_RANGE = 2.0  # images in [-1, 1]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of float images in [-1, 1] [B, C, H, W]: 10 log10(range^2 / MSE) with range 2, both
    images clamped to [-1, 1] first; at most ``PSNR_CAP_DB`` (an exact copy gets the cap, not inf). [B], float32."""
    if x.shape != y.shape or x.dim() < 2:
        raise ValueError(f"psnr compares two batches of one shape [B, ...], got {list(x.shape)} and {list(y.shape)}")
    a, b = x.detach().double().clamp(-1, 1), y.detach().double().clamp(-1, 1)
    mse = (a - b).pow(2).flatten(1).mean(1)
    floor = _DATA_RANGE ** 2 * 10.0 ** (-PSNR_CAP_DB / 10.0)  # the MSE at which the PSNR reaches the cap
    return (10.0 * torch.log10(_DATA_RANGE ** 2 / mse.clamp_min(floor))).float()  # PSNR = 10 log10(MAX^2 / MSE)


def _check_uint8(images) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[0] < 1:
        raise DataError(f"reconstruction reads uint8 images [N, C, H, W] with N >= 1, got {x.dtype} {list(x.shape)}")
    return x


def _mode(posterior) -> torch.Tensor:
    """The posterior's most likely latent: ``mode()`` where it has one (LDM's DiagonalGaussianDistribution), else
    its ``mean``, else the encoder's output itself (a deterministic encoder)."""
    if hasattr(posterior, "mode"):
        return posterior.mode() if callable(posterior.mode) else posterior.mode
    if hasattr(posterior, "mean") and isinstance(posterior.mean, torch.Tensor):
        return posterior.mean
    return posterior


@torch.no_grad()
def reconstruct(model, images_uint8, *, batch_size: int = 64, device="cpu") -> torch.Tensor:
    """Encode uint8 images [N, C, H, W] to the posterior's mode, decode, clamp: float32 [N, C, H, W] in [-1, 1] on
    the CPU, in batches of ``batch_size`` on ``device``. A module in training mode is evaluated in eval mode, and
    left as it was."""
    from ..limits import MAX_BATCH, check_int

    x8 = _check_uint8(images_uint8)
    batch_size = check_int("batch_size", batch_size, 1, MAX_BATCH)
    dev = torch.device(device)
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        out = []
        for i in range(0, x8.shape[0], batch_size):
            x = from_uint8(x8[i:i + batch_size]).to(dev)
            r = model.decode(_mode(model.encode(x)))
            out.append(r.float().clamp(-1, 1).cpu())
    finally:
        if was_training:
            model.train()
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- features
def feature_network(data, *, log=None):
    """The feature network for a data source, chosen as ``ddpmkit eval fid --features`` and the training probe
    choose it: a ``DigitsClassifier`` for ``"digits"`` (trained once and cached; its progress through ``log``); else
    ``InceptionFeatures`` when its file is in the cache; else None (:func:`missing_features_note` says why). A
    ``DigitsClassifier`` or a feature extractor (uint8 [N, C, H, W] -> [N, D], as ``InceptionFeatures``) is returned
    as it is; ``None`` gives None."""
    if data is None or not isinstance(data, str):
        return data
    if data.strip().lower() == "digits":
        from .digits import DigitsClassifier

        return DigitsClassifier.load_or_train(log=log)
    from .inception import InceptionFeatures, default_inception_path

    path = default_inception_path()
    return InceptionFeatures(path, progress=False, log=log) if path.is_file() else None


def missing_features_note(data) -> str:
    """The line that says why a data source has no feature network here."""
    from .inception import default_inception_path

    return (f"no feature network for {data}: the Inception file is not at {default_inception_path()} (fetch it "
            "with `ddpmkit eval fid --download`); the Frechet distance is not measured")


def _features(net, x: torch.Tensor, batch_size: int) -> np.ndarray:
    """Features float64 [N, D] of float images in [-1, 1], as the quality probe views them: grey 16x16 for the
    digits classifier (``quality.classifier_view``), uint8 for any other extractor."""
    from .digits import DigitsClassifier

    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        if isinstance(net, DigitsClassifier):
            out.append(net.features(classifier_view(xb, 16)))
        else:
            out.append(np.asarray(net(to_uint8(xb.cpu())), np.float64))
    return np.concatenate(out)


def _name(net) -> str:
    from .digits import DigitsClassifier

    return "digits" if isinstance(net, DigitsClassifier) else str(getattr(net, "kind", type(net).__name__))


# ---------------------------------------------------------------------------------------------- the report
@dataclasses.dataclass
class ReconstructionReport:
    """PSNR over the images (mean and standard deviation, dB) and the Frechet distance of the reconstructions'
    features to the originals' (``fd``, ``fd_stderr``; None without a feature network, ``features`` names it)."""

    psnr: float
    psnr_std: float
    n: int
    fd: float | None = None
    fd_stderr: float | None = None
    features: str | None = None
    seconds: float = 0.0
    note: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate_reconstruction(model, images_uint8, *, features=None, batch_size: int = 64, device="cpu",
                            log=None) -> ReconstructionReport:
    """Reconstruct ``images_uint8`` (uint8 [N, C, H, W]) with ``model`` (:func:`reconstruct`) and measure them.

    ``features``: a data source name (``"digits"``, ``"cifar10"``, a folder: the network of :func:`feature_network`),
    a ``DigitsClassifier`` or a feature extractor; None measures PSNR only. The Frechet distance needs N >= 2.
    """
    t0 = time.perf_counter()
    x8 = _check_uint8(images_uint8)
    net = feature_network(features, log=log)
    if net is not None and x8.shape[0] < 2:
        raise ConfigError(f"the Frechet distance of reconstructions needs at least 2 images, got {x8.shape[0]}")
    recon = reconstruct(model, x8, batch_size=batch_size, device=device)
    orig = from_uint8(x8)
    p = psnr(orig, recon).double()
    report = ReconstructionReport(psnr=float(p.mean()), psnr_std=float(p.std()) if p.numel() > 1 else 0.0,
                                  n=int(x8.shape[0]))
    if net is not None:
        f_orig, f_rec = _features(net, orig, batch_size), _features(net, recon, batch_size)
        mu, sigma = mean_cov(f_orig)
        report.fd = frechet_distance(*mean_cov(f_rec), mu, sigma)  # Dowson & Landau 1982 (FID's distance)
        report.fd_stderr = frechet_stderr(f_rec, mu, sigma)  # jackknife over the reconstructions
        report.features = _name(net)
    elif features is not None:
        report.note = missing_features_note(features)
        if log is not None:
            log(f"reconstruction: {report.note}")
    report.seconds = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------------------- the figure
def save_reconstruction_figure(originals, reconstructions, path, n: int = 16, *, columns: int = 8) -> Path:
    """A PNG of the first ``n`` originals (the top rows, ``columns`` to a row) above their reconstructions (the rows
    below, each under its original), through ``viz.grids.save_grid``. Images: float [-1, 1] or uint8, [N, C, H, W].
    With r = ceil(n / columns) rows each and the grid's scale s and padding 2, the picture is
    (2 r (H s + 2) + 2) x (min(n, columns) (W s + 2) + 2) pixels. Returns the path."""
    from ..limits import check_int
    from ..viz.grids import PlotError, save_grid

    def as_float(images, what):
        x = torch.as_tensor(images).detach().cpu()
        if x.dim() != 4:
            raise PlotError(f"{what}: expected [N, C, H, W], got shape {list(x.shape)}")
        return from_uint8(x) if x.dtype == torch.uint8 else x.float().clamp(-1, 1)

    a, b = as_float(originals, "originals"), as_float(reconstructions, "reconstructions")
    if a.shape != b.shape:
        raise PlotError(f"originals {list(a.shape)} and reconstructions {list(b.shape)} differ in shape")
    n = min(check_int("n", n, 1, None, PlotError), a.shape[0])
    cols = min(check_int("columns", columns, 1, None, PlotError), n)
    rows = math.ceil(n / cols)
    blank = torch.ones((rows * cols - n, *a.shape[1:]))  # white, as the grid's border: the last row's empty places
    tiles = torch.cat([a[:n], blank, b[:n], blank])
    return save_grid(tiles, path, nrow=cols)
