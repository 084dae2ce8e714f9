"""Interop with the diffusers file format: read a ``UNet2DModel`` and its scheduler into a ddpmkit run, and
write a run back out as a diffusers ``DDPMPipeline`` folder (a class-conditional run: a folder with its own
``pipeline.py``, see :func:`export_diffusers`). An ``AutoencoderKL`` (a folder of its own, or the ``vae/`` of a
pipeline such as Stable Diffusion's) becomes an autoencoder run, and an autoencoder run exports as an
``AutoencoderKL`` folder. A latent diffusion run exports as an ``LDMPipeline`` folder (its autoencoder in
``vqvae/``), or as a folder with its own pipeline and a ``vae/`` where LDMPipeline cannot run it; either imports
back as a latent run.

This module reads and writes files only (JSON, safetensors, and pickled ``.bin`` weights through
``torch.load(weights_only=True)``); it never imports diffusers. Downloading a hub id needs ``huggingface_hub``.
The translation of configs and weight names between the two U-Nets is :mod:`.diffusers_convert`'s, between the
two autoencoders :mod:`.diffusers_vae`'s.

A class-conditional run exports with ``num_class_embeds`` = its classes + 1 (the null class last), and its class
names and null label go into ``unet/class_names.json`` beside the config, which an import reads back. A diffusers
model imported without that file keeps its labels 0..N-1, unnamed, and no null class (so it cannot be guided).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .. import __version__
from ..errors import CheckpointError, ConfigError
from ..models.autoencoder import AutoencoderKL
from ..files import atomic_write_json, atomic_write_text, read_json_object
from ..latent import AUTOENCODER_DIR, LatentSpace, state_hash
from ..models.unet import UNet
from ..run import Run
from ..store import (atomic_save_safetensors, check_state_matches, load_safetensors, prepare_run_dir,
                     save_checkpoint, write_config)
from .diffusers_convert import (diffusers_config_from_unet, diffusion_from_scheduler, scheduler_from_diffusion,
                                state_from_diffusers, state_to_diffusers, unet_config_from_diffusers)
from .diffusers_vae import (LATENT_KEYS, autoencoder_config_from_diffusers, diffusers_config_from_autoencoder,
                            state_from_diffusers_vae, state_to_diffusers_vae)

__all__ = ["import_diffusers", "export_diffusers", "unet_config_from_diffusers", "diffusers_config_from_unet",
           "state_from_diffusers", "state_to_diffusers", "diffusion_from_scheduler", "scheduler_from_diffusion",
           "autoencoder_config_from_diffusers", "diffusers_config_from_autoencoder", "state_from_diffusers_vae",
           "state_to_diffusers_vae"]

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_FILE = "scheduler_config.json"

# ---------------------------------------------------------------------------------------------- files


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(source: str) -> Path:
    """A local folder for SOURCE: the folder itself, or a hub id downloaded (when the hub can be reached)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source} is not a directory: pass the folder of a diffusers model")
        return path
    if not _HUB_ID.match(str(source)):
        raise CheckpointError(f"{source} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{source} is not a local folder, and downloading it as a hub id needs "
                              "huggingface_hub (pip install 'ddpmkit[diffusers]')") from None
    try:
        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:  # network, authentication, missing repository: all end the same way for the user
        raise CheckpointError(f"could not download {source} from the hub ({_first_line(e)}); download it where the hub "
                              "can be reached and pass its local folder") from None


def _find_model_dir(root: Path) -> Path:
    for d in (root, root / "unet"):
        if (d / "config.json").is_file() and any((d / w).is_file() for w in WEIGHT_FILES):
            return d
    raise CheckpointError(f"{root} holds no diffusers model: expected config.json and {' or '.join(WEIGHT_FILES)} "
                          "in it or in its unet/ folder")


