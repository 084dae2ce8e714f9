"""Does a run copy its training images? ``ddpmkit eval memorization RUN``.

For n samples it finds each one's nearest training image, by the Euclidean distance of the pixels (in [0, 1],
as a root mean square over the pixels) and of features (the digits classifier's for the digits, Inception's
where its file is present), and compares those distances with the ones real images have.

The comparison set is the training images themselves, each against all the others (leave-one-out): a real
image drawn from the same distribution is that close to its nearest neighbour in the training set. (The digits
have no held-out split that a run did not train on, and leave-one-out keeps the reference set the same size,
1,796 against 1,797.) A model that has learnt the distribution gives samples as far from the training set as
real images are; a model that copies gives samples closer. Reported for each space:

* ``closer_than_real``: the probability that a sample is closer to its nearest training image than a real
  image is to its own (ties count half): 0.5 when samples and real images are alike, towards 1 when samples
  copy. (The Mann-Whitney U statistic of the two sets of distances divided by the product of their sizes,
  Mann & Whitney 1947.)
* ``near_copies``: the fraction of samples closer than the 1st percentile of the real distances, beside the
  real images' own fraction by construction (``real_near_copies``, about 1%). "No more near-copies than real
  images have" means ``near_copies <= real_near_copies``, up to the sampling error of n samples.
* the mean and quantiles of both sets of distances.

The figure (``RUN/eval/memorization.png``, shown by ``ddpmkit report``) puts the closest samples beside their
nearest training images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["nearest_distances", "loo_nearest_distances", "compare_distances", "evaluate_memorization",
           "NEAR_COPY_QUANTILE"]

NEAR_COPY_QUANTILE = 0.01  # a "near copy": closer than 99% of real images are to their nearest training image
MAX_REFERENCE_QUERIES = 2000  # real images whose leave-one-out distance is measured (a random subset beyond)


def _flat(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        x = x.double() / 255.0
    return x.reshape(x.shape[0], -1).double()


def nearest_distances(queries, reference, *, chunk: int = 1024, exclude_self: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the Euclidean distance to its nearest reference row (over the flattened values,
    uint8 read as value/255) divided by sqrt(dim) (a root mean square), and that row's index.

    ``exclude_self``: queries are the reference's first rows (query i is reference row i), which is skipped.
    """
    q, r = _flat(queries), _flat(reference)
    if q.shape[1] != r.shape[1]:
        raise ConfigError(f"cannot compare images of {q.shape[1]} values with images of {r.shape[1]}")
    r2 = (r * r).sum(1)
    dist, idx = [], []
    for i in range(0, q.shape[0], chunk):
        qc = q[i:i + chunk]
        # ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2
        d2 = ((qc * qc).sum(1, keepdim=True) - 2.0 * qc @ r.T + r2[None]).clamp_(min=0)
        if exclude_self:
            rows = torch.arange(qc.shape[0])
            d2[rows, i + rows] = float("inf")
        m, j = d2.min(1)
        dist.append((m / q.shape[1]).sqrt())
        idx.append(j)
    return torch.cat(dist).numpy(), torch.cat(idx).numpy()


def loo_nearest_distances(reference, max_queries: int = MAX_REFERENCE_QUERIES, seed: int = 0):
    """Leave-one-out: for (up to ``max_queries``, a seeded random subset of) the reference rows, the distance to
    the nearest other reference row."""
    r = torch.as_tensor(reference)
    n = r.shape[0]
    if n < 2:
        raise ConfigError("the memorisation check needs at least 2 training images")
    if n > max_queries:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_queries]
        order = torch.cat([pick, torch.ones(n, dtype=torch.bool).index_fill_(0, pick, False).nonzero()[:, 0]])
        r = r[order]
        n = max_queries
    return nearest_distances(r[:n], r, exclude_self=True)[0]


def compare_distances(samples_d: np.ndarray, real_d: np.ndarray, quantile: float = NEAR_COPY_QUANTILE) -> dict:
    """The statistics of the module docstring, for sample distances against real leave-one-out distances."""
    s, r = np.sort(np.asarray(samples_d, float)), np.sort(np.asarray(real_d, float))
    # P(sample < real) + P(equal) / 2: the Mann-Whitney U statistic / (n_s n_r) (Mann & Whitney 1947)
    below = np.searchsorted(r, s, side="left")
    upto = np.searchsorted(r, s, side="right")
    closer = float(((len(r) - upto) + 0.5 * (upto - below)).sum() / (len(s) * len(r)))
    tau = float(np.quantile(r, quantile))
    return {"closer_than_real": closer, "threshold": tau, "near_copies": float((s < tau).mean()),
            "real_near_copies": float((r < tau).mean()), "samples_mean": float(s.mean()),
            "real_mean": float(r.mean()), "samples_q01": float(np.quantile(s, 0.01)),
            "samples_median": float(np.median(s)), "real_median": float(np.median(r)), "n": int(len(s)),
            "n_real": int(len(r))}


