"""Run directories: config.json, and getting a directory ready for a new or resumed run.

Layout of a run directory (the trainer writes the rest)::

    RUN/config.json        the complete resolved configuration
    RUN/metrics.csv        RUN/samples/
    RUN/checkpoints/       one step_N directory per checkpoint (``ddpmkit.store.checkpoint``)
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from ..errors import CheckpointError
from ..files import atomic_write_json, read_json_object, reason

__all__ = ["CONFIG_NAME", "CHECKPOINTS_DIR", "require_dir", "read_config", "write_config", "prepare_run_dir"]

CONFIG_NAME = "config.json"
CHECKPOINTS_DIR = "checkpoints"


def require_dir(run_dir, what: str = "run directory") -> Path:
    """``run_dir`` as a Path; CheckpointError unless it is an existing directory."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"{what} {run_dir} does not exist")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory")
    return run_dir


def read_config(run_dir) -> dict:
    """The run's config.json as a dict; CheckpointError if it is missing or not valid JSON."""
    run_dir = require_dir(run_dir)
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a ddpmkit run directory (no {CONFIG_NAME})")
    return read_json_object(path, error=CheckpointError)


def write_config(run_dir, config: Mapping) -> Path:
    """Atomically write the run's config.json (sorted keys, indent 2)."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"the configuration must be a dict, got {type(config).__name__}")
    run_dir = require_dir(run_dir)
    return atomic_write_json(run_dir / CONFIG_NAME, dict(config), error=CheckpointError)


def _check_writable(directory: Path) -> None:
    probe = directory / f".ddpmkit-write-test-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write to run directory {directory}: {reason(e)}") from e


def prepare_run_dir(run_dir, *, resume: bool, config: dict | None = None) -> Path:
    """Get a run directory ready for training and return it.

    New run (``resume=False``): the directory must not exist or be empty; it is created (with parents)
    and checked to be writable. Nothing already there is touched. Resume: it must exist and be a run
    (have a valid config.json, read here unless the caller passes the ``config`` it read), and be writable.
    """
    run_dir = Path(run_dir)
    if resume:
        if not run_dir.exists():
            raise CheckpointError(f"cannot resume: {run_dir} does not exist")
        if not run_dir.is_dir():
            raise CheckpointError(f"cannot resume: {run_dir} is not a directory")
        if not (run_dir / CONFIG_NAME).is_file():
            raise CheckpointError(f"cannot resume: {run_dir} is not a ddpmkit run directory (no {CONFIG_NAME})")
        if config is None:
            read_config(run_dir)
        _check_writable(run_dir)
        return run_dir
    if run_dir.exists() or run_dir.is_symlink():
        if not run_dir.is_dir():
            raise CheckpointError(f"{run_dir} already exists and is not a directory; choose another --out")
        try:
            with os.scandir(run_dir) as it:
                nonempty = any(True for _ in it)
        except OSError as e:
            raise CheckpointError(f"cannot read {run_dir}: {reason(e)}") from e
        if nonempty:
            raise CheckpointError(f"{run_dir} already exists and is not empty; pass --resume to continue it "
                                  "or choose another --out")
    else:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create run directory {run_dir}: {reason(e)}") from e
    _check_writable(run_dir)
    return run_dir
