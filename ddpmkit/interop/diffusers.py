"""Interop with the diffusers file format: read a ``UNet2DModel`` and its scheduler into a ddpmkit run, and
write a run back out as a diffusers ``DDPMPipeline`` folder (a class-conditional run: a folder with its own
``pipeline.py``, see :func:`export_diffusers`). An ``AutoencoderKL`` (a folder of its own, or the ``vae/`` of a
pipeline such as Stable Diffusion's) becomes an autoencoder run, and an autoencoder run exports as an
``AutoencoderKL`` folder.

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
from pathlib import Path
from typing import Mapping

import torch

from .. import __version__
from ..errors import CheckpointError, ConfigError
from ..models.autoencoder import AutoencoderKL
from ..files import atomic_write_json, atomic_write_text, read_json_object
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
    classes = _read_classes(model_dir, cfg)
    if classes is not None:
        config["classes"] = classes
    write_config(run, config)  # last: a folder without config.json is not taken for a run
    n = sum(p.numel() for p in model.parameters())
    log(f"imported {source}: a {n:,}-parameter U-Net at {cfg['image_size']}x{cfg['image_size']}, "
        f"{diffusion['schedule']} schedule, T={diffusion['T']}, objective {diffusion['objective']}, "
        f"variance {diffusion['variance']}" + ("" if sched_path else " (no scheduler config: the paper's defaults)"))
    return run


VAE_CLASS = "AutoencoderKL"


def _import_vae(source: str, vae_dir: Path, out_dir, *, log=print) -> Path:
    """An autoencoder run from the diffusers AutoencoderKL in ``vae_dir``: config.json (``"kind": "autoencoder"``,
    the network in ``model``, the latent statistics in ``latent``) and the weights as checkpoint step 0."""
    dcfg = read_json_object(vae_dir / "config.json", error=CheckpointError)
    cfg, latent = autoencoder_config_from_diffusers(dcfg)
    if not any((vae_dir / w).is_file() for w in WEIGHT_FILES):
        raise CheckpointError(f"{vae_dir} holds an AutoencoderKL config but no weights: expected "
                              f"{' or '.join(WEIGHT_FILES)} beside it")
    state = state_from_diffusers_vae(_load_weights(vae_dir), cfg)
    model = AutoencoderKL.from_config(cfg)
    check_state_matches(state, model.state_dict(), f"the weights in {vae_dir}")
    model.load_state_dict(state, strict=True)
    size, f, z = cfg["image_size"], model.factor, cfg["latent_channels"]
    shape = (f"{size}x{size} images to {z}x{size // f}x{size // f} latents" if size and size % f == 0 else
             f"{z}-channel latents")
    scale = latent["scaling_factor"]
    line = (f"imported {source}: a {model.num_parameters():,}-parameter KL autoencoder (f={f}, {shape}), "
            + (f"latent scaling factor {scale:g}" if scale is not None else "no latent scaling factor"))

    run = prepare_run_dir(out_dir, resume=False)
    save_checkpoint(run, 0, model_state=model.state_dict(), keep=None)
    config = {
        "format": "ddpmkit-run",
        "version": 1,
        "ddpmkit_version": __version__,
        "kind": "autoencoder",
        "model": cfg,
        "latent": latent,
        "data": {"source": None, "image_size": cfg["image_size"], "channels": cfg["in_channels"]},
        "imported_from": {"source": str(source), "format": "diffusers", "vae_config": dict(dcfg)},
    }
    write_config(run, config)  # last: a folder without config.json is not taken for a run
    log(line)
    return run


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


PIPELINE_FILE = "pipeline.py"  # a class-conditional export's pipeline: diffusers_pipeline.py, copied
PIPELINE_CLASS = "ClassConditionalDDPMPipeline"


def export_diffusers(run_dir, out_dir, *, ema: bool = True, log=print) -> Path:
    """Write a ddpmkit run as a diffusers pipeline folder: ``model_index.json``, ``unet/`` (config and safetensors
    weights) and ``scheduler/scheduler_config.json``. ``out_dir`` must not exist or be empty.

    An unconditional run is a ``DDPMPipeline``. A class-conditional one, which DDPMPipeline cannot run (it passes
    no labels), also gets ``pipeline.py`` (a copy of :mod:`ddpmkit.interop.diffusers_pipeline`), named in
    ``model_index.json`` with its null class: ``DiffusionPipeline.from_pretrained(out_dir, trust_remote_code=True)``
    loads it, and ``pipe(class_labels=[...], guidance=w)`` samples with classifier-free guidance.

    An autoencoder run (config.json's ``"kind": "autoencoder"``) is written as a diffusers ``AutoencoderKL``
    folder instead: ``config.json`` (with the run's ``latent`` statistics) and its safetensors weights, which
    ``AutoencoderKL.from_pretrained(out_dir)`` loads.
    """
    run = Run.open(run_dir)
    if run.kind == "autoencoder":
        return _export_vae(run, run_dir, Path(out_dir), ema=ema, log=log)
    model = run.load_model(ema=ema)
    diffusion = run.diffusion_config
    dcfg = diffusers_config_from_unet(model.config)
    scfg = scheduler_from_diffusion(diffusion)
    state = state_to_diffusers(model.state_dict(), model.config)

    out = Path(out_dir)
    _make_out_dir(out, "unet", "scheduler")
    atomic_save_safetensors(state, out / "unet" / WEIGHT_FILES[0], metadata={"format": "pt"})
    atomic_write_json(out / "unet" / "config.json", dcfg, error=CheckpointError)
    if run.class_cond and run.null_class is not None:  # names and null label, for a round trip
        atomic_write_json(out / "unet" / CLASSES_FILE, {"names": list(run.class_names), "null": run.null_class},
                          error=CheckpointError)
    atomic_write_json(out / "scheduler" / SCHEDULER_FILE, scfg, error=CheckpointError)
    index = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
             "unet": ["diffusers", "UNet2DModel"]}
    if not run.class_cond:
        atomic_write_json(out / "model_index.json", index, error=CheckpointError)
        log(f"exported {run_dir} to {out}: DDPMPipeline.from_pretrained({str(out)!r}) loads it")
        return out
    source = Path(__file__).with_name("diffusers_pipeline.py").read_text(encoding="utf-8")
    atomic_write_text(out / PIPELINE_FILE, source, error=CheckpointError)
    # diffusers' convention for a pipeline whose code sits in its folder: _class_name = [module, class]
    index.update(_class_name=[Path(PIPELINE_FILE).stem, PIPELINE_CLASS], null_class=run.null_class)
    atomic_write_json(out / "model_index.json", index, error=CheckpointError)
    from ..diffusion.denoiser import DEFAULT_GUIDANCE

    n = model.config["num_class_embeds"] - (run.null_class is not None)  # the labels of real classes
    labels = [0, n - 1] if n > 1 else [0]
    w = DEFAULT_GUIDANCE if run.null_class is not None else 0.0  # without a null class it cannot be guided
    log(f"exported {run_dir} to {out}: a class-conditional {PIPELINE_CLASS} ({out / PIPELINE_FILE}, labels "
        f"0..{n - 1}, guidance weight w as ddpmkit's, diffusers' guidance_scale = 1 + w); in Python: "
        f"from diffusers import DiffusionPipeline; pipe = DiffusionPipeline.from_pretrained({str(out)!r}, "
        f"trust_remote_code=True); images = pipe(class_labels={labels}, guidance={w:g}).images")
    return out
