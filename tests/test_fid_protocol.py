"""Issue 21, items 5 and 6: a run records the variance it was made for (cifar10: large), `eval fid` names its protocol
beside every FID and offers --protocol ddpm-paper, and the Inception file is hash-recorded and checked on a known
input."""

import json

import pytest
import torch

from conftest import tiny_run
from test_reliability import assert_one_line_error

from ddpmkit.cli import main
from ddpmkit.errors import DdpmkitError
from ddpmkit.metrics import fid, inception
from ddpmkit.metrics.frechet import FidError
from ddpmkit.run import Run
from ddpmkit.train import config_from_preset
from ddpmkit.train.config import preset_value


# ------------------------------------------------------------------------------------------------ 5. variance
def test_a_run_records_its_variance_and_sampling_defaults_to_it(tmp_path):
    assert preset_value("cifar10", "variance") == "large" and preset_value("digits", "variance") == "small"
    assert config_from_preset("cifar10").to_json()["diffusion"]["variance"] == "large"
    run = tiny_run(tmp_path, steps=1, variance="large")
    assert json.loads((run / "config.json").read_text())["diffusion"]["variance"] == "large"
    r = Run.open(run)
    assert r.variance == "large" and r.denoiser().variance == "large"
    assert r.denoiser(variance="small").variance == "small"  # a flag still overrides it
    from ddpmkit.metrics.nll import evaluate_nll

    res = evaluate_nll(run, n=2, batch_size=2)
    assert res["variance"] == "large"  # the bound too


def _fake_result(**kw):
    base = {"fid": 3.17, "n": 50_000, "features": "inception", "reference": "cifar10-train", "n_reference": 50_000,
            "sampler": "ddpm", "steps": 1000, "T": 1000, "spacing": "uniform", "options": {}, "variance": "large",
            "clip_x0": True, "ema": True, "guidance": None, "classes": None, "sample_seconds": 1.0,
            "score_seconds": 1.0}
    base.update(kw)
    base["protocol"], base["protocol_differences"] = fid.protocol_of(base)
    return base


def test_the_protocol_is_named_exactly():
    assert fid.protocol_of(_fake_result()) == ("ddpm-paper", [])
    name, diffs = fid.protocol_of(_fake_result(sampler="ddim", steps=50, options={"eta": 0.0}, n=1000))
    assert name == "custom" and diffs == ["ddim sampler", "50 steps of T = 1000", "1,000 samples"]
    assert fid.protocol_of(_fake_result(variance="small"))[1] == ["small variance"]
    assert fid.protocol_of(_fake_result(reference="cifar10-test"))[1] == ["reference cifar10-test"]


def test_every_fid_line_names_its_protocol(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake(run_dir, **kw):
        seen.update(kw)
        opt = kw["sample_options"]
        steps = 1000 if kw["protocol"] == "ddpm-paper" else (opt.steps or 50)  # evaluate_fid applies the protocol
        return _fake_result(sampler=opt.sampler, steps=steps, n=kw["n"],
                            options={"eta": 0.0} if opt.sampler == "ddim" else {})

    monkeypatch.setattr(fid, "evaluate_fid", fake)
    run = tiny_run(tmp_path, steps=1)
    assert main(["eval", "fid", str(run), "--n", "100"]) == 0
    out = capsys.readouterr().out
    assert "FID (inception features, protocol custom, not ddpm-paper: ddim sampler; 50 steps of T = 1000; 100 " \
           "samples): 3.170" in out
    assert main(["eval", "fid", str(run), "--protocol", "ddpm-paper"]) == 0
    assert "FID (inception features, protocol ddpm-paper): 3.170 for 50000 samples (ddpm, large variance, 1000 " \
           "steps" in capsys.readouterr().out
    assert seen["protocol"] == "ddpm-paper" and seen["sample_options"].sampler == "ddpm"


@pytest.fixture(scope="module")
def run1000(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("p"), steps=1, T=1000, sample_steps=5)


@pytest.mark.parametrize("flags,match", [
    (["--sampler", "ddim"], "contradicts --sampler ddim"),
    (["--steps", "100"], "contradicts --steps 100"),
    (["--n", "1000"], "contradicts --n 1000"),
    (["--variance", "small"], "contradicts --variance small"),
    (["--features", "digits"], "contradicts --features digits"),
    (["--no-ema"], "contradicts --no-ema"),
])
def test_a_flag_that_contradicts_the_protocol_is_one_line(run1000, tmp_path, capsys, flags, match):
    assert_one_line_error(["eval", "fid", str(run1000), "--protocol", "ddpm-paper", *flags], capsys, tmp_path, match)


def test_the_protocol_refuses_a_run_of_another_T(tmp_path, capsys):
    run = tiny_run(tmp_path, steps=1)  # T = 40
    assert_one_line_error(["eval", "fid", str(run), "--protocol", "ddpm-paper"], capsys, tmp_path,
                          "1000 ancestral steps of a T = 1000 process; this run has T = 40")


# ------------------------------------------------------------------------------------------------ 6. Inception
class _Net(torch.nn.Module):
    """The Inception interface with D features: mean colour per 8x8 cell, projected, made non-negative."""

    def __init__(self, dim: int = 2048, sign: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(48, dim, generator=g), requires_grad=False)
        self.sign = sign

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        y = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255.0, (4, 4)).flatten(1)
        return self.sign * torch.relu(y @ self.proj)


def _save(path, net):
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def test_the_hash_is_recorded_on_first_use_and_a_different_file_warned_about_loudly(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    a = _save(tmp_path / "a" / inception.INCEPTION_FILENAME, _Net())
    b = _save(tmp_path / "b.pt", _Net(seed=1))
    logs = []
    first = inception.InceptionFeatures(a, log=logs.append)
    assert first.hash_status == "recorded" and "first use" in logs[-1] and first.sha256 in logs[-1]
    record = json.loads((tmp_path / "cache" / inception.HASH_RECORD).read_text())
    assert record[inception.INCEPTION_FILENAME]["sha256"] == first.sha256
    assert inception.InceptionFeatures(a, log=logs.append).hash_status == "matches" and len(logs) == 1
    other = inception.InceptionFeatures(b, log=logs.append)
    assert other.hash_status == "differs"
    assert logs[-1].startswith("WARNING:") and "NOT comparable" in logs[-1] and first.sha256 in logs[-1] \
        and other.sha256 in logs[-1]
    # a pinned hash, were it known, would be enforced
    monkeypatch.setattr(inception, "INCEPTION_SHA256", first.sha256)
    assert inception.InceptionFeatures(a).hash_status == "pinned"
    with pytest.raises(FidError, match="not the published"):
        inception.InceptionFeatures(b)


@pytest.mark.parametrize("net,match", [
    (_Net(dim=16), r"features of shape \[2, 16\], expected \[2, 2048\]"),
    (_Net(sign=-1.0), "expected within"),  # negative features: not a pool after a ReLU
    (_Net(sign=1e6), "expected within"),  # a scaling off by orders of magnitude
    (_Net(sign=0.0), "the same features for two different images"),
])
def test_a_network_with_the_wrong_features_on_a_known_input_is_refused(tmp_path, monkeypatch, net, match):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    path = _save(tmp_path / "net.pt", net)
    with pytest.raises(FidError, match=match) as ei:
        inception.InceptionFeatures(path, log=lambda m: None)
    assert isinstance(ei.value, DdpmkitError) and "\n" not in str(ei.value)
    inception.check_features(torch.jit.load(str(_save(tmp_path / "ok.pt", _Net()))))  # the right interface passes
