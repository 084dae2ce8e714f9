"""The autoencoder side of the diffusers interop. An ``AutoencoderKL`` (a folder of its own, or the ``vae/`` of a
pipeline such as Stable Diffusion's) becomes an autoencoder run, and an autoencoder run exports as an
``AutoencoderKL`` folder. In a latent diffusion pipeline (LDMPipeline's ``vqvae/``, or the ``vae/`` of ddpmkit's own
pipelines) the autoencoder and the latent map are read into a latent run's own copy of the autoencoder and its
``latent`` section; a latent run's autoencoder is written back with the statistics of its map.

The U-Net, the scheduler and the pipeline folders are :mod:`.diffusers`'s, which calls this module; the files are
:mod:`.diffusers_files`'s, the translation of configs and weight names between the two autoencoders
:mod:`.diffusers_vae`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..files import read_json_object
from ..latent import AUTOENCODER_DIR, LatentSpace, state_hash
from ..models.autoencoder import AutoencoderKL
from ..run import Run
from ..store import prepare_run_dir, save_checkpoint, write_config
from .diffusers_files import (WEIGHT_FILES, config_class_name, imported_run_config, load_model, make_out_dir,
                              write_model)
from .diffusers_vae import (LATENT_KEYS, autoencoder_config_from_diffusers, diffusers_config_from_autoencoder,
                            state_from_diffusers_vae, state_to_diffusers_vae)

__all__ = ["VAE_CLASS", "LDM_PIPELINE", "DIFFUSERS_SCALING_FACTOR", "find_vae_dir", "import_vae", "export_vae",
           "find_latent_vae", "read_latent_pipeline", "write_latent_copy", "autoencoder_export"]

VAE_CLASS = "AutoencoderKL"
LDM_PIPELINE = "LDMPipeline"  # diffusers' unconditional latent diffusion pipeline: vqvae/, unet/, scheduler/
DIFFUSERS_SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL default, what a config without one gets there

# ---------------------------------------------------------------------------------------------- autoencoder runs


def find_vae_dir(root: Path) -> Path | None:
    """The folder of an AutoencoderKL to import: ``root`` itself, or the ``vae/`` of a pipeline whose ``unet/``
    holds no UNet2DModel (e.g. Stable Diffusion's); None when SOURCE is something else."""
    if config_class_name(root / "config.json") == VAE_CLASS:
        return root
    if (not (root / "config.json").is_file() and config_class_name(root / "vae" / "config.json") == VAE_CLASS
            and config_class_name(root / "unet" / "config.json") != "UNet2DModel"):
        return root / "vae"
    return None


def _read_vae(vae_dir: Path) -> tuple[dict, dict, dict, AutoencoderKL]:
    """(its diffusers config, ddpmkit's config, the latent statistics, the network with its weights) of the
    diffusers AutoencoderKL in ``vae_dir``, read and checked in memory."""
    dcfg = read_json_object(vae_dir / "config.json", error=CheckpointError)
    cfg, latent = autoencoder_config_from_diffusers(dcfg)
    if not any((vae_dir / w).is_file() for w in WEIGHT_FILES):
        raise CheckpointError(f"{vae_dir} holds an AutoencoderKL config but no weights: expected "
                              f"{' or '.join(WEIGHT_FILES)} beside it")
    model = load_model(vae_dir, AutoencoderKL, cfg, state_from_diffusers_vae)
    return dict(dcfg), cfg, latent, model.eval()


def _autoencoder_config(cfg: dict, latent: dict, vae_dcfg: dict, source) -> dict:
    """config.json of an autoencoder run imported from a diffusers AutoencoderKL."""
    return imported_run_config(cfg, source, {"vae_config": vae_dcfg}, kind="autoencoder", latent=latent)


def import_vae(source: str, vae_dir: Path, out_dir, *, log=print) -> Path:
    """An autoencoder run from the diffusers AutoencoderKL in ``vae_dir``: config.json (``"kind": "autoencoder"``,
    the network in ``model``, the latent statistics in ``latent``) and the weights as checkpoint step 0."""
    dcfg, cfg, latent, model = _read_vae(vae_dir)
    size, f, z = cfg["image_size"], model.factor, cfg["latent_channels"]
    shape = (f"{size}x{size} images to {z}x{size // f}x{size // f} latents" if size and size % f == 0 else
             f"{z}-channel latents")
    scale = latent["scaling_factor"]
    line = (f"imported {source}: a {model.num_parameters():,}-parameter KL autoencoder (f={f}, {shape}), "
            + (f"latent scaling factor {scale:g}" if scale is not None else "no latent scaling factor"))

    run = prepare_run_dir(out_dir, resume=False)
    save_checkpoint(run, 0, model_state=model.state_dict(), keep=None)
    write_config(run, _autoencoder_config(cfg, latent, dcfg, source))  # last: then it is a run
    log(line)
    return run


def export_vae(run: Run, run_dir, out: Path, *, ema: bool, log=print) -> Path:
    """An autoencoder run as a diffusers AutoencoderKL folder: config.json and its safetensors weights."""
    model = run.load_model(ema=ema)
    latent = run.config.get("latent")
    if latent is not None and type(latent) is not dict:
        raise CheckpointError(f"{run.config_path}: the 'latent' section must be a JSON object")
    latent = {k: v for k, v in (latent or {}).items() if k in LATENT_KEYS}
    try:
        dcfg = diffusers_config_from_autoencoder(model.config, latent)
    except ConfigError as e:
        raise CheckpointError(f"{run.config_path}: {e}") from None
    state = state_to_diffusers_vae(model.state_dict(), model.config)
    make_out_dir(out)
    write_model(out, dcfg, state)
    note = ("" if latent.get("scaling_factor") is not None else
            "; its scaling_factor is 1.0: the latent scale of a ddpmkit autoencoder lives in the latent diffusion "
            "run trained on it")
    log(f"exported {run_dir} to {out}: AutoencoderKL.from_pretrained({str(out)!r}) loads it{note}")
    return out


# ---------------------------------------------------------------------------------------------- latent pipelines


def find_latent_vae(root: Path) -> Path | None:
    """The autoencoder folder of a latent diffusion pipeline: its ``vqvae/`` (LDMPipeline's name) or ``vae/``
    (ours) beside a UNet2DModel in ``unet/``; None when ``root`` is no such pipeline. An autoencoder other than an
    AutoencoderKL (LDM's VQModel) is a one-line CheckpointError: imported alone, its U-Net would make latents."""
    if config_class_name(root / "unet" / "config.json") != "UNet2DModel":
        return None
    for name in ("vqvae", "vae"):
        cls = config_class_name(root / name / "config.json")
        if cls is not None and cls != VAE_CLASS:
            raise CheckpointError(f"{root / name} is a diffusers {cls}: ddpmkit's latent runs decode with a KL "
                                  f"autoencoder ({VAE_CLASS}) only, so this latent pipeline cannot be imported")
        if cls is not None:
            return root / name
    return None


@dataclass
class _LatentImport:
    """A latent pipeline's autoencoder and latent map, read and checked, to be written into the run."""

    vae_dir: Path
    vae_dcfg: dict
    cfg: dict  # ddpmkit's AutoencoderKL config
    stats: dict  # the VAE's latent statistics (scaling_factor, ...)
    model: AutoencoderKL
    space: LatentSpace
    where: str  # where the map came from, in words, for the log line
    source: str  # config.json's latent.scale_source: "autoencoder" (its scaling_factor) or "pipeline"
    shape: list  # [C, h, w] of the latents
    image_shape: list  # [C, H, W] of the decoded images

    def describe(self) -> str:
        scale, shift = self.space.scale.tolist(), self.space.shift.tolist()
        text = f"latent scale {scale[0]:.6g}" if len(set(scale)) == 1 else "a per-channel latent scale"
        if any(shift):
            text += f", shift {shift[0]:.6g}" if len(set(shift)) == 1 else ", a per-channel shift"
        return f"{text} from {self.where}"


def read_latent_pipeline(root: Path, vae_dir: Path, unet_cfg: dict) -> _LatentImport:
    """The autoencoder and latent map of the latent pipeline at ``root`` for the U-Net of config ``unet_cfg``.

    LDMPipeline decodes ``vqvae.decode(z / scaling_factor)``: scale = the VAE's scaling_factor (diffusers' default
    0.18215 when its config has none, as LDMPipeline then gets), shift 0. ddpmkit's own pipelines (a ``vae/``)
    name their exact map in ``model_index.json`` (``latent_scale``, ``latent_shift``), defaulting to the VAE's
    ``scaling_factor`` and ``shift_factor``."""
    dcfg, cfg, stats, model = _read_vae(vae_dir)
    index_path = root / "model_index.json"
    index = read_json_object(index_path, error=CheckpointError) if index_path.is_file() else {}
    scale, shift, source = stats["scaling_factor"], 0.0, "autoencoder"
    where = f"{vae_dir.name}/config.json's scaling_factor"
    if scale is None:
        scale, where = DIFFUSERS_SCALING_FACTOR, f"diffusers' default scaling_factor ({vae_dir.name}/ names none)"
    if index.get("_class_name") != LDM_PIPELINE:  # LDMPipeline ignores shift_factor; our pipelines apply it
        shift = stats["shift_factor"] or 0.0
        if index.get("latent_scale") is not None:
            scale, source, where = index["latent_scale"], "pipeline", "model_index.json"
        if index.get("latent_shift") is not None:
            shift = index["latent_shift"]
    if unet_cfg["in_channels"] != cfg["latent_channels"]:
        raise CheckpointError(f"the U-Net in {root / 'unet'} takes {unet_cfg['in_channels']}-channel inputs, but "
                              f"the autoencoder in {vae_dir} makes {cfg['latent_channels']}-channel latents")
    try:  # a scale that is not positive, or not one number or one per channel: a one-line CheckpointError
        space = LatentSpace.of(model, scale, shift)
    except (TypeError, ValueError, RuntimeError):
        raise CheckpointError(f"{root}: the latent scale {scale!r} and shift {shift!r} ({where}) must be numbers, "
                              f"one or one per latent channel ({cfg['latent_channels']})") from None
    h = unet_cfg["image_size"]
    shape = [cfg["latent_channels"], h, h]
    image_shape = [cfg["out_channels"], h * model.factor, h * model.factor]
    return _LatentImport(vae_dir, dcfg, cfg, stats, model, space, where, source, shape, image_shape)


def write_latent_copy(run: Path, latent: _LatentImport, source) -> tuple[dict, dict]:
    """Write the imported autoencoder as the run's own copy (``RUN/autoencoder``, an autoencoder run of one
    checkpoint); return config.json's ``latent`` and ``data`` sections of the latent run."""
    model = latent.model
    dest = prepare_run_dir(run / AUTOENCODER_DIR, resume=False)
    save_checkpoint(dest, 0, model_state=model.state_dict(), keep=None)
    write_config(dest, _autoencoder_config(latent.cfg, latent.stats, latent.vae_dcfg,
                                           Path(str(source)) / latent.vae_dir.name))
    section = latent.space.section(shape=latent.shape, image_shape=latent.image_shape,
                                   autoencoder=str(Path(str(source)) / latent.vae_dir.name),
                                   autoencoder_hash=state_hash(model.config, model.state_dict()),
                                   scale_source=latent.source)
    c, size = latent.image_shape[0], latent.image_shape[1]
    return section, {"source": None, "image_size": size, "channels": c}


def autoencoder_export(space: LatentSpace) -> tuple[dict, dict]:
    """The diffusers config (with the statistics of the run's latent map) and the weights of a latent run's
    autoencoder, as its export writes them."""
    ae = space.autoencoder
    return (diffusers_config_from_autoencoder(ae.config, _vae_statistics(space)),
            state_to_diffusers_vae(ae.state_dict(), ae.config))


def _vae_statistics(space: LatentSpace) -> dict:
    """The exported VAE's latent statistics, in diffusers' conventions, for the run's map z = (mean - shift) *
    scale: ``scaling_factor`` (and ``shift_factor``) for one scale and one shift, else ``latents_mean`` = shift and
    ``latents_std`` = 1 / scale with scaling_factor 1 (z = (mean - latents_mean) * scaling_factor / latents_std)."""
    scale, shift = space.scale.tolist(), space.shift.tolist()
    if len(set(scale)) == 1 and len(set(shift)) == 1:
        return {"scaling_factor": scale[0], "shift_factor": shift[0] or None}
    return {"scaling_factor": 1.0, "latents_mean": shift, "latents_std": [1.0 / s for s in scale]}
