"""The Inception network of FID: the TorchScript file, its download, and its features.

The network is the TorchScript build ``inception-2015-12-05.pt`` that the StyleGAN and EDM evaluations load
with ``torch.jit.load``: it takes uint8 [N, 3, H, W] images of any size (it resizes internally) and, called
with ``return_features=True``, returns the [N, 2048] pool features. No torchvision and no pickle are needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..files import cache_dir, download as download_file, sha256_file
from .frechet import FidError

__all__ = [
    "INCEPTION_DIM",
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "InceptionFeatures",
    "InceptionMissingError",
    "default_inception_path",
    "download_inception",
    "load_inception",
]

INCEPTION_FILENAME = "inception-2015-12-05.pt"
# The TorchScript build (not the .pkl of the StyleGAN3 release, which would need pickle).
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# Its SHA-256 is not recorded here: we do not know it for certain and will not print a guess. The hash of
# the file actually used is returned in the result of evaluate_fid ("inception_sha256") so runs can be
# compared.
INCEPTION_SHA256 = None
INCEPTION_DIM = 2048


class InceptionMissingError(FidError):
    """The Inception network file is not there."""


def default_inception_path() -> Path:
    """``inception-2015-12-05.pt`` in the cache folder (``$DDPMKIT_CACHE`` or ``~/.cache/ddpmkit``)."""
    return cache_dir() / INCEPTION_FILENAME


def _missing_message(path: Path) -> str:
    return (f"the Inception network is not at {path}: download {INCEPTION_URL} (TorchScript, about 90 MB) "
            f"and pass --inception PATH, or put it there")


def download_inception(path=None, *, progress: bool = True) -> Path:
    """Fetch the TorchScript Inception file into ``path`` (default: the cache); a one-line FidError when it
    cannot (offline, say). ``files.download`` writes a temporary file and renames it, so a failure leaves
    nothing behind."""
    dest = Path(path).expanduser() if path is not None else default_inception_path()
    return download_file(INCEPTION_URL, dest, sha256=INCEPTION_SHA256, progress=progress,
                    hint="download it by hand and pass --inception PATH", error=FidError)


def load_inception(path=None, *, download: bool = False, progress: bool = True):
    """The TorchScript Inception network (``torch.jit.load``, on the CPU, in eval mode).

    ``path`` defaults to ``$DDPMKIT_CACHE/inception-2015-12-05.pt`` (or ``~/.cache/ddpmkit/...``). A missing
    file is an :class:`InceptionMissingError` naming :data:`INCEPTION_URL`, unless ``download`` is set, in
    which case the file is fetched once into ``path``. The expected SHA-256 of the file is not given: it is
    not known here for certain; ``evaluate_fid`` reports the hash of the file it used.
    """
    p = Path(path).expanduser() if path is not None else default_inception_path()
    if not p.is_file():
        if not download:
            raise InceptionMissingError(_missing_message(p))
        download_inception(p, progress=progress)
    try:
        net = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise FidError(f"{p} is not a TorchScript network ({type(e).__name__}: {msg}); expected "
                       f"{INCEPTION_FILENAME} from {INCEPTION_URL}") from None
    return net.eval()


class InceptionFeatures:
    """A TorchScript network with the Inception interface as a feature extractor: uint8 [N, C, H, W] in
    (grayscale repeated to 3 channels), float64 [N, D] out. ``key`` is the file's SHA-256."""

    kind = "inception"

    def __init__(self, path=None, *, download: bool = False, device=None, progress: bool = True):
        self.path = Path(path).expanduser() if path is not None else default_inception_path()
        self.net = load_inception(self.path, download=download, progress=progress)
        self.sha256 = sha256_file(self.path, error=FidError)
        self.key = f"inception-{self.sha256}"
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.net = self.net.to(self.device)

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise FidError(f"Inception reads uint8 [N, 1 or 3, H, W] images, got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        f = self.net(x.to(self.device), return_features=True)
        return f.detach().to("cpu", torch.float64).numpy()
