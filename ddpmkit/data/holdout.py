"""A fixed held-out part of a data set that has no test split of its own (the digits, a folder): the images an
autoencoder is measured on and never trained on."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import DataError
from .common import ImageData
from .sources import load_dataset, parse_source

__all__ = ["holdout_indices", "split_for_training", "HOLDOUT_SEED"]

HOLDOUT_SEED = 0x686F6C64  # "hold": the choice depends on the number of images and the fraction only, not the run


def holdout_indices(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out indices) of ``n`` images, each sorted: ``round(n * fraction)`` of them (at least
    one when ``fraction > 0``, and at least one left to train on) held out by a fixed permutation."""
    k = 0 if fraction <= 0 else min(max(1, round(n * fraction)), n - 1)
    if k < 0 or n < 1:
        raise DataError(f"cannot hold out a fraction {fraction:g} of {n} images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return perm[k:].sort().values, perm[:k].sort().values


def split_for_training(data: ImageData, cfg, *, progress: bool = False) -> tuple[ImageData, torch.Tensor | None]:
    """The images to train on and the held-out uint8 images [M, C, H, W] (None when ``cfg.holdout`` is 0).

    CIFAR-10 keeps its test split out of training already: its held-out images are that split, and every training
    image is trained on. Any other source loses the fixed fraction ``cfg.holdout`` of its images to the held-out set.
    """
    kind, _ = parse_source(cfg.data)
    if kind == "cifar10":
        test = load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels, data_dir=cfg.data_dir,
                            download=cfg.download, split="test", progress=progress)
        return data, test.images
    if cfg.holdout <= 0:
        return data, None
    if data.num_images < 2:
        raise DataError(f"{cfg.data} has {data.num_images} image(s): too few to hold any out (use --holdout 0)")
    train, held = holdout_indices(data.num_images, cfg.holdout)
    kept = dataclasses.replace(data, images=data.images[train],
                               labels=None if data.labels is None else data.labels[train])
    return kept, data.images[held]
