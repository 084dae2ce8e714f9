"""Checkpoint directories: save, verify, list, prune and load, never unpickling anything.

A training run is days of compute, so a checkpoint is never left half-written where a good one was::

    RUN/checkpoints/step_000001000/
        model.safetensors                  the raw model weights (a flat state_dict)
        ema.safetensors                    the EMA weights (optional)
        optimizer.safetensors, .json       the optimizer state_dict (optional; see ``store.state.save_state``)
        state.safetensors, .json           the rest of the training state: RNG, data order... (optional)
        manifest.json                      written last: format, version, step, size and SHA-256 per file

A checkpoint is complete exactly when its directory is named ``step_N`` and its manifest matches its
files. It is written in a hidden ``checkpoints/.tmp-step_N-<random>`` directory and renamed into place,
so a crash at any moment leaves either the old set of checkpoints or the new one, plus perhaps a hidden
directory that the next save removes.

The format and its checks are :mod:`.manifest`, saving and pruning :mod:`.saving`; this module locates and
loads. It knows files and tensors, not networks: building a model from a checkpoint is ``ddpmkit.run``'s.
"""


from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..files import read_bytes
from .manifest import (_OPTIMIZER, _TRAIN_STATE, EMA_FILE, MANIFEST_NAME, MODEL_FILE, _check_file, _corrupt,
                       _newest_intact, _read_manifest, _step_of, latest_checkpoint, list_checkpoints,
                       verify_checkpoint)
from .rundir import CHECKPOINTS_DIR, CONFIG_NAME, read_config
from .saving import prune_checkpoints, save_checkpoint
from .state import state_from_bytes, tensors_from_bytes, to_device

