"""FID: the Frechet distance between Gaussians fitted to network features of samples and of real images.

The protocol of the DDPM and DDIM papers: 50,000 samples, quantized to uint8 before scoring, against the
CIFAR-10 train set, in the 2048-d pool features of the 2015-12-05 Inception network, and the distance in
float64 with scipy's matrix square root. The network is the TorchScript build ``inception-2015-12-05.pt``
that the StyleGAN and EDM evaluations load with ``torch.jit.load``: it takes uint8 [N, 3, H, W] images of
any size (it resizes internally) and, called with ``return_features=True``, returns [N, 2048] features.
No torchvision and no pickle are needed.

For the embedded 16x16 digits, ``features="digits"`` uses the penultimate features of a small classifier
trained once on the real digits (``ddpmkit.judge``) in place of Inception, and reports the noise floor
(real held-out digits against real train digits) beside the score.

Feature statistics accumulate in float64 as running sums (memory independent of the number of images).
Reference statistics are cached as safetensors, keyed by a SHA-256 of the reference images' bytes and of
the feature extractor's identity (the network file's hash, or the judge's key), never by a name.

Entry point: :func:`evaluate_fid`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .errors import ConfigError, DdpmkitError

__all__ = [
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "FidError",
    "InceptionFeatures",
    "InceptionMissingError",
    "RunningStats",
    "default_inception_path",
    "evaluate_fid",
    "feature_stats",
    "frechet_distance",
    "load_inception",
    "reference_stats",
]

INCEPTION_FILENAME = "inception-2015-12-05.pt"
# The TorchScript build (not the .pkl of the StyleGAN3 release, which would need pickle).
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# Its SHA-256 is not recorded here: we do not know it for certain and will not print a guess. The hash of
# the file actually used is returned in the result of evaluate_fid ("inception_sha256") so runs can be
# compared.
INCEPTION_SHA256 = None
INCEPTION_DIM = 2048
STATS_FORMAT = "ddpmkit-fid-stats-v1"


class FidError(DdpmkitError):
    """A problem with the FID evaluation a user can cause (a missing network file, a bad reference)."""


class InceptionMissingError(FidError):
    """The Inception network file is not there."""


# --------------------------------------------------------------------------------------------------
# The Frechet distance


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))  (Dowson & Landau 1982; FID, Heusel et al.)

    The matrix square root is scipy's; when it is not finite or inaccurate (a singular product) both
    covariances are offset by ``eps * I`` first, and a complex result whose imaginary part is numerical
    noise is made real.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if covmean is None:  # singular: features that never fire (dead ReLUs) have zero variance
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset), check=False)
        if covmean is None:
            raise ValueError("the matrix square root is not finite, even with an offset of eps * I")
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        scale = max(1.0, np.abs(covmean.real).max())
        if imag > 1e-3 * scale:
            raise ValueError(f"the matrix square root has a large imaginary part ({imag:.3g})")
        covmean = covmean.real
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
    return float(max(fd, 0.0))  # a tiny negative value is rounding, not a distance


def _sqrtm(a: np.ndarray, check: bool = True):
    """scipy's square root of ``a``; None when it is not finite or (``check``) does not square back to ``a``."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # judged by the residual below instead
        warnings.simplefilter("ignore", RuntimeWarning)
        r = linalg.sqrtm(a)
    if not np.isfinite(r).all():
        return None
    scale = max(np.abs(a).max(), 1e-300)
    if check and np.abs(r @ r - a).max() > 1e-4 * scale:
        return None
    return r



# --------------------------------------------------------------------------------------------------
# Streaming statistics


class RunningStats:
    """Mean and (unbiased) covariance of feature vectors seen batch by batch, in float64.

    Sums of x - c and of the outer products (x - c)(x - c)^T, with c the first batch's mean (a shift that
    keeps the sums small, so that subtracting n * mean mean^T loses no precision). Memory is O(D^2)."""

    def __init__(self):
        self.n = 0
        self.shift = None
        self.s = None
        self.ss = None

    def update(self, feats) -> None:
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {f.shape}")
        if f.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = f.mean(axis=0)
            d = f.shape[1]
            self.s = np.zeros(d)
            self.ss = np.zeros((d, d))
        elif f.shape[1] != self.shift.shape[0]:
            raise ValueError(f"feature size changed from {self.shift.shape[0]} to {f.shape[1]}")
        c = f - self.shift
        self.s += c.sum(axis=0)
        self.ss += c.T @ c
        self.n += f.shape[0]

    def mean(self) -> np.ndarray:
        return self.shift + self.s / self.n

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise FidError(f"need at least 2 images for a covariance, got {self.n}")
        m = self.s / self.n
        cov = (self.ss - self.n * np.outer(m, m)) / (self.n - 1)
        return (cov + cov.T) / 2.0


