"""UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework for fast sampling of diffusion models"):
the multistep predictor UniP and the corrector UniC in data-prediction form, with B(h) = e^h - 1 (the paper's B_2)."""

from __future__ import annotations

import math

import torch

from ._ode import Levels
from .registry import Option, register


def _coefficients(hh: float, order: int, rks: list[float]):
    """R (the powers of the r_k) and b of UniPC's linear system, for hh = -h (data prediction), B(h) = e^h - 1."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = math.expm1(hh)  # UniPC B_2(h) = e^h - 1
    rks_t = torch.tensor(rks, dtype=torch.float64)
    R, b, fact = [], [], 1
    for k in range(1, order + 1):
        R.append(rks_t ** (k - 1))
        # UniPC eq. (8)-(9): b_k = h phi_{k+1}(h) k! / B(h), phi by the recursion phi_{k+1} = (phi_k - 1/k!) / h
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return torch.stack(R), torch.tensor(b, dtype=torch.float64), h_phi_1, b_h


def _diffs(hist, lam_s0, h, m0, count):
    """r_k and D_k = (x0_{-k} - x0_0) / r_k for the ``count`` predictions before the newest one."""
    rks, ds = [], []
    for k in range(1, count + 1):
        mk, lam_k = hist[-(k + 1)]
        rk = (lam_k - lam_s0) / h
        rks.append(rk)
        ds.append((mk - m0) / rk)
    return rks, ds


@register("unipc", summary="UniPC, Zhao et al. 2023: multistep predictor-corrector, B(h) = e^h - 1",
          default_steps=10, default_spacing="logsnr", continuous=True,
          options=(Option("order", int, 2, "UniPC's order: 1, 2 or 3", minimum=1, maximum=3),))
def unipc(denoiser, x_T, timesteps, *, noise, callback=None, order: int = 2):
    """One network call per timestep. Each new prediction first corrects the step that led to it (UniC), then the
    predictor (UniP) takes the next step with up to ``order`` predictions; the orders warm up from 1 and fall to 1
    over the last steps, and the last step, to sigma = 0, returns x0_hat."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    lv = Levels(denoiser, timesteps)
    S = len(lv)
    x, hist, last = x_T, [], None  # hist: (x0_hat, lambda) newest last; last: (x before the step, its order)
    for i in range(S):
        m_t = denoiser(x, lv.t(i, x)).x0
        if last is not None:  # UniC: correct x_i with the prediction made at it
            x_prev, p = last
            m0, lam_s0 = hist[-1]
            h = lv.lam[i] - lam_s0
            rks, ds = _diffs(hist, lam_s0, h, m0, p - 1)
            R, b, h_phi_1, b_h = _coefficients(-h, p, rks + [1.0])
            rhos = torch.tensor([0.5], dtype=torch.float64) if p == 1 else torch.linalg.solve(R, b)
            corr = sum(float(rhos[k]) * ds[k] for k in range(p - 1)) if p > 1 else 0.0
            # UniC: x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) m_s - alpha_t B(h) (sum rho_k D_k + rho_p D_t)
            x = ((lv.sigma[i] / lv.sigma[i - 1]) * x_prev - (lv.alpha[i] * h_phi_1) * m0
                 - (lv.alpha[i] * b_h) * (corr + float(rhos[-1]) * (m_t - m0)))
        hist = (hist + [(m_t, lv.lam[i])])[-order:]
        if i == S - 1:
            x = m_t  # to sigma = 0: x0_hat
        else:
            p = min(order, S - i, len(hist))  # warm up from order 1, and lower the order over the last steps
            h = lv.lam[i + 1] - lv.lam[i]
            rks, ds = _diffs(hist, lv.lam[i], h, m_t, p - 1)
            R, b, h_phi_1, b_h = _coefficients(-h, p, rks + [1.0])
            if p == 1:
                pred = 0.0
            elif p == 2:
                pred = 0.5 * ds[0]
            else:
                rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1])
                pred = sum(float(rhos_p[k]) * ds[k] for k in range(p - 1))
            last = (x, p)
            # UniP: x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) m_s - alpha_t B(h) sum_k rho_k D_k
            x = (lv.sigma[i + 1] / lv.sigma[i]) * x - (lv.alpha[i + 1] * h_phi_1) * m_t - (lv.alpha[i + 1] * b_h) * pred
        if callback is not None:
            callback(i, lv.ts[i].item(), x, m_t)
    return x
