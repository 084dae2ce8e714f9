"""NoiseSchedule against the papers' closed forms and figures."""

import math

import numpy as np
import pytest
import torch

from ddpmkit.diffusion import NoiseSchedule


def test_linear_endpoints_and_alpha_bar_figure():
    s = NoiseSchedule.linear(1000)
    assert s.T == 1000
    assert s.betas.dtype == torch.float32
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    # DDPM: alpha_bar at the last step of the linear schedule is about 4.04e-5
    assert s.alpha_bar[-1].item() == pytest.approx(4.04e-5, rel=5e-3)
    # equally spaced
    d = np.diff(s.betas.double().numpy())
    assert np.allclose(d, (0.02 - 1e-4) / 999, rtol=1e-4)


def test_linear_scaled_by_1000_over_T():
    s = NoiseSchedule.linear(250)
    assert s.betas[0].item() == pytest.approx(4e-4, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.08, rel=1e-6)
    with pytest.raises(ValueError):
        NoiseSchedule.linear(10)  # beta_T = 2 > 1
    with pytest.raises(ValueError, match="at least 21"):
        NoiseSchedule.linear(20)  # beta_T = 1: alpha_bar_T = 0, x0 no longer recoverable from eps
    assert NoiseSchedule.linear(21).alpha_bar[-1].item() > 0


def test_cosine_closed_form_and_max_beta_only_at_last_step():
    T, s_ = 1000, 0.008
    sch = NoiseSchedule.cosine(T)

    def f(t):
        return math.cos(((t / T + s_) / (1 + s_)) * math.pi / 2) ** 2

    # alpha_bar(t) = f(t) / f(0): the clipped last beta aside, the products reproduce it
    for t in [0, 1, 10, 100, 500, 900, 998]:
        assert sch.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)
    betas = sch.betas.double().numpy()
    assert betas[-1] == pytest.approx(0.999, rel=1e-6)
    assert np.all(betas[:-1] < 0.999)
    assert np.all(np.diff(betas) > 0)


def test_derived_arrays_against_the_paper():
    sch = NoiseSchedule.linear(1000)
    b = sch.betas.double()
    a = 1 - b
    ab = torch.cumprod(a, 0)
    abp = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    torch.testing.assert_close(sch.alphas.double(), a, rtol=1e-6, atol=0)
    torch.testing.assert_close(sch.alpha_bar.double(), ab, rtol=1e-5, atol=0)
    torch.testing.assert_close(sch.alpha_bar_prev.double(), abp, rtol=1e-5, atol=0)
    torch.testing.assert_close(sch.sqrt_alpha_bar.double() ** 2, ab, rtol=1e-5, atol=0)
    torch.testing.assert_close(sch.sqrt_one_minus_alpha_bar.double() ** 2, 1 - ab, rtol=1e-5, atol=0)
    # DDPM eq. 7
    bt = (1 - abp) / (1 - ab) * b
    torch.testing.assert_close(sch.posterior_variance.double(), bt, rtol=1e-5, atol=1e-12)
    assert sch.posterior_variance[0].item() == 0.0
    assert sch.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(bt[1].item()), rel=1e-6)
    torch.testing.assert_close(sch.posterior_log_variance_clipped[1:].double(), torch.log(bt[1:]), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(sch.posterior_mean_coef1.double(), abp.sqrt() * b / (1 - ab), rtol=1e-5, atol=0)
    torch.testing.assert_close(sch.posterior_mean_coef2.double(), a.sqrt() * (1 - abp) / (1 - ab), rtol=1e-5,
                               atol=0)
    for name in ["alphas", "alpha_bar", "posterior_variance", "sqrt_recip_alpha_bar", "log_betas"]:
        assert getattr(sch, name).dtype == torch.float32


def test_from_betas_and_errors():
    sch = NoiseSchedule.from_betas([0.1, 0.2, 0.3])
    assert sch.alpha_bar[-1].item() == pytest.approx(0.9 * 0.8 * 0.7, rel=1e-6)
    for bad in [[], [0.0, 0.1], [0.1, 1.5], [float("nan")]]:
        with pytest.raises(ValueError):
            NoiseSchedule.from_betas(bad)
    for bad_T in [0, -5, 2.5, True]:
        with pytest.raises(ValueError):
            NoiseSchedule.linear(bad_T)
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule.from_name("sigmoid", 100)


def test_to_device_keeps_values():
    sch = NoiseSchedule.cosine(100)
    moved = sch.to("cpu")
    assert moved.T == 100 and moved.kind == "cosine"
    assert torch.equal(moved.alpha_bar, sch.alpha_bar)
    if torch.cuda.is_available():
        assert sch.to("cuda").betas.is_cuda
