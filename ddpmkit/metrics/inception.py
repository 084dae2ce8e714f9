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
    "HASH_RECORD",
    "check_features",
    "check_recorded_hash",
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
# Its SHA-256 is not pinned here: no source we could check states it, and we will not print a guess. Instead the
# hash of the first file used on a machine is recorded in the cache (HASH_RECORD) and every later file is compared
# with it: a different file is a loud warning (its FIDs are not comparable with the earlier ones). The hash of the
# file used is also in every result of evaluate_fid ("inception_sha256").
INCEPTION_SHA256 = None
INCEPTION_DIM = 2048
HASH_RECORD = "inception-sha256.json"  # in the cache folder: {filename: {"sha256", "path", "recorded"}}


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

    def __init__(self, path=None, *, download: bool = False, device=None, progress: bool = True, log=None):
        self.path = Path(path).expanduser() if path is not None else default_inception_path()
        self.net = load_inception(self.path, download=download, progress=progress)
        self.sha256 = sha256_file(self.path, error=FidError)
        # the hash against the pinned one, or the one recorded on this machine's first use (a loud warning if not)
        self.hash_status = check_recorded_hash(self.path, self.sha256, log=log)
        self.key = f"inception-{self.sha256}"
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.net = self.net.to(self.device)
        check_features(self.net, self.device)  # the resize and scaling live inside the file: check its output

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise FidError(f"Inception reads uint8 [N, 1 or 3, H, W] images, got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        f = self.net(x.to(self.device), return_features=True)
        return f.detach().to("cpu", torch.float64).numpy()


def _warn(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


def check_recorded_hash(path, sha256: str, *, record_dir=None, log=None) -> str:
    """Compare a network file's SHA-256 with the pinned one (:data:`INCEPTION_SHA256`) or, while none is pinned,
    with the one recorded in the cache on the first use (recording it then). Returns ``"pinned"``, ``"recorded"``
    (first use), ``"matches"`` or ``"differs"``; a difference is a loud warning through ``log`` (stderr), not an
    error: the file may be a deliberate replacement, but its FIDs are not comparable with the earlier ones.
    """
    import datetime
    import json

    log = log or _warn
    if INCEPTION_SHA256 is not None:
        if sha256 != INCEPTION_SHA256:
            raise FidError(f"{path} has SHA-256 {sha256}, not the published {INCEPTION_FILENAME}'s "
                           f"{INCEPTION_SHA256}: download it again from {INCEPTION_URL}")
        return "pinned"
    record = Path(record_dir) if record_dir is not None else cache_dir()
    record = record / HASH_RECORD
    try:
        known = json.loads(record.read_text()) if record.is_file() else {}
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    first = known.get(INCEPTION_FILENAME)
    if isinstance(first, dict) and isinstance(first.get("sha256"), str):
        if first["sha256"] == sha256:
            return "matches"
        log(f"WARNING: the Inception network {path} has SHA-256 {sha256}, but the one first used on this machine "
            f"({first.get('path')}, recorded {first.get('recorded')}) had {first['sha256']}: FIDs from the two are "
            f"NOT comparable. If the new file is the right one, delete {record} to record it instead.")
        return "differs"
    from ..files import atomic_write_json

    known[INCEPTION_FILENAME] = {"sha256": sha256, "path": str(Path(path).resolve()),
                                 "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, known, error=FidError)
    except (OSError, FidError) as e:
        log(f"warning: could not record the Inception network's SHA-256 in {record}: {e}")
        return "unrecorded"
    log(f"note: first use of the Inception network on this machine: its SHA-256 {sha256} is recorded in {record}; "
        "a later file that differs will be warned about")
    return "recorded"


def known_input() -> torch.Tensor:
    """Two fixed uint8 3x32x32 images: a mid-gray one and a smooth colour ramp."""
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    ramp = torch.stack([xx * 8, yy * 8, (xx + yy) * 4]).clamp(0, 255).to(torch.uint8)
    return torch.stack([torch.full((3, 32, 32), 128, dtype=torch.uint8), ramp])


def check_features(net, device=None) -> None:
    """Run the network on :func:`known_input` at 32x32 (CIFAR-10's size, resized inside the file) and at 299x299
    (its own): the features must be [2, INCEPTION_DIM], finite, non-negative (the pool follows a ReLU) and of
    ordinary size (below 100), and differ between the two images. FidError, one line, otherwise."""
    x = known_input()
    big = torch.nn.functional.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
    for name, imgs in (("32x32", x), ("299x299", big.round().clamp(0, 255).to(torch.uint8))):
        try:
            with torch.no_grad():
                f = net(imgs.to(device or "cpu"), return_features=True)
        except Exception as e:  # noqa: BLE001 - any failure of the foreign network is one line
            raise FidError(f"the Inception network fails on two {name} images ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:160]})") from None
        f = torch.as_tensor(f).detach().to("cpu", torch.float64)
        problem = None
        if tuple(f.shape) != (2, INCEPTION_DIM):
            problem = f"features of shape {list(f.shape)}, expected [2, {INCEPTION_DIM}]"
        elif not torch.isfinite(f).all():
            problem = "non-finite features"
        elif f.min() < 0 or f.max() > 100:
            problem = f"features in [{f.min():.3g}, {f.max():.3g}], expected within [0, 100]"
        elif torch.allclose(f[0], f[1]):
            problem = "the same features for two different images"
        if problem:
            raise FidError(f"the Inception network gives {problem} on two {name} test images: not the "
                           f"{INCEPTION_FILENAME} interface (expected from {INCEPTION_URL})")
