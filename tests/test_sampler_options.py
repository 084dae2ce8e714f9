"""Every sampler option's declared range is exactly what its sampler accepts, and it is checked when a request is
planned: before a network is loaded or a folder is made.

A value inside the range (its ends included) must run through the sampler itself and give finite samples; a value
outside it must be refused by the plan in one line. An integer option is tried at every value of its range; a real
one at its ends and its middle, and just beyond each end.
"""

import math

import pytest
import torch

from ddpmkit.cli import main
from ddpmkit.diffusion import Denoiser, NoiseSchedule
from ddpmkit.errors import ConfigError
from ddpmkit.generate import SampleOptions
from ddpmkit.samplers import SAMPLERS, plan, sample

T = 100


def _net(x, t):  # the exact noise predictor of Gaussian data N(0, 0.25 I): finite at every step
    a = SCHED.alpha_bar_at(t.double()).view(-1, 1, 1, 1)
    return ((1 - a).sqrt() * x.double() / (a * 0.25 + 1 - a)).to(x.dtype)


SCHED = NoiseSchedule.linear(T)
OPTIONS = [(name, o) for name in sorted(SAMPLERS) for o in SAMPLERS[name].options]


def _inside(o):
    if o.type is int:
        assert o.minimum is not None and o.maximum is not None, f"{o.name}: an integer option needs both ends"
        return list(range(int(o.minimum), int(o.maximum) + 1))
    lo, hi = o.minimum, o.maximum
    assert lo is not None and hi is not None, f"{o.name}: a real option needs both ends"
    return [lo, (lo + hi) / 2, hi]


def _outside(o):
    step = 1 if o.type is int else 1e-3 * max(1.0, abs(o.maximum - o.minimum))
    return [o.type(o.minimum - step), o.type(o.maximum + step)]


def test_every_sampler_with_options_is_covered():
    assert {name for name, _ in OPTIONS} >= {"ddim", "unipc"}


@pytest.mark.parametrize("name,option", OPTIONS, ids=[f"{n}-{o.name}" for n, o in OPTIONS])
def test_the_declared_range_is_what_the_sampler_accepts(name, option):
    den = Denoiser(_net, SCHED, clip_x0=False)
    for v in _inside(option):
        x = sample(den, (2, 1, 4, 4), sampler=name, steps=6, noise=0, **{option.name: v})
        assert torch.isfinite(x).all(), (name, option.name, v)
    for v in _outside(option):
        with pytest.raises(ValueError, match=option.name):
            plan(name, SCHED, 6, None, **{option.name: v})
        with pytest.raises(ConfigError, match=rf"^{option.name}\b") as refused:  # the library names the setting
            SampleOptions(sampler=name, steps=6, options={option.name: v}).plan(SCHED)
        assert refused.value.setting == option.name  # and the command line shows its flag (tested below)


def test_a_real_option_refuses_what_is_not_a_finite_number():
    for name, o in OPTIONS:
        if o.type is float:
            for bad in (math.nan, math.inf, "x"):
                with pytest.raises(ValueError):
                    plan(name, SCHED, 6, None, **{o.name: bad})


def test_an_option_out_of_range_is_refused_before_any_folder_is_made(tmp_path, capsys):
    from conftest import tiny_run

    run = tiny_run(tmp_path)
    out = tmp_path / "out" / "samples"
    assert main(["sample", str(run), "--sampler", "unipc", "--order", "4", "--n", "2", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--order" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in run.iterdir() if p.name == "samples") == []


def test_a_sampler_failing_midway_leaves_no_empty_folder(tmp_path, monkeypatch, capsys):
    from conftest import tiny_run

    from ddpmkit.samplers import registry

    run = tiny_run(tmp_path)
    info = registry.SAMPLERS["ddim"]

    def broken(*a, **k):
        raise ConfigError("the sampler failed")

    monkeypatch.setitem(registry.SAMPLERS, "ddim", info.__class__(**{**info.__dict__, "fn": broken}))
    assert main(["sample", str(run), "--sampler", "ddim", "--n", "2", "--quiet"]) == 2
    assert "the sampler failed" in capsys.readouterr().err
    assert not (run / "samples").exists()
