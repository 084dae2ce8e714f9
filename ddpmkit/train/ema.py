"""The exponential moving average of a network's weights."""

from __future__ import annotations

import torch

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of the parameters, with a warm-up of the decay.

    decay_t = min(decay, (1 + n) / (10 + n)) after n updates, so that the average of a short run is already
    usable (the average starts at the initial weights and forgets them quickly early on).
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))  # the warm-up above

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        params = dict(model.state_dict())
        keys = [k for k, v in self.shadow.items() if v.is_floating_point()]
        # shadow <- d shadow + (1 - d) theta
        torch._foreach_lerp_([self.shadow[k] for k in keys], [params[k].detach() for k in keys], 1.0 - d)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(params[k])
        self.num_updates += 1

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict, num_updates: int) -> None:
        for k, v in self.shadow.items():
            v.copy_(state[k].to(v.device, v.dtype))
        self.num_updates = int(num_updates)
