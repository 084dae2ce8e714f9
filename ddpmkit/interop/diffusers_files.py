"""The files of a diffusers folder, read and written: a SOURCE resolved to a local folder (a hub id downloaded), the
model folder and scheduler config found in it, its weights loaded into a network, a config's ``_class_name``, the
class names of a class-conditional export (``class_names.json``), and on the way out the export folder, a model's
config and weights, and the config.json of an imported run.

It reads JSON, safetensors, and pickled ``.bin`` weights through ``torch.load(weights_only=True)`` only; it never
imports diffusers. Downloading a hub id needs ``huggingface_hub``. What the folders mean (which model, which
pipeline) is :mod:`.diffusers`'s and :mod:`.diffusers_latent`'s.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from .. import __version__
from ..errors import CheckpointError
from ..files import atomic_write_json, read_json_object
from ..store import atomic_save_safetensors, check_state_matches, load_safetensors

__all__ = ["WEIGHT_FILES", "SCHEDULER_FILE", "CLASSES_FILE", "resolve_source", "find_model_dir", "find_scheduler",
           "load_weights", "load_model", "read_classes", "config_class_name", "make_out_dir", "write_model",
           "imported_run_config"]

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_FILE = "scheduler_config.json"
CLASSES_FILE = "class_names.json"  # beside unet/config.json: a class-conditional export's names and null label

# ---------------------------------------------------------------------------------------------- reading


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


def find_model_dir(root: Path) -> Path:
    """The folder of the model in ``root``: ``root`` itself or its ``unet/``, the first with a config and weights."""
    for d in (root, root / "unet"):
        if (d / "config.json").is_file() and any((d / w).is_file() for w in WEIGHT_FILES):
            return d
    raise CheckpointError(f"{root} holds no diffusers model: expected config.json and {' or '.join(WEIGHT_FILES)} "
                          "in it or in its unet/ folder")


def find_scheduler(root: Path, model_dir: Path) -> Path | None:
    """The scheduler config beside the model or in a ``scheduler/`` folder; None when there is none."""
    for p in (model_dir / SCHEDULER_FILE, root / SCHEDULER_FILE, root / "scheduler" / SCHEDULER_FILE,
              model_dir.parent / "scheduler" / SCHEDULER_FILE):
        if p.is_file():
            return p
    return None


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``model_dir``: its safetensors file, else its ``.bin`` (tensors and containers only)."""
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


def load_model(model_dir: Path, network, cfg: dict, convert: Callable[[dict, dict], dict]) -> torch.nn.Module:
    """``network.from_config(cfg)`` with the weights in ``model_dir``, translated to ddpmkit's names by
    ``convert(state, cfg)``, checked against the network and loaded strictly."""
    state = convert(load_weights(model_dir), cfg)
    model = network.from_config(cfg)
    check_state_matches(state, model.state_dict(), f"the weights in {model_dir}")
    model.load_state_dict(state, strict=True)
    return model


def read_classes(model_dir: Path, cfg: Mapping) -> dict | None:
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


def config_class_name(config_path: Path) -> str | None:
    """The ``_class_name`` of a diffusers config.json (None when the file is absent or names none)."""
    if not config_path.is_file():
        return None
    name = read_json_object(config_path, error=CheckpointError).get("_class_name")
    return name if isinstance(name, str) else None


# ---------------------------------------------------------------------------------------------- writing


def make_out_dir(out: Path, *subdirs: str) -> None:
    """Create the export folder ``out`` (absent or empty) and its ``subdirs``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for d in subdirs:
            (out / d).mkdir(exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {out}: {e.strerror or e}") from e


def write_model(folder: Path, dcfg: Mapping, state: Mapping[str, torch.Tensor]) -> None:
    """A diffusers model in ``folder``: its safetensors weights, then its config.json."""
    atomic_save_safetensors(state, folder / WEIGHT_FILES[0], metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", dcfg, error=CheckpointError)


def imported_run_config(cfg: dict, source, imported: dict, **sections) -> dict:
    """config.json of a run imported from the diffusers model at ``source``, ``cfg`` its network in ddpmkit's
    terms: ``sections`` are the run's others (``diffusion``, or ``kind`` and ``latent``), ``imported`` what
    ``imported_from`` records beside the source and the format (the diffusers configs)."""
    return {
        "format": "ddpmkit-run",
        "version": 1,
        "ddpmkit_version": __version__,
        **sections,
        "model": cfg,
        "data": {"source": None, "image_size": cfg["image_size"], "channels": cfg["in_channels"]},
        "imported_from": {"source": str(source), "format": "diffusers", **imported},
    }