def _find_scheduler(root: Path, model_dir: Path) -> Path | None:
    for p in (model_dir / SCHEDULER_FILE, root / SCHEDULER_FILE, root / "scheduler" / SCHEDULER_FILE,
              model_dir.parent / "scheduler" / SCHEDULER_FILE):
        if p.is_file():
            return p
    return None


def _load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    st, binf = (model_dir / w for w in WEIGHT_FILES)
    if st.is_file():
        return load_safetensors(st)  # never a pickle; damage is a CheckpointError naming the file
    try:
        obj = torch.load(binf, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise CheckpointError(f"cannot read the weights in {binf}: {_first_line(e)}") from None
    except Exception as e:  # the unpickler refuses anything but tensors and containers
        raise CheckpointError(f"cannot read the weights in {binf} safely: {type(e).__name__}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{binf} does not hold a state dict of tensors")
    return obj


CLASSES_FILE = "class_names.json"  # beside unet/config.json: a class-conditional export's names and null label


def _read_classes(model_dir: Path, cfg: Mapping) -> dict | None:
    """The ``classes`` section for an imported class-conditional model, from ``class_names.json`` when present."""
    path = model_dir / CLASSES_FILE
    n = cfg.get("num_class_embeds")
    if n is None or not path.is_file():
        return None
    d = read_json_object(path, error=CheckpointError)
    names, null = d.get("names"), d.get("null")
    if (type(names) is not list or not all(type(c) is str for c in names) or null != len(names)
            or n != len(names) + 1):
        raise CheckpointError(f"{path} does not fit num_class_embeds={n}: it needs {n - 1} names and null {n - 1}")
    return {"names": names, "null": null}


def _class_name(config_path: Path) -> str | None:
    """The ``_class_name`` of a diffusers config.json (None when the file is absent or names none)."""
    if not config_path.is_file():
        return None
    name = read_json_object(config_path, error=CheckpointError).get("_class_name")
    return name if isinstance(name, str) else None


def _find_vae_dir(root: Path) -> Path | None:
    """The folder of an AutoencoderKL to import: ``root`` itself, or the ``vae/`` of a pipeline whose ``unet/``
    holds no UNet2DModel (e.g. Stable Diffusion's); None when SOURCE is something else."""
    if _class_name(root / "config.json") == VAE_CLASS:
        return root
    if (not (root / "config.json").is_file() and _class_name(root / "vae" / "config.json") == VAE_CLASS
            and _class_name(root / "unet" / "config.json") != "UNet2DModel"):
        return root / "vae"
    return None


def import_diffusers(source: str, out_dir, *, log=print) -> Path:
    """Convert a diffusers ``UNet2DModel`` (and its scheduler config) into a new ddpmkit run directory, or a
    diffusers ``AutoencoderKL`` (its own folder, or the ``vae/`` of a pipeline without a UNet2DModel, such as Stable
    Diffusion's) into a new autoencoder run (config.json's ``"kind": "autoencoder"``).

    Everything is read and converted in memory first; the run directory is written only when the weights load
    strictly into the network that the config describes. ``out_dir`` must not exist or be empty.
    """
    root = resolve_source(source)
    vae_dir = _find_vae_dir(root)
    if vae_dir is not None:
        return _import_vae(source, vae_dir, out_dir, log=log)
    latent_vae = _find_latent_vae(root)
    model_dir = _find_model_dir(root)
    dcfg = read_json_object(model_dir / "config.json", error=CheckpointError)
    cfg = unet_config_from_diffusers(dcfg)
    sched_path = _find_scheduler(root, model_dir)
    scfg = read_json_object(sched_path, error=CheckpointError) if sched_path is not None else {}
    diffusion = diffusion_from_scheduler(scfg)
    learned_out = cfg.get("out_channels") == 2 * cfg["in_channels"]
    if (diffusion["variance"] == "learned") != learned_out:
        raise ConfigError(f"the scheduler's variance_type={scfg.get('variance_type')!r} does not fit a U-Net with "
                          f"{cfg['in_channels']} input and {cfg.get('out_channels')} output channels")
    state = state_from_diffusers(_load_weights(model_dir), cfg)
    model = UNet.from_config(cfg)
    check_state_matches(state, model.state_dict(), f"the weights in {model_dir}")
    model.load_state_dict(state, strict=True)

    classes = _read_classes(model_dir, cfg)
    latent = None if latent_vae is None else _read_latent_pipeline(root, latent_vae, cfg)

    run = prepare_run_dir(out_dir, resume=False)
    save_checkpoint(run, 0, model_state=model.state_dict(), keep=None)
    config = {
        "format": "ddpmkit-run",
        "version": 1,
        "ddpmkit_version": __version__,
        "model": cfg,
        "diffusion": diffusion,
        "data": {"source": None, "image_size": cfg["image_size"], "channels": cfg["in_channels"]},
        "imported_from": {"source": str(source), "format": "diffusers", "unet_config": dict(dcfg),
                          "scheduler_config": dict(scfg) if scfg else None},
    }
    if classes is not None:
        config["classes"] = classes
    if latent is not None:  # the run's own copy of the autoencoder first, config.json's latent section after it
        config["latent"], config["data"] = _write_latent_copy(run, latent, source)
    write_config(run, config)  # last: a folder without config.json is not taken for a run
    n = sum(p.numel() for p in model.parameters())
    what = (f"U-Net at {cfg['image_size']}x{cfg['image_size']}" if latent is None else
            f"latent diffusion U-Net on {'x'.join(map(str, config['latent']['shape']))} latents of a "
            f"{latent.model.num_parameters():,}-parameter KL autoencoder (f={latent.model.factor}, "
            f"{'x'.join(map(str, config['latent']['image_shape']))} images, {latent.describe()})")
    log(f"imported {source}: a {n:,}-parameter {what}, "
        f"{diffusion['schedule']} schedule, T={diffusion['T']}, objective {diffusion['objective']}, "
        f"variance {diffusion['variance']}" + ("" if sched_path else " (no scheduler config: the paper's defaults)"))
    return run


VAE_CLASS = "AutoencoderKL"


def _read_vae(vae_dir: Path) -> tuple[dict, dict, dict, AutoencoderKL]:
    """(its diffusers config, ddpmkit's config, the latent statistics, the network with its weights) of the
    diffusers AutoencoderKL in ``vae_dir``, read and checked in memory."""
    dcfg = read_json_object(vae_dir / "config.json", error=CheckpointError)
    cfg, latent = autoencoder_config_from_diffusers(dcfg)
    if not any((vae_dir / w).is_file() for w in WEIGHT_FILES):
        raise CheckpointError(f"{vae_dir} holds an AutoencoderKL config but no weights: expected "
                              f"{' or '.join(WEIGHT_FILES)} beside it")
    state = state_from_diffusers_vae(_load_weights(vae_dir), cfg)
    model = AutoencoderKL.from_config(cfg)
    check_state_matches(state, model.state_dict(), f"the weights in {vae_dir}")
    model.load_state_dict(state, strict=True)
    return dict(dcfg), cfg, latent, model.eval()


def _autoencoder_config(cfg: dict, latent: dict, vae_dcfg: dict, source) -> dict:
    """config.json of an autoencoder run imported from a diffusers AutoencoderKL."""
    return {
        "format": "ddpmkit-run",
        "version": 1,
        "ddpmkit_version": __version__,
        "kind": "autoencoder",
        "model": cfg,
        "latent": latent,
        "data": {"source": None, "image_size": cfg["image_size"], "channels": cfg["in_channels"]},
        "imported_from": {"source": str(source), "format": "diffusers", "vae_config": vae_dcfg},
    }


def _import_vae(source: str, vae_dir: Path, out_dir, *, log=print) -> Path:
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


# ---------------------------------------------------------------------------------------------- latent pipelines

LDM_PIPELINE = "LDMPipeline"  # diffusers' unconditional latent diffusion pipeline: vqvae/, unet/, scheduler/
LATENT_PIPELINE_CLASS = "LatentDDPMPipeline"  # ours, for a latent map LDMPipeline cannot apply
DIFFUSERS_SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL default, what a config without one gets there


def _find_latent_vae(root: Path) -> Path | None:
    """The autoencoder folder of a latent diffusion pipeline: its ``vqvae/`` (LDMPipeline's name) or ``vae/``
    (ours) beside a UNet2DModel in ``unet/``; None when ``root`` is no such pipeline. An autoencoder other than an
    AutoencoderKL (LDM's VQModel) is a one-line CheckpointError: imported alone, its U-Net would make latents."""
    if _class_name(root / "unet" / "config.json") != "UNet2DModel":
        return None
    for name in ("vqvae", "vae"):
        cls = _class_name(root / name / "config.json")
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


def _read_latent_pipeline(root: Path, vae_dir: Path, unet_cfg: dict) -> _LatentImport:
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


def _write_latent_copy(run: Path, latent: _LatentImport, source) -> tuple[dict, dict]:
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


def _export_vae(run: Run, run_dir, out: Path, *, ema: bool, log=print) -> Path:
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
    _make_out_dir(out)
    atomic_save_safetensors(state, out / WEIGHT_FILES[0], metadata={"format": "pt"})
    atomic_write_json(out / "config.json", dcfg, error=CheckpointError)
    note = ("" if latent.get("scaling_factor") is not None else
            "; its scaling_factor is 1.0: the latent scale of a ddpmkit autoencoder lives in the latent diffusion "
            "run trained on it")
    log(f"exported {run_dir} to {out}: AutoencoderKL.from_pretrained({str(out)!r}) loads it{note}")
    return out


def _make_out_dir(out: Path, *subdirs: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for d in subdirs:
            (out / d).mkdir(exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {out}: {e.strerror or e}") from e


PIPELINE_FILE = "pipeline.py"  # an export's own pipeline (class-conditional, or a latent map of its own)
PIPELINE_CLASS = "ClassConditionalDDPMPipeline"
LDM_STEPS = 50  # LDMPipeline's default number of DDIM steps, in the call an export prints


def export_diffusers(run_dir, out_dir, *, ema: bool = True, log=print) -> Path:
    """Write a ddpmkit run as a diffusers pipeline folder: ``model_index.json``, ``unet/`` (config and safetensors
    weights) and ``scheduler/scheduler_config.json``. ``out_dir`` must not exist or be empty.

    An unconditional run is a ``DDPMPipeline``. A class-conditional one, which DDPMPipeline cannot run (it passes
    no labels), also gets ``pipeline.py`` (a copy of :mod:`ddpmkit.interop.diffusers_pipeline`), named in
    ``model_index.json`` with its null class: ``DiffusionPipeline.from_pretrained(out_dir, trust_remote_code=True)``
    loads it, and ``pipe(class_labels=[...], guidance=w)`` samples with classifier-free guidance.

    A latent diffusion run also writes its copy of the autoencoder (``RUN/autoencoder``) as a diffusers
    ``AutoencoderKL``, and the scheduler does not clip x0 (ddpmkit never clips latents):

    - unconditional, with one scale and no shift (a scale measured by ddpmkit, or a VAE's own scaling_factor): an
      ``LDMPipeline`` folder, its autoencoder in ``vqvae/`` with ``scaling_factor`` = the run's scale, and a
      ``DDIMScheduler`` (LDM's sampler; set_alpha_to_one, leading spacing: ddpmkit's uniform DDIM whenever the steps
      divide T), a ``DDPMScheduler`` for a learned variance, which DDIMScheduler cannot step.
      ``LDMPipeline.from_pretrained(out_dir)`` loads it (its ``vqvae`` is annotated as a VQModel: diffusers logs
      that it got an AutoencoderKL, and decodes it all the same: ``vqvae.decode(z / scaling_factor).sample``);
    - unconditional with a per-channel scale or a shift (``latents_mean``/``latents_std`` or ``shift_factor`` of
      the VAE it trained on), which LDMPipeline cannot apply (it divides by one scaling_factor and shifts nothing):
      the folder's own ``LatentDDPMPipeline`` in ``pipeline.py``, with the autoencoder in ``vae/`` and the exact map
      in ``model_index.json`` (``latent_scale``, ``latent_shift``), loaded as a class-conditional export is;
    - class-conditional: the ``ClassConditionalDDPMPipeline`` with the autoencoder in ``vae/`` and the map in
      ``model_index.json``; its images are decoded.

    ``import_diffusers`` reads each of these back into a latent run.

    An autoencoder run (config.json's ``"kind": "autoencoder"``) is written as a diffusers ``AutoencoderKL``
    folder instead: ``config.json`` (with the run's ``latent`` statistics) and its safetensors weights, which
    ``AutoencoderKL.from_pretrained(out_dir)`` loads.
    """
    run = Run.open(run_dir)
    if run.kind == "autoencoder":
        return _export_vae(run, run_dir, Path(out_dir), ema=ema, log=log)
    # a latent run's autoencoder copy is read and checked (present, its hash) before anything is written
    space = run.latent_space() if run.is_latent else None
    model = run.load_model(ema=ema)
    diffusion = run.diffusion_config
    dcfg = diffusers_config_from_unet(model.config)
    scfg = scheduler_from_diffusion(diffusion)
    state = state_to_diffusers(model.state_dict(), model.config)
    vae = None
    if space is not None:
        scfg["clip_sample"] = False  # ddpmkit's Denoiser never clips latents: they are not bounded by [-1, 1]
        ldm = not run.class_cond and _ldm_can_apply(space)
        vae_dir = "vqvae" if ldm else "vae"
        if ldm and diffusion.get("variance") != "learned":
            scfg = _ddim_scheduler(scfg)
        ae = space.autoencoder
        vae = (vae_dir, diffusers_config_from_autoencoder(ae.config, _vae_statistics(space)),
               state_to_diffusers_vae(ae.state_dict(), ae.config))

    out = Path(out_dir)
    _make_out_dir(out, "unet", "scheduler", *([vae[0]] if vae else []))
    atomic_save_safetensors(state, out / "unet" / WEIGHT_FILES[0], metadata={"format": "pt"})
    atomic_write_json(out / "unet" / "config.json", dcfg, error=CheckpointError)
    if run.class_cond and run.null_class is not None:  # names and null label, for a round trip
        atomic_write_json(out / "unet" / CLASSES_FILE, {"names": list(run.class_names), "null": run.null_class},
                          error=CheckpointError)
    atomic_write_json(out / "scheduler" / SCHEDULER_FILE, scfg, error=CheckpointError)
    index = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", scfg["_class_name"]],
             "unet": ["diffusers", "UNet2DModel"]}
    if vae is not None:
        atomic_save_safetensors(vae[2], out / vae[0] / WEIGHT_FILES[0], metadata={"format": "pt"})
        atomic_write_json(out / vae[0] / "config.json", vae[1], error=CheckpointError)
        index[vae[0]] = ["diffusers", VAE_CLASS]
    if vae is not None and vae[0] == "vqvae":
        index["_class_name"] = LDM_PIPELINE
        atomic_write_json(out / "model_index.json", index, error=CheckpointError)
        steps = min(LDM_STEPS, int(diffusion["T"]))
        log(f"exported {run_dir} to {out}: an LDMPipeline (vqvae/ an AutoencoderKL with scaling_factor "
            f"{vae[1]['scaling_factor']:.6g}, a {scfg['_class_name']}); in Python: from diffusers import LDMPipeline; "
            f"pipe = LDMPipeline.from_pretrained({str(out)!r}); images = pipe(batch_size=4, "
            f"num_inference_steps={steps}).images")
        return out
    if not run.class_cond and vae is None:
        atomic_write_json(out / "model_index.json", index, error=CheckpointError)
        log(f"exported {run_dir} to {out}: DDPMPipeline.from_pretrained({str(out)!r}) loads it")
        return out
    source = Path(__file__).with_name("diffusers_pipeline.py").read_text(encoding="utf-8")
    atomic_write_text(out / PIPELINE_FILE, source, error=CheckpointError)
    # diffusers' convention for a pipeline whose code sits in its folder: _class_name = [module, class]
    cls = PIPELINE_CLASS if run.class_cond else LATENT_PIPELINE_CLASS
    index["_class_name"] = [Path(PIPELINE_FILE).stem, cls]
    if run.class_cond:
        index["null_class"] = run.null_class
    if space is not None:  # the exact map, one number or one per channel: images = vae.decode(z / scale + shift)
        map_ = space.section()
        index.update(latent_scale=map_["scale"], latent_shift=map_["shift"])
    atomic_write_json(out / "model_index.json", index, error=CheckpointError)
    load = (f"from diffusers import DiffusionPipeline; pipe = DiffusionPipeline.from_pretrained({str(out)!r}, "
            "trust_remote_code=True)")
    decoded = "" if space is None else ", decoded by its vae/"
    if not run.class_cond:
        log(f"exported {run_dir} to {out}: a {cls} ({out / PIPELINE_FILE}{decoded}), not an LDMPipeline: the "
            "run's latent map has a per-channel scale or a shift, and LDMPipeline only divides by one "
            f"scaling_factor; in Python: {load}; images = pipe(batch_size=4).images")
        return out
    from ..diffusion.denoiser import DEFAULT_GUIDANCE

    n = model.config["num_class_embeds"] - (run.null_class is not None)  # the labels of real classes
    labels = [0, n - 1] if n > 1 else [0]
    w = DEFAULT_GUIDANCE if run.null_class is not None else 0.0  # without a null class it cannot be guided
    log(f"exported {run_dir} to {out}: a class-conditional {PIPELINE_CLASS} ({out / PIPELINE_FILE}, labels "
        f"0..{n - 1}, guidance weight w as ddpmkit's, diffusers' guidance_scale = 1 + w{decoded}); in Python: "
        f"{load}; images = pipe(class_labels={labels}, guidance={w:g}).images")
    return out


def _ldm_can_apply(space: LatentSpace) -> bool:
    """Whether LDMPipeline's ``vqvae.decode(z / scaling_factor)`` is the run's map: one scale, no shift."""
    return len(set(space.scale.tolist())) == 1 and not space.shift.any()


def _vae_statistics(space: LatentSpace) -> dict:
    """The exported VAE's latent statistics, in diffusers' conventions, for the run's map z = (mean - shift) *
    scale: ``scaling_factor`` (and ``shift_factor``) for one scale and one shift, else ``latents_mean`` = shift and
    ``latents_std`` = 1 / scale with scaling_factor 1 (z = (mean - latents_mean) * scaling_factor / latents_std)."""
    scale, shift = space.scale.tolist(), space.shift.tolist()
    if len(set(scale)) == 1 and len(set(shift)) == 1:
        return {"scaling_factor": scale[0], "shift_factor": shift[0] or None}
    return {"scaling_factor": 1.0, "latents_mean": shift, "latents_std": [1.0 / s for s in scale]}


def _ddim_scheduler(scfg: dict) -> dict:
    """The DDIMScheduler config of an exported DDPMScheduler config: the same schedule and prediction; the last
    step to alpha_bar = 1 and no offset, as ddpmkit's DDIM."""
    cfg = {k: v for k, v in scfg.items() if k != "variance_type"}
    cfg.update(_class_name="DDIMScheduler", set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    return cfg