def _features(data: str, log):
    """(name, function uint8 images -> features) of the run's data, or None."""
    from .quality import QualityProbe, classifier_view

    if str(data).strip().lower() == "digits":
        probe = QualityProbe.digits(log=log)
        return "digits classifier", lambda u8: probe.classifier.features(
            classifier_view(u8.float() / 127.5 - 1.0, 16))
    from .inception import InceptionFeatures, default_inception_path

    if not default_inception_path().is_file():
        log(f"memorization: no Inception file at {default_inception_path()}; pixel distances only")
        return None
    ext = InceptionFeatures(progress=False)
    return "Inception", lambda u8: ext(u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8)


def evaluate_memorization(run_dir, *, n: int = 500, sampler: str | None = None, steps: int | None = None,
                          seed: int = 0, out=None, ema: bool = True, pairs: int = 8, guidance: float | None = None,
                          log=print) -> dict:
    """Draw ``n`` samples from a run (a Run or its path; a class-conditional one: every class in turn, guided with
    ``guidance``, default ``DEFAULT_GUIDANCE``), measure their distances to the training set against real images' own,
    write ``OUT/memorization.json`` and ``OUT/memorization.png`` (OUT: ``RUN/eval``); returns the result.
    ``sampler`` and ``steps`` default to the run's own (a distilled student's), else DDIM with 50 steps."""
    from ..data import load_dataset
    from ..images import to_uint8
    from ..limits import MAX_GRID, check_int
    from ..run import Run
    from ..request import DEFAULT_GUIDANCE, SampleOptions, guidance_weight
    from .quality import draw_samples

    check_int("--n", n, 2, MAX_GRID)
    check_int("--pairs", pairs, 0, 64)
    if guidance is not None and not (isinstance(guidance, (int, float)) and 0 <= guidance < float("inf")):
        raise ConfigError(f"--guidance must be a number >= 0, got {guidance!r}")
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)  # an opened Run is used as it is
    cfg = run.config.get("train", {})
    t0 = time.perf_counter()
    c, h, w = run.pixel_shape  # a latent run's samples are compared with the images, decoded
    data = load_dataset(cfg.get("data", "digits"), image_size=h, channels=c, data_dir=cfg.get("data_dir"),
                        split="train", progress=False)
    train = data.images
    den = run.denoiser(ema=ema)
    K = len(run.class_names) if run.class_cond and run.class_names else None
    plan = SampleOptions(sampler=sampler, steps=steps).plan(run.schedule, run.sampling_defaults())
    w = (DEFAULT_GUIDANCE if guidance is None else guidance) if K and run.null_class is not None else None
    if run.distilled_guidance is not None:  # a distilled student's network is guided already, at its own weight
        guidance_weight(guidance, run.class_names, run.null_class, run.distilled_guidance)  # refuses another
        w = None
    x, _ = draw_samples(den, n, run.image_shape, sampler=plan, steps=None, seed=seed, num_classes=K, guidance=w,
                        null_class=run.null_class)
    samples = to_uint8(x.cpu())
    result = {"run": str(run.dir), "n": n, "sampler": plan.sampler, "steps": plan.steps, "seed": seed,
              "guidance": guidance, "n_train": int(train.shape[0])}
    d_pix, j_pix = nearest_distances(samples, train)
    result["pixels"] = compare_distances(d_pix, loo_nearest_distances(train))
    feats = _features(cfg.get("data", "digits"), log)
    if feats is not None:
        name, f = feats
        fs, ft = f(samples), f(train)
        d_f, _ = nearest_distances(torch.from_numpy(fs), torch.from_numpy(ft))
        result["features"] = {"name": name, **compare_distances(d_f, loo_nearest_distances(torch.from_numpy(ft)))}
    result["seconds"] = time.perf_counter() - t0
    out = Path(out) if out else run.dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    from ..files import atomic_write_text

    atomic_write_text(out / "memorization.json", json.dumps(result, indent=1) + "\n")
    result["json"] = out / "memorization.json"
    if pairs:
        from ..viz.plots import plot_nearest_pairs

        order = np.argsort(d_pix)[:pairs]
        result["figure"] = plot_nearest_pairs(samples[torch.from_numpy(order)], train[torch.from_numpy(j_pix[order])],
                                              d_pix[order], result["pixels"]["threshold"],
                                              out / "memorization.png")
    return result
