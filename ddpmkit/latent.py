"""The latent space of a latent diffusion run (Rombach et al. 2022): a frozen autoencoder and the scale of its
latents.

A latent run diffuses ``z = (mean(q(z | x)) - shift) * scale`` instead of the image x, and turns a sample back into
an image by ``decode(z / scale + shift)``. The scale makes the latents' standard deviation 1, as the noise schedule
assumes of its data: measured as 1 / std over the encoded training set (Stable Diffusion's 0.18215 is that number for
its VAE, measured once and frozen), or the autoencoder's own ``scaling_factor`` (and, where it has them, per-channel
``latents_mean``/``latents_std``) when it comes with one.

A latent run holds its own copy of the autoencoder, as a small autoencoder run in ``RUN/autoencoder`` (config.json and
one checkpoint of its EMA weights): the run samples and decodes wherever it is moved, and its latents keep meaning
what they meant in training even when the autoencoder run it came from trains on. The data set is encoded once and
cached, keyed by the autoencoder's hash and the images' hash.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError
from .images import from_uint8

__all__ = ["LatentSpace", "AUTOENCODER_DIR", "encode_images", "measure_scale",
           "cached_latents", "state_hash"]

AUTOENCODER_DIR = "autoencoder"  # a latent run's copy of its autoencoder: RUN/autoencoder, an autoencoder run
ENCODE_BATCH = 64


def state_hash(model_config: dict, state: dict) -> str:
    """A short hex digest of an autoencoder: its config and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _channel_vector(value, channels: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels or not torch.isfinite(t).all():
        raise CheckpointError(f"the latent {what} must be one finite number or one per latent channel ({channels}), "
                              f"got {value!r}")
    return t.clone()


@dataclass
class LatentSpace:
    """A frozen autoencoder and the affine map of its posterior mean to diffusion latents:
    ``z = (mean - shift) * scale``, per channel."""

    autoencoder: torch.nn.Module
    scale: torch.Tensor  # float32 [C]
    shift: torch.Tensor  # float32 [C]

    @classmethod
    def of(cls, autoencoder, scale, shift=0.0) -> LatentSpace:
        c = autoencoder.latent_channels
        scale, shift = _channel_vector(scale, c, "scale"), _channel_vector(shift, c, "shift")
        if not (scale > 0).all():
            raise CheckpointError(f"the latent scale must be positive, got {scale.tolist()}")
        return cls(autoencoder, scale, shift)

    @classmethod
    def from_section(cls, autoencoder, section: dict) -> LatentSpace:
        """From a latent run's config.json ``latent`` section (``scale`` and ``shift``)."""
        if type(section) is not dict or "scale" not in section:
            raise CheckpointError("the run's 'latent' section lacks its scale")
        return cls.of(autoencoder, section["scale"], section.get("shift", 0.0))

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def to(self, device) -> LatentSpace:
        self.autoencoder.to(device)
        return self

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return tuple(self.autoencoder.latent_shape(image_size))

    def _affine(self, z: torch.Tensor):
        view = (1, -1, 1, 1)
        return self.scale.to(z.device).view(view), self.shift.to(z.device).view(view)

    def scaled(self, means: torch.Tensor) -> torch.Tensor:
        """Diffusion latents of the autoencoder's posterior means: ``(mean - shift) * scale``."""
        scale, shift = self._affine(means)
        return (means - shift) * scale

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion latents of images x in [-1, 1]: the posterior's mean, shifted and scaled."""
        return self.scaled(self.autoencoder.encode(x.to(self.device)).mean.float())

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (float, not clamped) of diffusion latents z."""
        scale, shift = self._affine(z)
        return self.autoencoder.decode((z.float() / scale + shift).to(self.device)).float()

    def section(self, **extra) -> dict:
        """config.json's ``latent`` section of a run in this space."""
        def plain(t):
            values = t.tolist()
            return values[0] if len(set(values)) == 1 else values

        return {"scale": plain(self.scale), "shift": plain(self.shift), **extra}


def _digest(tensors: dict) -> str:
    """The SHA-256 of a cache file's tensors (names, shapes and bytes), stored in it and checked on reading."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def encode_images(autoencoder, images_uint8: torch.Tensor, *, device="cpu", flip: bool = False,
                  batch_size: int = ENCODE_BATCH) -> torch.Tensor:
    """The posterior means (unscaled, float32, on the CPU) of uint8 images [N, C, H, W], batch by batch; of the
    mirrored images with ``flip``."""
    out = []
    for i in range(0, images_uint8.shape[0], batch_size):
        x = from_uint8(images_uint8[i:i + batch_size].to(device))
        if flip:
            x = x.flip(3)
        out.append(autoencoder.encode(x).mean.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def measure_scale(means: torch.Tensor) -> float:
    """1 / the standard deviation of every latent value (the scale that makes the data's latents' std 1)."""
    std = float(means.double().std())
    if not std > 0:
        raise ConfigError("the autoencoder's latents of the data set are constant (std 0): it cannot be diffused in")
    return 1.0 / std


def cached_latents(autoencoder, ae_hash: str, images_uint8: torch.Tensor, *, flip: bool, device,
                   cache_dir=None, log=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(posterior means of the images, of their mirror images or None): read from the cache when the same
    autoencoder (by hash) encoded the same images (by hash) before, else encoded and cached."""
    from .files import cache_dir as default_cache_dir
    from .store.state import atomic_save_safetensors, load_safetensors

    images_hash = hashlib.sha256(images_uint8.contiguous().numpy().tobytes()).hexdigest()[:16]
    n, latent_shape = images_uint8.shape[0], tuple(autoencoder.latent_shape(tuple(images_uint8.shape[2:])))
    shape = "x".join(map(str, images_uint8.shape))
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "latents"
    path = folder / f"{ae_hash}-{images_hash}-{shape}{'-flip' if flip else ''}.safetensors"
    if path.is_file():
        try:
            cached = load_safetensors(path)
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("sha256")
            if stored != _digest(cached):  # a flipped byte is encoded again, not trusted
                raise ValueError("its checksum does not match its contents")
            if ("means" in cached and tuple(cached["means"].shape) == (n, *latent_shape) and
                    (not flip or "mirrored" in cached)):
                if log:
                    log(f"latents of the {images_uint8.shape[0]:,} images read from the cache {path}")
                return cached["means"], cached.get("mirrored")
        except Exception as e:  # a damaged cache file is encoded again, never trusted
            print(f"warning: ignoring the latent cache {path} ({type(e).__name__}: {e}); encoding again",
                  file=sys.stderr)
    if log:
        log(f"encoding the {images_uint8.shape[0]:,} images into latents once (cached in {folder})")
    means = encode_images(autoencoder, images_uint8, device=device)
    mirrored = encode_images(autoencoder, images_uint8, device=device, flip=True) if flip else None
    tensors = {"means": means} if mirrored is None else {"means": means, "mirrored": mirrored}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, path, metadata={"autoencoder": ae_hash, "images": images_hash,
                                                         "sha256": _digest(tensors)})
    except OSError as e:  # a read-only cache slows the next run; it does not stop this one
        print(f"warning: could not cache the latents in {folder} ({e.strerror or e})", file=sys.stderr)
    return means, mirrored
