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

This module knows files and tensors, not networks: building a model from a checkpoint is ``ddpmkit.run``'s.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..files import atomic_write_bytes, atomic_write_json, fsync_dir, read_bytes, read_json, reason, sha256_file
from .rundir import CHECKPOINTS_DIR, CONFIG_NAME, read_config, require_dir
from .state import safetensors_bytes, state_from_bytes, state_payload, tensors_from_bytes, to_device

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

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ddpmkit-checkpoint"
MANIFEST_VERSION = 1

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
_OPTIMIZER = "optimizer"
_TRAIN_STATE = "state"

_STEP_RE = re.compile(r"^step_(\d{9,})$")
# A checkpoint moved aside while the same step is being re-saved: .old-step_N-<hex>.
_OLD_RE = re.compile(r"^\.old-(step_\d{9,})-[0-9a-f]+$")
_TMP_PREFIX = ".tmp-step_"
_DEL_PREFIX = ".del-step_"
_OLD_PREFIX = ".old-step_"


def _fsync_dir(directory: Path) -> None:
    fsync_dir(directory, error=CheckpointError)


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


def _step_name(step: int) -> str:
    return f"step_{step:09d}"


def _step_of(path: Path) -> int | None:
    name = Path(path).name
    m = _STEP_RE.match(name)
    if m:
        return int(m.group(1))
    m = _OLD_RE.match(name)
    if m:
        return int(m.group(1)[len("step_"):])
    return None