__all__ = [
    "Checkpoint",
    "Location",
    "MANIFEST_NAME",
    "MODEL_FILE",
    "EMA_FILE",
    "save_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "load_checkpoint",
    "locate",
    "check_state_matches",
    "strip_wrappers",
]


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``config`` is the run's config.json when the run directory has one.

    ``skipped`` lists newer checkpoints that were passed over as corrupt when a run directory was loaded.
    Model and EMA tensors are on ``map_location``; optimizer and training state tensors stay on the CPU
    (``Optimizer.load_state_dict`` moves them to the parameters; RNG states must be CPU tensors).
    """

    step: int
    path: Path
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None = None
    optimizer_state: Any = None
    train_state: Any = None
    config: dict | None = None
    run_dir: Path | None = None
    skipped: list[Path] = field(default_factory=list)



def _run_of_checkpoint(path: Path) -> Path | None:
    """RUN for RUN/checkpoints/step_N, when RUN has a config.json."""
    parent = path.parent
    if parent.name == CHECKPOINTS_DIR and (parent.parent / CONFIG_NAME).is_file():
        return parent.parent
    return None


def _looks_like_checkpoint(path: Path) -> bool:
    return (_step_of(path) is not None or (path / MANIFEST_NAME).exists()
            or (path / MODEL_FILE).exists())


@dataclass(frozen=True)
class Location:
    """What a user's path points at. ``checkpoint`` is a specific checkpoint directory, or None for the run's
    newest intact one; ``run_dir`` is the run directory (with a config.json), or None for a checkpoint that
    sits outside any run."""

    run_dir: Path | None
    checkpoint: Path | None


def locate(target) -> Location:
    """Resolve a run directory, ``RUN/checkpoints``, ``RUN/config.json``, a checkpoint directory or a file in
    one; CheckpointError (one line) for anything else. The one path resolver: ``Run.open`` and
    ``load_checkpoint`` both use it."""
    p = Path(target)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.is_file():
        if p.name == CONFIG_NAME:
            return Location(p.parent, None)
        if _looks_like_checkpoint(p.parent) and p.suffix in (".json", ".safetensors"):
            return Location(_run_of_checkpoint(p.parent), p.parent)
        raise CheckpointError(f"{p} is a file, not a ddpmkit run directory or checkpoint")
    if (p / CONFIG_NAME).is_file():
        return Location(p, None)
    if p.name == CHECKPOINTS_DIR and (p.parent / CONFIG_NAME).is_file():
        return Location(p.parent, None)
    if _looks_like_checkpoint(p):
        return Location(_run_of_checkpoint(p), p)
    raise CheckpointError(f"{p} is not a ddpmkit run directory (no {CONFIG_NAME})")


_PARTS_ALL = ("model", "ema", "optimizer", "train")


def _load_dir(path: Path, verify: bool, map_location, parts=_PARTS_ALL) -> Checkpoint:
    """Load (and verify, reading each file once) one checkpoint directory."""
    if verify:
        manifest = _read_manifest(path)
        listed = set(manifest["files"])
    else:
        try:
            manifest = _read_manifest(path)
            listed = set(manifest["files"])
        except CheckpointError:
            manifest = None
            listed = {n for n in os.listdir(path) if (path / n).is_file()}
    wanted = set()
    if "model" in parts:
        wanted.add(MODEL_FILE)
    if "ema" in parts:
        wanted.add(EMA_FILE)
    if "optimizer" in parts:
        wanted |= {f"{_OPTIMIZER}.json", f"{_OPTIMIZER}.safetensors"}
    if "train" in parts:
        wanted |= {f"{_TRAIN_STATE}.json", f"{_TRAIN_STATE}.safetensors"}
    data: dict[str, bytes] = {}
    if verify:
        for fname, entry in manifest["files"].items():
            b = _check_file(path, fname, entry, keep_bytes=fname in wanted)
            if b is not None:
                data[fname] = b
    else:
        for fname in sorted(wanted & listed):
            if (path / fname).is_file():
                data[fname] = read_bytes(path / fname, error=CheckpointError)
    if MODEL_FILE not in listed or ("model" in parts and MODEL_FILE not in data):
        raise _corrupt(path, f"{MODEL_FILE} is missing")
    step = manifest["step"] if manifest is not None else _step_of(path)
    if step is None:
        raise CheckpointError(f"cannot tell the step of checkpoint {path} (no {MANIFEST_NAME})")

    def tensors(fname):
        if fname not in data:
            return None
        return to_device(tensors_from_bytes(data.pop(fname), path / fname), map_location)

    def state(stem):
        js, st = f"{stem}.json", f"{stem}.safetensors"
        if js not in data and st not in data:
            return None
        if js not in data or st not in data:
            raise _corrupt(path, f"{js if js not in data else st} is missing")
        return state_from_bytes(data.pop(js), data.pop(st), path / js, path / st)

    model_state = tensors(MODEL_FILE) if "model" in parts else None
    return Checkpoint(step=step, path=path, model_state=model_state, ema_state=tensors(EMA_FILE),
                      optimizer_state=state(_OPTIMIZER), train_state=state(_TRAIN_STATE))


def load_checkpoint(path_or_run_dir, *, verify: bool = True, map_location="cpu",
                    parts: tuple[str, ...] = _PARTS_ALL, config: dict | None = None) -> Checkpoint:
    """Load a checkpoint directory, or the newest intact checkpoint of a run directory.

    With ``verify`` every file is checked against the manifest (size, SHA-256) as it is read; for a run
    directory, corrupt newer checkpoints are passed over and listed in ``Checkpoint.skipped``. Only
    safetensors and JSON are read; nothing is unpickled. ``parts`` (of "model", "ema", "optimizer",
    "train") says which states to decode; the others are still verified but not kept. ``config``: the run's
    config.json when the caller has read it already (``Run``), so that it is not read again.
    """
    where = locate(path_or_run_dir)
    if where.checkpoint is not None:
        ck = _load_dir(where.checkpoint, verify, map_location, parts)
        ck.run_dir = where.run_dir
        if ck.run_dir is not None:
            ck.config = config if config is not None else read_config(ck.run_dir)
        return ck
    p = where.run_dir
    config = config if config is not None else read_config(p)
    ck, skipped = _newest_intact(p, lambda c: _load_dir(c, verify, map_location, parts),
                                 f"{p} has no checkpoints yet ({p / CHECKPOINTS_DIR} holds none)")
    ck.run_dir, ck.config, ck.skipped = p, config, skipped
    return ck


# ============================================================================ states against a model


def strip_wrappers(state: Mapping[str, Any], expected: Mapping[str, Any]) -> Mapping[str, Any]:
    """Undo the key prefixes of DistributedDataParallel ("module.") and torch.compile ("_orig_mod.")."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_state_matches(state: Mapping[str, Any], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """CheckpointError naming the missing, unexpected and mis-shaped keys of ``state`` against ``expected``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__} "
        f"in the checkpoint, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape))
    ]
    problems = []

    def show(label, items):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{label} {', '.join(items[:5])}{more}")

    show(f"{len(missing)} missing key(s):", missing)
    show(f"{len(unexpected)} unexpected key(s):", unexpected)
    show(f"{len(shapes)} shape mismatch(es):", shapes)
    if problems:
        raise CheckpointError(f"{what} do not match the model its config describes (a different "
                              f"architecture?): " + "; ".join(problems))