def feature_stats(extractor: Callable, images_iter: Iterable, *, total: int | None = None,
                  progress: bool = True, desc: str = "features") -> tuple[np.ndarray, np.ndarray, int]:
    """(mean [D], covariance [D, D], N) of ``extractor``'s features over the uint8 batches of ``images_iter``,
    accumulated in float64 without keeping the features; with a progress bar over images."""
    from tqdm import tqdm

    stats = RunningStats()
    with tqdm(total=total, disable=not progress, unit="img", desc=desc) as bar:
        for batch in images_iter:
            stats.update(extractor(batch))
            bar.update(int(batch.shape[0]))
    return stats.mean(), stats.cov(), stats.n


def _batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size]


# --------------------------------------------------------------------------------------------------
# The Inception network


def default_cache_dir() -> Path:
    """``$DDPMKIT_CACHE`` if set, else ``~/.cache/ddpmkit``."""
    env = os.environ.get("DDPMKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ddpmkit"


def default_inception_path() -> Path:
    return default_cache_dir() / INCEPTION_FILENAME


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _missing_message(path: Path) -> str:
    return (f"the Inception network is not at {path}: download {INCEPTION_URL} (TorchScript, about 90 MB) "
            f"and pass --inception PATH, or put it there")


def download_inception(path=None, *, progress: bool = True) -> Path:
    """Fetch the TorchScript Inception file into ``path`` (default: the cache); a one-line FidError when it
    cannot (offline, say). Written to a temporary file, then renamed, so a failure leaves nothing behind."""
    import tempfile
    import urllib.request

    dest = Path(path).expanduser() if path is not None else default_inception_path()
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(INCEPTION_URL, timeout=30) as resp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
        os.replace(tmp, dest)
        tmp = None
    except Exception as e:  # URLError, OSError, timeouts
        reason = " ".join(str(getattr(e, "reason", e)).split())[:200]
        raise FidError(f"could not download the Inception network from {INCEPTION_URL} ({type(e).__name__}: "
                       f"{reason}); download it by hand and pass --inception PATH") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return dest


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
        self.sha256 = _sha256_file(self.path)
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


# --------------------------------------------------------------------------------------------------
# Reference statistics, cached by content


def images_sha256(images: torch.Tensor) -> str:
    """SHA-256 of uint8 images: their shape and their bytes."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise FidError(f"reference images must be uint8, got {x.dtype}")
    h = hashlib.sha256()
    h.update(json.dumps(list(x.shape)).encode())
    h.update(x.contiguous().numpy().tobytes())
    return h.hexdigest()


def _stats_key(images_hash: str, extractor_key: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": STATS_FORMAT, "images": images_hash, "features": extractor_key},
                        sort_keys=True).encode())
    return h.hexdigest()


def _read_stats(path: Path, key: str):
    """(mu, sigma, n) from a cache file, or None when it is missing, unreadable or not for ``key``."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("format") != STATS_FORMAT:
                return None
            mu = f.get_tensor("mu").numpy().astype(np.float64)
            sigma = f.get_tensor("sigma").numpy().astype(np.float64)
            n = int(meta["n"])
    except Exception:
        return None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return None
    return mu, sigma, n


def _write_stats(path: Path, key: str, mu, sigma, n: int, meta: dict) -> None:
    from .checkpoint import atomic_save_safetensors

    tensors = {"mu": torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float64)),
               "sigma": torch.from_numpy(np.ascontiguousarray(sigma, dtype=np.float64))}
    metadata = {"format": STATS_FORMAT, "key": key, "n": str(n), **{k: str(v) for k, v in meta.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, path, metadata=metadata)
    except (OSError, DdpmkitError):
        pass  # a cache that cannot be written costs time next run, not a result


def reference_stats(extractor, images: torch.Tensor, *, cache_dir=None, use_cache: bool = True,
                    batch_size: int = 250, progress: bool = True, name: str = "reference") -> dict:
    """Feature statistics of the reference images, from the cache when it holds them for exactly these
    images and this extractor (else computed and cached). Returns mu, sigma, n, key, from_cache, path."""
    key = _stats_key(images_sha256(images), extractor.key)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "fid"
    path = base / f"fid-ref-{key[:32]}.safetensors"
    if use_cache:
        hit = _read_stats(path, key)
        if hit is not None:
            mu, sigma, n = hit
            return {"mu": mu, "sigma": sigma, "n": n, "key": key, "from_cache": True, "path": path}
    mu, sigma, n = feature_stats(extractor, _batches(images, batch_size), total=int(images.shape[0]),
                                 progress=progress, desc=f"{name} features")
    if use_cache:
        _write_stats(path, key, mu, sigma, n, {"reference": name, "features": extractor.key})
    return {"mu": mu, "sigma": sigma, "n": n, "key": key, "from_cache": False, "path": path}


# --------------------------------------------------------------------------------------------------
# The evaluation of a run


def _sample_batches(run_dir, opt, *, n: int, batch_size: int, seed: int, device, shape_check=None):
    """Batches of uint8 samples from the run (quantized before scoring); never more than one batch held."""
    from .checkpoint import read_config, run_dir_of
    from .generate import load_for_sampling
    from .images import to_uint8
    from .sampling import sample

    model, schedule, objective, steps, chw = load_for_sampling(run_dir, opt, device)
    config = read_config(run_dir_of(run_dir))
    if shape_check is not None:
        shape_check(chw)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def gen():
        done = 0
        while done < n:
            b = min(batch_size, n - done)
            x_T = torch.randn((b, *chw), generator=g)
            x = sample(model, schedule, (b, *chw), sampler=opt.sampler, steps=steps, eta=opt.eta,
                       spacing=opt.spacing, variance=opt.variance, clip_x0=opt.clip_x0, generator=g,
                       x_T=x_T.to(device), objective=objective, device=device)
            yield to_uint8(x.cpu())
            done += b

    settings = {"sampler": opt.sampler, "steps": steps if opt.sampler == "ddim" else schedule.T,
                "eta": opt.eta if opt.sampler == "ddim" else None, "spacing": opt.spacing,
                "variance": opt.variance, "clip_x0": opt.clip_x0, "ema": opt.ema, "seed": seed,
                "objective": objective, "T": schedule.T}
    return gen(), settings, chw, config


def evaluate_fid(run_dir, *, n: int = 50000, reference: str | None = None, data_dir=None,
                 features: str = "inception", inception_path=None, download: bool = False, sample_options=None,
                 batch_size: int | None = None, seed: int = 0, device=None, cache_dir=None,
                 use_cache: bool = True, judge_epochs: int | None = None, progress: bool = True) -> dict:
    """FID of ``n`` samples of a run against a reference set; returns a dict of the score and its settings.

    - ``reference``: ``"cifar10-train"`` (default for Inception), ``"cifar10-test"``, ``"digits"`` or any
      data source of ``ddpmkit.data.load_dataset`` (a folder). For ``features="digits"`` the default is the
      judge's training split of the digits (1,438 images), so that its held-out split gives the noise floor.
    - ``features``: ``"inception"`` (the TorchScript file at ``inception_path``, default in the cache;
      ``download`` fetches it when missing) or ``"digits"`` (the digits judge, trained once and cached).
    - ``sample_options``: a ``generate.SampleOptions`` (sampler, steps, eta, spacing, variance, clip_x0,
      ema); its ``n``/``seed`` are replaced by ``n``/``seed`` here, and its ``batch_size`` by
      ``batch_size`` when given.
    - ``cache_dir``: where reference statistics (and the judge) are cached (default ``$DDPMKIT_CACHE``).

    The result holds ``fid``, ``n``, ``n_reference``, ``features``, ``reference``, the sampler settings,
    ``sample_seconds``, ``score_seconds`` (features of samples and reference), ``reference_from_cache``;
    for digits also ``noise_floor`` (real held-out digits against the reference) with ``noise_floor_n``,
    and ``noise_floor_at_n`` when ``n`` is smaller than the held-out split (the 1/N bias matters).
    """
    from .generate import SampleOptions

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"--n must be an integer of at least 2, got {n!r}")
    if features not in ("inception", "digits"):
        raise ConfigError(f"unknown features {features!r}: choose inception or digits")
    opt = dataclasses.replace(sample_options or SampleOptions(), n=n, seed=seed)
    if batch_size is not None:
        opt = dataclasses.replace(opt, batch_size=batch_size)
    if opt.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {opt.batch_size}")
    dev = torch.device(device) if device is not None else torch.device("cpu")

    shape_check = None
    if features == "digits":
        from . import judge as judge_mod

        def shape_check(chw):
            if tuple(chw) != (1, judge_mod.IMAGE_SIZE, judge_mod.IMAGE_SIZE):
                raise ConfigError(f"--features digits reads 1x16x16 images; this run makes "
                                  f"{chw[0]}x{chw[1]}x{chw[2]}")

    # the sampler (and its model) first: a bad run or flag fails before any network is loaded or trained
    batches, settings, chw, config = _sample_batches(run_dir, opt, n=n, batch_size=opt.batch_size, seed=seed,
                                                     device=dev, shape_check=shape_check)
    t_score = 0.0
    judge = None
    t0 = time.perf_counter()
    if features == "inception":
        extractor = InceptionFeatures(inception_path, download=download, device=dev, progress=progress)
    else:
        cache_base = Path(cache_dir).expanduser() if cache_dir is not None else None
        judge = judge_mod.Judge.load_or_train(
            epochs=judge_epochs if judge_epochs is not None else judge_mod.DEFAULT_EPOCHS,
            cache_dir=cache_base)
        extractor = judge_mod.DigitsFeatures(judge)
    ref_images, ref_name = _reference_images(reference, features, judge, chw, data_dir, config)
    stats_dir = Path(cache_dir).expanduser() / "fid" if cache_dir is not None else None
    ref = reference_stats(extractor, ref_images, cache_dir=stats_dir, use_cache=use_cache,
                          batch_size=opt.batch_size, progress=progress, name=ref_name)
    del ref_images
    t_score += time.perf_counter() - t0

    # sampling and scoring interleaved batch by batch; time each part
    stats = RunningStats()
    t_sample = 0.0
    from tqdm import tqdm

    with tqdm(total=n, disable=not progress, unit="img", desc=f"fid {opt.sampler}") as bar:
        while True:
            t1 = time.perf_counter()
            try:
                x = next(batches)
            except StopIteration:
                break
            t2 = time.perf_counter()
            stats.update(extractor(x))
            t3 = time.perf_counter()
            t_sample += t2 - t1
            t_score += t3 - t2
            bar.update(int(x.shape[0]))
    t4 = time.perf_counter()
    fid = frechet_distance(stats.mean(), stats.cov(), ref["mu"], ref["sigma"])
    t_score += time.perf_counter() - t4

    result = {"fid": fid, "n": stats.n, "features": features, "reference": ref_name,
              "n_reference": ref["n"], "reference_from_cache": ref["from_cache"],
              "reference_stats": str(ref["path"]), **settings, "batch_size": opt.batch_size,
              "sample_seconds": t_sample, "score_seconds": t_score}
    if features == "inception":
        result["inception"] = str(extractor.path)
        result["inception_sha256"] = extractor.sha256
    else:
        result["judge_key"] = judge.key
        result["judge_epochs"] = judge.epochs
        result["judge_train_seconds"] = judge.train_seconds  # part of score_seconds; 0 when cached
        if reference is None:  # the floor is meaningful against the judge's own training split
            result["noise_floor"] = judge.fd(judge.test_images)
            result["noise_floor_n"] = int(len(judge.test_idx))
            if n < len(judge.test_idx):
                result["noise_floor_at_n"] = judge.fd(judge.real_subset(n))
    return result


def _reference_images(reference, features, judge, chw, data_dir, config) -> tuple[torch.Tensor, str]:
    from .data import load_dataset

    if features == "digits" and reference is None:
        return judge.train_images, "digits (judge train split)"
    ref = "cifar10-train" if reference is None else str(reference)
    low = ref.lower()
    split = "train"
    source = ref
    if low in ("cifar10-train", "cifar10-test", "cifar-10-train", "cifar-10-test"):
        source, split = "cifar10", low.rsplit("-", 1)[1]
    if data_dir is None and source == "cifar10":
        data_dir = (config.get("train") or {}).get("data_dir")
    kind_default_size = None if source.lower() in ("cifar10", "cifar-10", "digits") else chw[1]
    if features == "digits":
        size, channels = 16, 1
    else:
        size, channels = kind_default_size, None
    ds = load_dataset(source, image_size=size, channels=channels, data_dir=data_dir, split=split,
                      download=False, progress=False)
    return ds.images, f"{ref}" if source == ref else f"{source}-{split}"