def _corrupt(path: Path, msg: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupt: {msg}")


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise _corrupt(path, f"{MANIFEST_NAME} is missing (the save did not finish)")
    try:
        m = read_json(mpath, error=CheckpointError)
    except CheckpointError as e:
        raise _corrupt(path, f"{MANIFEST_NAME} is unreadable ({e})") from e
    if type(m) is not dict or m.get("format") != MANIFEST_FORMAT:
        raise _corrupt(path, f"{MANIFEST_NAME} is not a ddpmkit checkpoint manifest")
    version = m.get("version")
    if type(version) is not int:
        raise _corrupt(path, f"{MANIFEST_NAME} has no format version")
    if version > MANIFEST_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than this ddpmkit "
                              f"reads ({MANIFEST_VERSION}); upgrade ddpmkit")
    step, files = m.get("step"), m.get("files")
    if type(step) is not int or step < 0:
        raise _corrupt(path, f"{MANIFEST_NAME} has no valid step")
    named = _step_of(path)
    if named is not None and named != step:
        raise _corrupt(path, f"{MANIFEST_NAME} says step {step} but the directory is for step {named}")
    if type(files) is not dict or MODEL_FILE not in files:
        raise _corrupt(path, f"{MANIFEST_NAME} does not list {MODEL_FILE}")
    for fname, entry in files.items():
        if (fname in ("", ".", "..", MANIFEST_NAME) or fname != Path(fname).name or "/" in fname
                or "\\" in fname):
            raise _corrupt(path, f"{MANIFEST_NAME} lists a bad file name {fname!r}")
        if (type(entry) is not dict or type(entry.get("bytes")) is not int or entry["bytes"] < 0
                or type(entry.get("sha256")) is not str or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise _corrupt(path, f"{MANIFEST_NAME} has a bad entry for {fname}")
    return m


def _check_file(path: Path, fname: str, entry: dict, keep_bytes: bool) -> bytes | None:
    """Check one file against its manifest entry; return its bytes when ``keep_bytes`` (read only once)."""
    fpath = path / fname
    try:
        size = os.stat(fpath).st_size
    except FileNotFoundError:
        raise _corrupt(path, f"{fname} is missing") from None
    except OSError as e:
        raise CheckpointError(f"could not read {fpath}: {reason(e)}") from e
    if size < entry["bytes"]:
        raise _corrupt(path, f"{fname} is truncated ({size} of {entry['bytes']} bytes)")
    if size > entry["bytes"]:
        raise _corrupt(path, f"{fname} has the wrong size ({size} bytes, the manifest says {entry['bytes']})")
    data = None
    try:
        if keep_bytes:
            data = fpath.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = sha256_file(fpath, error=CheckpointError)
    except OSError as e:
        raise CheckpointError(f"could not read {fpath}: {reason(e)}") from e
    if digest != entry["sha256"]:
        raise _corrupt(path, f"{fname} has the wrong SHA-256 (the file was changed or damaged)")
    return data


def verify_checkpoint(path) -> None:
    """Raise CheckpointError unless ``path`` is a complete checkpoint whose files match its manifest
    (present, of the recorded size, with the recorded SHA-256)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"{path} is not a checkpoint directory")
    manifest = _read_manifest(path)
    for fname, entry in manifest["files"].items():
        _check_file(path, fname, entry, keep_bytes=False)


def _is_intact(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def list_checkpoints(run_dir) -> list[Path]:
    """The checkpoint directories of a run, oldest first (by step), whether intact or not.

    Hidden work directories are ignored, except that a checkpoint moved aside during a same-step re-save
    that was interrupted (``.old-step_N-*`` with no ``step_N``) is listed in its place, so it is not lost.
    """
    run_dir = require_dir(run_dir)
    ckdir = run_dir / CHECKPOINTS_DIR
    if not ckdir.is_dir():
        return []
    try:
        names = os.listdir(ckdir)
    except OSError as e:
        raise CheckpointError(f"could not list {ckdir}: {reason(e)}") from e
    found: dict[int, Path] = {}
    orphans: dict[int, Path] = {}
    for name in sorted(names):
        p = ckdir / name
        if not p.is_dir():
            continue
        if _STEP_RE.match(name):
            found[_step_of(p)] = p
        elif _OLD_RE.match(name):
            orphans.setdefault(_step_of(p), p)
    for step, p in orphans.items():
        found.setdefault(step, p)
    return [found[s] for s in sorted(found)]


def latest_checkpoint(run_dir, verify: bool = True) -> tuple[Path, list[Path]]:
    """The newest intact checkpoint of a run and the newer, corrupt ones that were skipped (newest first).

    ``verify_checkpoint(p)`` says why a skipped one is corrupt. CheckpointError when there is none.
    """
    run_dir = require_dir(run_dir)
    if not verify:
        candidates = list_checkpoints(run_dir)
        if not candidates:
            raise CheckpointError(f"{run_dir} has no checkpoints")
        return candidates[-1], []
    return _newest_intact(run_dir, verify_checkpoint, f"{run_dir} has no checkpoints")


def _newest_intact(run_dir: Path, open_one, none_msg: str):
    """``(open_one(p), skipped)`` for the newest checkpoint p of the run that ``open_one`` accepts, passing over
    (newest first) those it refuses with a CheckpointError; a CheckpointError naming every reason when none is."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(none_msg)
    skipped: list[Path] = []
    reasons: list[str] = []
    for p in reversed(candidates):
        try:
            opened = open_one(p)
        except CheckpointError as e:
            skipped.append(p)
            reasons.append(str(e))
            continue
        return (p if opened is None else opened), skipped
    raise CheckpointError(f"{run_dir} has no intact checkpoint: " + "; ".join(reasons))


def _remove_tree(path: Path) -> None:
    """Delete a directory without ever leaving a half-deleted ``step_N``: rename it hidden, then delete."""
    target = path
    if not path.name.startswith("."):
        target = path.parent / f"{_DEL_PREFIX}{path.name[len('step_'):]}-{secrets.token_hex(4)}"
        os.rename(path, target)
    shutil.rmtree(target)


def prune_checkpoints(run_dir, keep: int, *, _known_intact: Path | None = None) -> list[Path]:
    """Keep the newest ``keep`` intact checkpoints; delete every checkpoint older than the oldest of them,
    and leftover hidden work directories. Corrupt checkpoints newer than that are left for inspection.
    With fewer than ``keep`` intact checkpoints, no checkpoint is deleted. Returns what was deleted.

    Not safe while another process is saving into the same run directory.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    run_dir = require_dir(run_dir)
    ckdir = run_dir / CHECKPOINTS_DIR
    if not ckdir.is_dir():
        return []
    deleted: list[Path] = []
    # 1. Hidden work directories: unfinished saves and deletions go; a moved-aside checkpoint is
    #    deleted when its replacement is in place, and put back when it is not.
    for name in sorted(os.listdir(ckdir)):
        p = ckdir / name
        if name.startswith(_TMP_PREFIX) or name.startswith(_DEL_PREFIX):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            deleted.append(p)
        elif _OLD_RE.match(name) and p.is_dir():
            canonical = ckdir / _OLD_RE.match(name).group(1)
            if canonical.exists():
                shutil.rmtree(p, ignore_errors=True)
                deleted.append(p)
            else:
                os.rename(p, canonical)
                _fsync_dir(ckdir)
    # 2. Old checkpoints.
    candidates = list_checkpoints(run_dir)
    intact = 0
    cutoff = None
    for p in reversed(candidates):
        if (_known_intact is not None and p == _known_intact) or _is_intact(p):
            intact += 1
            if intact == keep:
                cutoff = _step_of(p)
                break
    if cutoff is None:
        return deleted
    for p in candidates:
        if _step_of(p) < cutoff:
            _remove_tree(p)
            deleted.append(p)
    _fsync_dir(ckdir)
    return deleted


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` directory to ``final``, replacing an existing ``final`` safely."""
    ckdir = final.parent
    if os.path.lexists(final):
        aside = ckdir / f".old-{final.name}-{secrets.token_hex(4)}"
        os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except OSError:
            try:
                os.rename(aside, final)
            except OSError:
                pass  # list_checkpoints still finds it under its .old- name
            raise
        _fsync_dir(ckdir)
        shutil.rmtree(aside, ignore_errors=True)  # leftovers are removed by the next prune
    else:
        os.rename(tmp, final)
    _fsync_dir(ckdir)


def save_checkpoint(run_dir, step: int, *, model_state, ema_state=None, optimizer_state=None,
                    train_state=None, keep: int | None = 3) -> Path:
    """Save a checkpoint as ``run_dir/checkpoints/step_{step:09d}`` and return its path.

    ``model_state`` and ``ema_state`` are flat state_dicts (str -> tensor), stored as safetensors.
    ``optimizer_state`` (e.g. ``optimizer.state_dict()``) and ``train_state`` (RNG states, data order,
    counters...) are nested states stored with ``save_state``. Every file is written and fsynced in a
    hidden temporary directory, ``manifest.json`` (sizes and SHA-256) last, and the directory is then
    renamed into place; a checkpoint already saved for the same step is replaced only once the new one is
    complete. Then the newest ``keep`` intact checkpoints are kept and older ones deleted (``keep=None``:
    keep all). On failure the temporary directory is removed, earlier checkpoints are untouched, and a
    CheckpointError says what went wrong.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an integer >= 1 or None, got {keep!r}")
    run_dir = require_dir(run_dir)
    ckdir = run_dir / CHECKPOINTS_DIR
    name = _step_name(step)
    final = ckdir / name
    try:
        if not ckdir.is_dir():
            ckdir.mkdir(exist_ok=True)
            _fsync_dir(run_dir)
    except OSError as e:
        raise CheckpointError(f"could not create {ckdir}: {reason(e)}") from e

    tmp = ckdir / f".tmp-{name}-{secrets.token_hex(4)}"
    files: dict[str, dict] = {}

    def put(fname: str, data: bytes) -> None:
        atomic_write_bytes(tmp / fname, data, error=CheckpointError)
        files[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    try:
        tmp.mkdir()
        # One file at a time, so that at most one file's bytes are held in memory.
        put(MODEL_FILE, safetensors_bytes(model_state, "the model state", {"format": "pt"}))
        if ema_state is not None:
            put(EMA_FILE, safetensors_bytes(ema_state, "the EMA state", {"format": "pt"}))
        for stem, tree, what in ((_OPTIMIZER, optimizer_state, "the optimizer state"),
                                 (_TRAIN_STATE, train_state, "the training state")):
            if tree is not None:
                st, js = state_payload(tree, stem, what)
                put(f"{stem}.safetensors", st)
                del st
                put(f"{stem}.json", js)
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "files": files}
        atomic_write_json(tmp / MANIFEST_NAME, manifest, error=CheckpointError)
        _publish(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (CheckpointError, OSError)):
            raise CheckpointError(f"could not save the checkpoint of step {step} in {ckdir}: "
                                  f"{reason(e)} (earlier checkpoints are untouched)") from e
        raise

    if keep is not None:
        try:
            prune_checkpoints(run_dir, keep, _known_intact=final)
        except (OSError, CheckpointError) as e:  # the checkpoint itself is saved; pruning is housekeeping
            warnings.warn(f"could not prune old checkpoints in {ckdir}: {reason(e)}", RuntimeWarning,
                          stacklevel=2)
    return final


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
                    parts: tuple[str, ...] = _PARTS_ALL) -> Checkpoint:
    """Load a checkpoint directory, or the newest intact checkpoint of a run directory.

    With ``verify`` every file is checked against the manifest (size, SHA-256) as it is read; for a run
    directory, corrupt newer checkpoints are passed over and listed in ``Checkpoint.skipped``. Only
    safetensors and JSON are read; nothing is unpickled. ``parts`` (of "model", "ema", "optimizer",
    "train") says which states to decode; the others are still verified but not kept.
    """
    where = locate(path_or_run_dir)
    if where.checkpoint is not None:
        ck = _load_dir(where.checkpoint, verify, map_location, parts)
        ck.run_dir = where.run_dir
        ck.config = read_config(ck.run_dir) if ck.run_dir is not None else None
        return ck
    p = where.run_dir
    config = read_config(p)
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
