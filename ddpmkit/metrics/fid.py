"""FID: the Frechet distance between Gaussians fitted to network features of samples and of real images.

The protocol of the DDPM and DDIM papers: 50,000 samples, quantized to uint8 before scoring, against the
CIFAR-10 train set, in the 2048-d pool features of the 2015-12-05 Inception network (``metrics.inception``),
and the distance in float64 with scipy's matrix square root (``metrics.frechet``).

For the embedded 16x16 digits, ``features="digits"`` uses the penultimate features of a small classifier
trained once on the real digits (``metrics.digits``) in place of Inception, and reports the noise floor
(real held-out digits against real train digits) beside the score.

Feature statistics accumulate in float64 as running sums (memory independent of the number of images).
Reference statistics are cached as safetensors, keyed by a SHA-256 of the reference images' bytes and of
the feature extractor's identity (the network file's hash, or the classifier's key), never by a name.

Entry point: :func:`evaluate_fid`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import ConfigError, DdpmkitError
from ..files import cache_dir as _cache_dir
from . import digits
from .frechet import FidError, RunningStats, feature_stats, frechet_distance
from .inception import InceptionFeatures

__all__ = ["evaluate_fid", "images_sha256", "reference_stats", "PROTOCOLS", "protocol_of"]

# The evaluation protocols by name. ddpm-paper: the DDPM paper's CIFAR-10 FID (Ho et al. 2020, table 1, 3.17):
# 50,000 samples by 1000 ancestral steps (algorithm 2) of the T = 1000 model, EMA weights, x0 clipped, the
# official code's CIFAR-10 variance (fixedlarge, sigma^2 = beta), against the 50,000 CIFAR-10 training images in the
# pool features of the 2015-12-05 Inception network.
PROTOCOLS = {
    "ddpm-paper": {"sampler": "ddpm", "steps": 1000, "T": 1000, "spacing": "uniform", "n": 50_000,
                   "features": "inception", "reference": "cifar10-train", "variance": "large", "clip_x0": True,
                   "ema": True, "guidance": None},
}


def protocol_of(result: dict) -> tuple[str, list[str]]:
    """``("ddpm-paper", [])`` when a FID result followed that protocol exactly, else ``("custom", differences)``:
    what differs from it, each as a short phrase ("ddim sampler", "1,000 samples", ...)."""
    want = PROTOCOLS["ddpm-paper"]
    diffs = []
    if result.get("sampler") != want["sampler"]:
        diffs.append(f"{result.get('sampler')} sampler")
    if result.get("steps") != want["steps"] or result.get("T") != want["T"]:
        diffs.append(f"{result.get('steps')} steps of T = {result.get('T')}")
    if result.get("n") != want["n"]:
        diffs.append(f"{result.get('n'):,} samples")
    if result.get("features") != want["features"]:
        diffs.append(f"{result.get('features')} features")
    if result.get("reference") != want["reference"]:
        diffs.append(f"reference {result.get('reference')}")
    if result.get("sampler") == "ddpm" and result.get("variance") != want["variance"]:
        diffs.append(f"{result.get('variance')} variance")
    if result.get("clip_x0") is False:
        diffs.append("no clipping")
    if result.get("ema") is False:
        diffs.append("raw weights")
    if result.get("guidance") is not None:
        diffs.append("guided")
    return ("ddpm-paper" if not diffs else "custom"), diffs

STATS_FORMAT = "ddpmkit-fid-stats-v1"


def _batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size]


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
    from ..store import atomic_save_safetensors

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
    base = Path(cache_dir).expanduser() if cache_dir is not None else _cache_dir() / "fid"
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


def _sample_batches(run, opt, *, n: int, batch_size: int, seed: int, device, shape_check=None):
    """Batches of uint8 samples from the opened ``run`` (quantized before scoring); never more than one batch held.

    Sample i comes from the noise stream (seed, i) (``samplers.batches.sample_batches``), so the score does not
    depend on the batch size. The request is resolved once (``Request``), and the image shape and the flags are
    checked before the network is loaded.
    """
    import dataclasses
    import sys

    from ..images import to_uint8
    from ..request import Request
    from ..samplers.batches import sample_batches

    chw = run.pixel_shape  # of the images scored (a latent run's decoded samples)
    if shape_check is not None:
        shape_check(chw)
    # a class-conditional run: the classes asked for (or every class) in turn, guided
    req = Request.resolve(run, dataclasses.replace(opt, n=n, batch_size=batch_size, seed=seed), per_class=False)
    plan, cond, ema = req.plan, req.conditioning, opt.ema
    denoiser = req.denoiser(device)

    def gen():
        for _, x in sample_batches(denoiser, n=n, shape=run.image_shape, sampler=plan, seed=seed, batch_size=batch_size,
                                   log=lambda m: print(m, file=sys.stderr), labels=cond.labels):
            yield to_uint8(x.cpu())

    settings = {"sampler": plan.sampler, "steps": plan.steps, "eta": plan.options.get("eta"), "spacing": plan.spacing,
                "options": plan.options, "variance": denoiser.variance, "clip_x0": denoiser.clip_x0, "ema": ema,
                "seed": seed, "objective": denoiser.objective, "T": run.schedule.T, "guidance": cond.guidance,
                "classes": cond.classes,
                "class_names": None if cond.classes is None else [run.class_names[c] for c in cond.classes]}
    return gen(), settings, chw, run.config, denoiser, plan


def evaluate_fid(run_dir, *, n: int = 50000, reference: str | None = None, data_dir=None,
                 features: str = "inception", inception_path=None, download: bool = False, sample_options=None,
                 batch_size: int | None = None, seed: int = 0, device=None, cache_dir=None,
                 use_cache: bool = True, judge_epochs: int | None = None, progress: bool = True,
                 protocol: str | None = None) -> dict:
    """FID of ``n`` samples of a run (an opened ``Run``, or its path) against a reference set; returns a dict of the
    score and its settings.

    - ``reference``: ``"cifar10-train"`` (default for Inception), ``"cifar10-test"``, ``"digits"`` or any
      data source of ``ddpmkit.data.load_dataset`` (a folder). For ``features="digits"`` the default is the
      digits classifier's training split (1,438 images), so that its held-out split gives the noise floor.
    - ``features``: ``"inception"`` (the TorchScript file at ``inception_path``, default in the cache;
      ``download`` fetches it when missing) or ``"digits"`` (the digits classifier of ``metrics.digits``,
      trained once and cached; ``judge_epochs`` sets its training epochs).
    - ``sample_options``: a ``request.SampleOptions`` (sampler, steps, spacing, options, variance, clip_x0,
      ema, batch_size; read through its ``plan``), default DDIM with its defaults. Its ``n``/``seed`` are
      not read (``n``/``seed`` here), and ``batch_size`` here overrides its own.
    - ``cache_dir``: where reference statistics (and the classifier) are cached (default ``$DDPMKIT_CACHE``).

    The result holds ``fid``, ``n``, ``n_reference``, ``features``, ``reference``, the sampler settings,
    ``sample_seconds``, ``score_seconds`` (features of samples and reference), ``reference_from_cache``;
    for digits also ``noise_floor`` (real held-out digits against the reference) with ``noise_floor_n``,
    and ``noise_floor_at_n`` when ``n`` is smaller than the held-out split (the 1/N bias matters).
    """
    from ..run import Run

    run = run_dir if isinstance(run_dir, Run) else None  # opened once, by the caller or below
    if protocol is not None:
        run = _check_protocol(protocol, run_dir, n=n, reference=reference, features=features, opt=sample_options)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"--n must be an integer of at least 2, got {n!r}")
    if features not in ("inception", "digits"):
        raise ConfigError(f"unknown features {features!r}: choose inception or digits")
    from ..request import SampleOptions

    opt = sample_options if sample_options is not None else SampleOptions()
    if protocol is not None:  # checked above: nothing given contradicts it
        import dataclasses

        want = PROTOCOLS[protocol]
        opt = dataclasses.replace(opt, sampler=want["sampler"], steps=want["steps"], spacing=want["spacing"],
                                  variance=want["variance"], options={})
        reference = want["reference"]
    if batch_size is None:
        batch_size = opt.batch_size
    from ..limits import MAX_BATCH, check_int

    check_int("--batch-size", batch_size, 1, MAX_BATCH)
    dev = torch.device(device) if device is not None else torch.device("cpu")

    shape_check = None
    if features == "digits":
        def shape_check(chw):
            # other sides are brought to 16x16 (digits.to_classifier_size)
            if not (chw[0] == 1 and chw[1] == chw[2] >= digits.NATIVE_SIZE):
                raise ConfigError(f"--features digits reads 1xSxS images (S >= 8); this run makes "
                                  f"{chw[0]}x{chw[1]}x{chw[2]}")

    # the sampler (and its model) first: a bad run or flag fails before any network is loaded or trained
    run = run if run is not None else Run.open(run_dir)
    batches, settings, chw, config, denoiser, plan = _sample_batches(run, opt, n=n, batch_size=batch_size, seed=seed,
                                                                     device=dev, shape_check=shape_check)
    t_score = 0.0
    classifier = None
    t0 = time.perf_counter()
    if features == "inception":
        extractor = InceptionFeatures(inception_path, download=download, device=dev, progress=progress)
    else:
        cache_base = Path(cache_dir).expanduser() if cache_dir is not None else None
        classifier = digits.DigitsClassifier.load_or_train(
            epochs=judge_epochs if judge_epochs is not None else digits.DEFAULT_EPOCHS, cache_dir=cache_base)
        extractor = digits.DigitsFeatures(classifier)
    ref_images, ref_name = _reference_images(reference, features, classifier, chw, data_dir, config,
                                             classes=settings["classes"])
    stats_dir = Path(cache_dir).expanduser() / "fid" if cache_dir is not None else None
    ref = reference_stats(extractor, ref_images, cache_dir=stats_dir, use_cache=use_cache,
                          batch_size=batch_size, progress=progress, name=ref_name)
    del ref_images
    t_score += time.perf_counter() - t0

    # sampling and scoring interleaved batch by batch; time each part
    stats = RunningStats()
    t_sample = 0.0
    from ..progress import steps_bar

    # a bar of network calls: one batch of the ddpm-paper protocol is 1000 of them (progress.py)
    with steps_bar(denoiser.net, n=n, batch_size=batch_size, calls_per_batch=plan.model_calls,
                   desc=f"fid {settings['sampler']}", disable=not progress) as bar:
        done = 0
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
            done += int(x.shape[0])
            bar.images(done)
    t4 = time.perf_counter()
    fid = frechet_distance(stats.mean(), stats.cov(), ref["mu"], ref["sigma"])
    t_score += time.perf_counter() - t4

    result = {"fid": fid, "n": stats.n, "features": features, "reference": ref_name,
              "n_reference": ref["n"], "reference_from_cache": ref["from_cache"],
              "reference_stats": str(ref["path"]), **settings, "batch_size": batch_size,
              "sample_seconds": t_sample, "score_seconds": t_score}
    result["protocol"], result["protocol_differences"] = protocol_of(result)
    if features == "inception":
        result["inception"] = str(extractor.path)
        result["inception_sha256"] = extractor.sha256
    else:
        result["judge_key"] = classifier.key
        result["judge_epochs"] = classifier.epochs
        result["judge_train_seconds"] = classifier.train_seconds  # part of score_seconds; 0 when cached
        if reference is None and settings["classes"] is None:  # the floor is meaningful against the
            # classifier's own whole training split
            result["noise_floor"] = classifier.fd(classifier.test_images)
            result["noise_floor_n"] = int(len(classifier.test_idx))
            if n < len(classifier.test_idx):
                result["noise_floor_at_n"] = classifier.fd(classifier.real_subset(n))
    return result


def _only(images, labels, classes, name) -> tuple[torch.Tensor, str]:
    """The reference images of ``classes`` (all of them for None, or when the reference has no labels)."""
    if classes is None or labels is None:
        return images, name
    keep = torch.isin(torch.as_tensor(labels), torch.tensor(classes))
    if int(keep.sum()) < 2:
        raise ConfigError(f"the reference {name} has fewer than 2 images of class {','.join(map(str, classes))}")
    return images[keep], f"{name}, class {','.join(map(str, classes))}"


def _check_protocol(protocol, run_dir, *, n, reference, features, opt):
    """A protocol fixes every setting: one line for an unknown name, a setting that contradicts it, or a run it
    cannot apply to (checked before anything is sampled). Returns the opened Run."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}: choose {', '.join(PROTOCOLS)}")
    want = PROTOCOLS[protocol]
    from ..run import Run

    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    T = run.schedule.T
    if T != want["T"]:
        raise ConfigError(f"--protocol {protocol} samples {want['steps']} ancestral steps of a T = {want['T']} "
                          f"process; this run has T = {T}")
    bad = []
    if n != want["n"]:
        bad.append(f"--n {n}")
    if reference not in (None, want["reference"]):
        bad.append(f"--reference {reference}")
    if features != want["features"]:
        bad.append(f"--features {features}")
    if opt is not None:
        for name, flag in (("sampler", "--sampler"), ("steps", "--steps"), ("spacing", "--spacing"),
                           ("variance", "--variance")):
            v = getattr(opt, name)
            if v is not None and v != want[name]:
                bad.append(f"{flag} {v}")
        bad += [f"--{k.replace('_', '-')}" for k in (opt.options or {})]
        if not opt.clip_x0:
            bad.append("--no-clip")
        if not opt.ema:
            bad.append("--no-ema")
        if opt.guidance is not None or opt.classes is not None:
            bad.append("--class/--guidance")
    if bad:
        raise ConfigError(f"--protocol {protocol} fixes the sampler, steps, variance, samples and reference; it "
                          f"contradicts {', '.join(bad)}")
    return run


def _reference_images(reference, features, classifier, chw, data_dir, config, classes=None
                      ) -> tuple[torch.Tensor, str]:
    from ..data import load_dataset

    if features == "digits" and reference is None:
        train_labels = classifier.labels[torch.from_numpy(classifier.train_idx)]
        return _only(classifier.train_images, train_labels, classes, "digits (judge train split)")
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
    return _only(ds.images, ds.labels, classes, f"{ref}" if source == ref else f"{source}-{split}")
