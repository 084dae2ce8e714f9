"""Resuming a run: its settings resolved once from config.json and the command's overrides, locked ones checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError
from ..store.rundir import CONFIG_NAME, read_config
from .config import TrainConfig, config_from_preset
from .settings import locked_settings

__all__ = ["Resolved", "resolve_run", "resolve_config", "resolve_settings", "check_locked"]


class Resolved(NamedTuple):
    """A training request resolved once: its settings, and the run's config.json as read (None for a new run), which
    the loop takes instead of reading the file again."""

    cfg: TrainConfig  # or another settings class (resolve_settings)
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
    check_kind(TrainConfig, stored_json, out)
    stored = TrainConfig.from_json(stored_json)
    base = dataclasses.asdict(stored)
    base.update(overrides)
    base.pop("preset", None)
    cfg = config_from_preset(stored.preset, **base)
    check_locked(cfg, stored, out)
    return Resolved(cfg, stored_json)


def resolve_settings(cls, overrides: dict, out, resume: bool) -> Resolved:
    """:func:`resolve_run` for a settings class without presets (``AutoencoderConfig``): a new run's settings are
    the class's defaults with ``overrides``; a resumed run's are its config.json with ``overrides`` on top."""
    out = Path(out)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not (resume and (out / CONFIG_NAME).is_file()):
        return Resolved(cls(**overrides), None)
    stored_json = read_config(out)
    check_kind(cls, stored_json, out)
    stored = cls.from_json(stored_json)
    cfg = dataclasses.replace(stored, **overrides)
    check_locked(cfg, stored, out)
    return Resolved(cfg, stored_json)


def check_kind(cls, stored_json: dict, run_dir) -> None:
    """ConfigError when the run's config.json is of another kind than settings class ``cls`` trains (an autoencoder
    run resumed by ``ddpmkit train``, or the reverse)."""
    kind = stored_json.get("kind", "diffusion") if isinstance(stored_json, dict) else None
    want = "diffusion" if issubclass(cls, TrainConfig) else "autoencoder"  # a distillation's student is one too
    if kind in ("diffusion", "autoencoder") and kind != want:
        command = "ddpmkit train" if kind == "diffusion" else "ddpmkit autoencoder train"
        raise ConfigError(f"{run_dir} is {'an' if kind == 'autoencoder' else 'a'} {kind} run: resume it with "
                          f"`{command} --out {run_dir} --resume`")


def check_locked(cfg, stored, run_dir) -> None:
    """ConfigError naming every locked setting (architecture, T, schedule, objective, data...) whose value in
    ``cfg`` differs from the run's stored one (settings of the same class, or the config.json they came from)."""
    cls = type(cfg)
    if not isinstance(stored, cls):
        check_kind(cls, stored, run_dir)
        stored = cls.from_json(stored)
    changed = [k for k in locked_settings(cls) if getattr(stored, k) != getattr(cfg, k)]
    if changed:
        raise ConfigError(
            "cannot resume with a changed " + ", ".join(changed) + f" (the run in {run_dir} has "
            + ", ".join(f"{k}={getattr(stored, k)!r}" for k in changed) + ")")
