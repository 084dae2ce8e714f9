"""The checkpoint format: names, the manifest (size and SHA-256 of every file), verifying and listing.

A checkpoint is complete exactly when its directory is named ``step_N`` and its manifest matches its files
(see :mod:`ddpmkit.store.checkpoint` for the layout; :mod:`.saving` writes them).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..errors import CheckpointError
from ..files import fsync_dir, read_json, reason, sha256_file
from .rundir import CHECKPOINTS_DIR, require_dir

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "MANIFEST_VERSION", "MODEL_FILE", "EMA_FILE", "verify_checkpoint",
           "list_checkpoints", "latest_checkpoint"]

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
