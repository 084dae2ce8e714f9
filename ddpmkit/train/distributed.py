"""Multi-process training under ``torchrun``: the process group and the few collectives the loop needs.

``torchrun`` sets WORLD_SIZE, RANK and LOCAL_RANK in each worker's environment. With more than one worker,
:func:`join` joins the process group (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo elsewhere) and
leaves it at the end, also on an error. Outside ``torchrun`` (or with one worker) nothing is started and every
helper here is a cheap no-op, so the single-process path is unchanged.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError, DdpmkitError

__all__ = ["DistContext", "env_world_size", "join", "leave", "current"]


@dataclass
class DistContext:
    """Where this process stands: its rank, the world size, and its local rank on the machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """In-place all-reduce (sum by default) of a tensor; a no-op on one process."""
        if self.enabled:
            dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM)
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """The concatenation, in rank order, of every rank's equally shaped ``tensor``."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool, device) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def max_int(self, value: int, device) -> int:
        """The largest of every rank's ``value`` (the value itself on one process)."""
        if not self.enabled:
            return int(value)
        t = torch.tensor([float(value)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def main_first(self, fn, device=None):
        """Run ``fn`` on rank 0, then (if it succeeded) on the other ranks; an error on rank 0 is raised on all.

        For work that must not race (creating the run directory, downloading data) and whose failure on
        rank 0 would otherwise leave the other ranks waiting forever at the next collective.
        """
        if not self.enabled:
            return fn()
        msg = [None]
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
                msg[0] = str(e).splitlines()[0] if str(e) else type(e).__name__
                _broadcast_message(msg)
                raise
            _broadcast_message(msg)
            return result
        _broadcast_message(msg)
        if msg[0] is not None:
            raise DdpmkitError(f"rank 0 failed: {msg[0]}")
        return fn()


def _broadcast_message(msg: list) -> None:
    dist.broadcast_object_list(msg, src=0)


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 outside it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


_CURRENT = DistContext()


def current() -> DistContext:
    """The context of the process group this process has joined (rank 0 of 1 when none)."""
    if dist.is_available() and dist.is_initialized():
        if _CURRENT.enabled:
            return _CURRENT
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0))
    return DistContext()


_OWNED = False  # whether this module started the process group (and so ends it)


def join(device: torch.device) -> DistContext:
    """Join the torchrun process group if this process runs under torchrun with more than one worker.

    NCCL on CUDA (this rank on ``cuda:LOCAL_RANK``), gloo elsewhere. A group someone else started is used
    as it is. Returns the context (rank 0 of 1 outside torchrun); :func:`leave` ends what this started.
    """
    global _CURRENT, _OWNED
    if not dist.is_available():
        return DistContext()
    if dist.is_initialized():
        _CURRENT = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                               local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0))
        return _CURRENT
    world = env_world_size()
    if world <= 1:
        return DistContext()
    try:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE is set but RANK is missing or invalid: launch with torchrun") from None
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank}, but only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    _OWNED = True
    _CURRENT = DistContext(rank=rank, world_size=world, local_rank=local_rank)
    return _CURRENT


def leave() -> None:
    """End the process group if :func:`join` started it (also safe to call twice, or after an error)."""
    global _CURRENT, _OWNED
    if _OWNED:
        _OWNED = False
        _CURRENT = DistContext()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
