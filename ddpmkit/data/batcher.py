"""Batches served from a uint8 image tensor kept on the device, as float tensors in [-1, 1] (with labels).

``Batcher`` samples without replacement within an epoch and flips at random, all from one seeded CPU
``torch.Generator``; its ``state_dict`` resumes bit-exactly. Labels, when given, are gathered with the
same indices as the images, so a label always follows its image (mirrored or not, in any epoch).
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError, ConfigError, DataError
from ..images import from_uint8
from .common import _MEMORY_SHARE, ImageData

__all__ = ["Batcher"]


class Batcher:
    """Random batches from a uint8 image tensor kept on ``device``, as float [-1, 1] tensors.

    Each epoch is a fresh permutation of all N images (sampling without replacement), drawn together with
    N flip bits from one CPU ``torch.Generator`` seeded with ``seed``, so the order is the same on every
    device. A batch may run across the end of an epoch (and ``batch_size`` may exceed N). The per-batch
    work is an index_select, a ``torch.where`` with the mirrored batch, and the scaling: no Python loop
    over images, no worker processes.

    ``next_batch(rank=r, world_size=w)`` returns rank r's contiguous slice of the global batch, whose
    order does not depend on w. Iterating a Batcher yields ``next_batch()`` forever.

    Given an ``ImageData``, its labels and class names come along (``labels=`` overrides the labels).
    ``next_batch(return_labels=True)`` gives ``(x, y)``: y int64 [B], gathered with x's indices.

    A float tensor in place of the uint8 images (a latent run's latents) is served as it is, not scaled; a flipped
    sample then comes from ``mirrored`` (the latents of the mirror images: a latent's own mirror image is not one),
    when given.
    """

    def __init__(self, images_uint8, batch_size: int, *, device="cpu", flip: bool = True, seed: int = 0,
                 labels: torch.Tensor | None = None, mirrored: torch.Tensor | None = None):
        class_names = None
        if isinstance(images_uint8, ImageData):
            if labels is None:
                labels, class_names = images_uint8.labels, images_uint8.class_names
            images_uint8 = images_uint8.images
        if (not torch.is_tensor(images_uint8) or images_uint8.dim() != 4
                or not (images_uint8.dtype == torch.uint8 or images_uint8.is_floating_point())):
            desc = (f"{images_uint8.dtype} {tuple(images_uint8.shape)}" if torch.is_tensor(images_uint8)
                    else type(images_uint8).__name__)
            raise DataError(f"Batcher needs a uint8 (or float) tensor [N, C, H, W], got {desc}")
        if mirrored is not None and (not torch.is_tensor(mirrored) or mirrored.shape != images_uint8.shape
                                     or mirrored.dtype != images_uint8.dtype):
            raise DataError("Batcher's mirrored tensor must match the images in shape and dtype")
        n = int(images_uint8.shape[0])
        if n == 0:
            raise DataError("Batcher got no images")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (n,):
                raise DataError(f"Batcher got {tuple(labels.shape)} labels for {n} images")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            nbytes = images_uint8.numel()
            if nbytes > _MEMORY_SHARE * free:
                raise DataError(f"the dataset needs {nbytes / 2**30:.2f} GiB on {self.device} but only "
                                f"{free / 2**30:.2f} GiB is free there; use a smaller image_size or fewer images")
        self.images = images_uint8.to(self.device).contiguous()
        self.mirrored = None if mirrored is None else mirrored.to(self.device).contiguous()
        self.labels = None if labels is None else labels.to(device=self.device, dtype=torch.int64)
        self.class_names: tuple[str, ...] | None = class_names
        self.batch_size = batch_size
        self.flip = bool(flip)
        self.seed = seed
        self.num_images = n
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(seed)
        self._epoch = 0
        self._pos = 0
        self._set_tables(*self._draw_tables())

    # -- the epoch tables
    def _draw_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(self.num_images, generator=self._gen)
        flips = torch.randint(0, 2, (self.num_images,), generator=self._gen, dtype=torch.uint8)
        return perm, flips  # flips are drawn even when flip=False, so the order never depends on it

    def _set_tables(self, perm: torch.Tensor, flips: torch.Tensor) -> None:
        self._perm, self._flips = perm, flips
        self._perm_dev = perm.to(self.device)
        self._flips_dev = flips.to(self.device, dtype=torch.bool)

    @property
    def epoch(self) -> int:
        """Number of whole epochs served before the current one."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many images of the current epoch have been served."""
        return self._pos

    # -- batches
    def next_indices(self, *, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance by one global batch; return this rank's (indices, flip mask) on the device."""
        b = self.batch_size
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world_size must be a positive integer, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank!r}")
        if b % world_size:
            raise ConfigError(f"batch_size {b} is not divisible by world_size {world_size}")
        idx, flips = [], []
        need = b
        while need:
            if self._pos == self.num_images:
                self._epoch += 1
                self._pos = 0
                self._set_tables(*self._draw_tables())
            take = min(need, self.num_images - self._pos)
            idx.append(self._perm_dev[self._pos:self._pos + take])
            flips.append(self._flips_dev[self._pos:self._pos + take])
            self._pos += take
            need -= take
        idx_t = idx[0] if len(idx) == 1 else torch.cat(idx)
        flip_t = flips[0] if len(flips) == 1 else torch.cat(flips)
        per = b // world_size
        return idx_t[rank * per:(rank + 1) * per], flip_t[rank * per:(rank + 1) * per]

    def next_batch(self, return_labels: bool = False, *, rank: int = 0, world_size: int = 1):
        """The next batch: float32 [B / world_size, C, H, W] in [-1, 1] (and int64 labels if asked)."""
        if return_labels and self.labels is None:
            raise ConfigError("this Batcher has no labels")
        idx, flip = self.next_indices(rank=rank, world_size=world_size)
        x = self.images.index_select(0, idx)
        if self.flip:
            other = x.flip(3) if self.mirrored is None else self.mirrored.index_select(0, idx)
            x = torch.where(flip.view(-1, 1, 1, 1), other, x)
        x = from_uint8(x) if x.dtype == torch.uint8 else x.float()
        if return_labels:
            return x, self.labels.index_select(0, idx)
        return x

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    # -- exact resume
    def state_dict(self) -> dict:
        """Tensors and ints only (store the tensors as safetensors, the ints as JSON)."""
        return {
            "generator_state": self._gen.get_state().clone(),
            "permutation": self._perm.clone(),
            "flips": self._flips.clone(),
            "position": int(self._pos),
            "epoch": int(self._epoch),
            "num_images": int(self.num_images),
            "seed": int(self.seed),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``: the batches that follow are bit-identical to an uninterrupted run."""
        need = ("generator_state", "permutation", "flips", "position", "epoch", "num_images")
        missing = [k for k in need if k not in state]
        if missing:
            raise CheckpointError(f"batcher state lacks {', '.join(missing)}")
        n = int(state["num_images"])
        if n != self.num_images:
            raise CheckpointError(f"batcher state is for {n} images, this dataset has {self.num_images}")
        perm = torch.as_tensor(state["permutation"]).cpu()
        flips = torch.as_tensor(state["flips"]).cpu()
        pos = int(state["position"])
        if perm.shape != (n,) or perm.dtype != torch.int64 or flips.shape != (n,) or not 0 <= pos <= n:
            raise CheckpointError("batcher state is inconsistent (permutation, flips or position)")
        if not torch.equal(torch.sort(perm).values, torch.arange(n)):
            raise CheckpointError("batcher state's permutation is not a permutation of the dataset")
        gen = torch.Generator(device="cpu")
        try:
            gen.set_state(torch.as_tensor(state["generator_state"]).cpu().to(torch.uint8).contiguous())
        except (RuntimeError, TypeError) as e:
            raise CheckpointError(f"batcher state has an invalid generator state ({e})") from None
        self._gen = gen
        self._pos = pos
        self._epoch = int(state["epoch"])
        self._set_tables(perm.contiguous(), flips.to(torch.uint8).contiguous())
