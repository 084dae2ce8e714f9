"""What the ODE samplers share: the noise levels of their timesteps, and a batch of one timestep for the network.

Timesteps may be integers or real-valued (``timesteps(..., integer=False)``); alpha_bar at a real-valued t is the
schedule's interpolation (``NoiseSchedule.alpha_bar_at``). Every level is in float64.
"""

from __future__ import annotations

import numpy as np
import torch


class Levels:
    """alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma) and the EDM noise level
    sigma / alpha at each timestep, noisiest first, with one more level at the end for the clean image
    (alpha = 1, sigma = 0, lambda = +inf)."""

    def __init__(self, denoiser, timesteps):
        ts = np.asarray(timesteps)[::-1].copy()  # the noisiest first
        self.ts = ts
        ab = denoiser.schedule.alpha_bar_at(torch.from_numpy(ts)).cpu().numpy()
        self.alpha = np.append(np.sqrt(ab), 1.0)
        self.sigma = np.append(np.sqrt(1.0 - ab), 0.0)
        with np.errstate(divide="ignore"):
            self.lam = np.log(self.alpha) - np.log(self.sigma)
        self.edm_sigma = self.sigma / self.alpha  # EDM's sigma = sqrt((1 - alpha_bar) / alpha_bar)

    def __len__(self) -> int:
        return len(self.ts)

    def t(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Timestep i (noisiest first) as a batch for x: long for integer timesteps, float64 for real ones."""
        t = self.ts[i]
        if np.issubdtype(self.ts.dtype, np.integer):
            return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        return torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
