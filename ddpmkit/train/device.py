"""Where a run trains: the device it picks, and what the machine was, for config.json."""

from __future__ import annotations

import os
import platform

import torch

from ..errors import ConfigError

__all__ = ["pick_device", "describe_machine", "autocast_dtype"]


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; or the named device, checked to exist."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for, but MPS is not available")
    return dev


def describe_machine(device: torch.device, world_size: int = 1) -> dict:
    """What a run trained on, for config.json's ``machine`` section (the report shows it): the device, its name,
    the number of processes and the PyTorch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine() or 'CPU'}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
    return {"device": device.type, "name": name, "processes": int(world_size), "torch": torch.__version__}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision``: bf16 when asked, or on CUDA with ``auto``; None: fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
