"""Saving checkpoints atomically and pruning old ones: never a half-written ``step_N`` where a good one was.

Every file is written in a hidden ``checkpoints/.tmp-step_N-<random>`` directory, the manifest last, and the
directory is renamed into place, so a crash at any moment leaves either the old set of checkpoints or the new one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import warnings
from pathlib import Path

from ..errors import CheckpointError
from ..files import atomic_write_bytes, atomic_write_json, reason
from .manifest import (_DEL_PREFIX, _OLD_RE, _OPTIMIZER, _TMP_PREFIX, _TRAIN_STATE, EMA_FILE, MANIFEST_FORMAT,
                       MANIFEST_NAME, MANIFEST_VERSION, MODEL_FILE, _fsync_dir, _is_intact, _step_name, _step_of,
                       list_checkpoints)
from .rundir import CHECKPOINTS_DIR, require_dir
from .state import safetensors_bytes, state_payload

__all__ = ["save_checkpoint", "prune_checkpoints"]

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
