"""Resuming a run: its settings resolved once from config.json and the command's overrides, locked ones checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError
from ..store.rundir import CONFIG_NAME, read_config
from .config import TrainConfig, config_from_preset, resume_locked

__all__ = ["Resolved", "resolve_run", "resolve_config", "check_locked"]


class Resolved(NamedTuple):
    """A training request resolved once: its settings, and the run's config.json as read (None for a new run), which
    the loop takes instead of reading the file again."""

    cfg: TrainConfig
    stored: dict | None


def resolve_config(preset: str, overrides: dict, out, resume: bool) -> TrainConfig:
    """The settings of ``ddpmkit train`` (see :func:`resolve_run`)."""
    return resolve_run(preset, overrides, out, resume).cfg


def resolve_run(preset: str, overrides: dict, out, resume: bool) -> Resolved:
    """The settings of ``ddpmkit train``: a new run's are ``preset`` with ``overrides``; a resumed run's are its
    config.json (read here, once) with ``overrides`` on top, refused when they change a locked setting."""
    out = Path(out)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not (resume and (out / CONFIG_NAME).is_file()):
        return Resolved(config_from_preset(preset, **overrides), None)
    stored_json = read_config(out)
    stored = TrainConfig.from_json(stored_json)
    base = dataclasses.asdict(stored)
    base.update(overrides)
    base.pop("preset", None)
    cfg = config_from_preset(stored.preset, **base)
    check_locked(cfg, stored, out)
    return Resolved(cfg, stored_json)


def check_locked(cfg: TrainConfig, stored: TrainConfig | dict, run_dir) -> None:
    """ConfigError naming every locked setting (architecture, T, schedule, objective, data...) whose value in
    ``cfg`` differs from the run's stored one (a TrainConfig, or the config.json it came from)."""
    if not isinstance(stored, TrainConfig):
        stored = TrainConfig.from_json(stored)
    changed = [k for k in resume_locked() if getattr(stored, k) != getattr(cfg, k)]
    if changed:
        raise ConfigError(
            "cannot resume with a changed " + ", ".join(changed) + f" (the run in {run_dir} has "
            + ", ".join(f"{k}={getattr(stored, k)!r}" for k in changed) + ")")
