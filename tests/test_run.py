"""Tests of ddpmkit.run.Run: from any path a user hands in to the run's config, model, schedule and Denoiser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpmkit.diffusion import Denoiser, NoiseSchedule
from ddpmkit.errors import CheckpointError
from ddpmkit.models.unet import UNet
from ddpmkit.run import Run
from ddpmkit.store import load_checkpoint, prepare_run_dir, read_config, save_checkpoint, write_config

DATA = Path(__file__).parent / "data"
STEP = "step_000000003"


def make_run(tmp_path, name="run", config=None):
    run = tmp_path / name
    prepare_run_dir(run, resume=False)
    write_config(run, config or {"model": {}, "diffusion": {"schedule": "linear", "T": 10}})
    return run


def tiny_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g)}


def _full_save(run, step):
    return save_checkpoint(run, step, model_state=tiny_state(step), ema_state=tiny_state(step + 1000),
                           train_state={"step": step})


# ============================================================================ Run.open on every kind of path


def test_open_every_kind_of_path(tmp_path):
    run = make_run(tmp_path)
    ck = _full_save(run, 3)
    for path, checkpoint in [(run, None), (run / "checkpoints", None), (run / "config.json", None),
                             (ck, ck), (ck / "model.safetensors", ck), (ck / "manifest.json", ck),
                             (ck / "state.json", ck), (str(run), None)]:
        r = Run.open(path)
        assert r.dir == run and r.checkpoint_dir == checkpoint, path
        assert r.config == read_config(run) and r.config_path == run / "config.json"
    assert "step_000000003" in repr(Run.open(ck))


def test_open_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing does not exist"):
        Run.open(tmp_path / "missing")
    d = tmp_path / "random"
    d.mkdir()
    (d / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"random is not a ddpmkit run directory \(no config.json\)"):
        Run.open(d)
    with pytest.raises(CheckpointError, match=r"notes.txt is a file, not a ddpmkit run directory or checkpoint"):
        Run.open(d / "notes.txt")
    (d / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="is not a ddpmkit run directory"):
        Run.open(d / "checkpoints")  # a checkpoints folder of something that is not a run
    run = make_run(tmp_path)
    (run / "config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="does not hold a JSON object"):
        Run.open(run)


def test_not_a_run_dir(tmp_path):
    d = tmp_path / "random"
    d.mkdir()
    (d / "notes.txt").write_text("hi")
    for fn in (load_checkpoint, lambda p: Run.open(p).load_model(), lambda p: Run.open(p).schedule):
        with pytest.raises(CheckpointError, match=r"random is not a ddpmkit run directory \(no config.json\)"):
            fn(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a ddpmkit run directory"):
        read_config(d)
    run = make_run(tmp_path)
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        Run.open(run).load_model()


def test_settings_from_the_config(tmp_path):
    run = make_run(tmp_path, config={"model": {"in_channels": 3, "image_size": 16},
                                     "diffusion": {"schedule": "cosine", "T": 20, "objective": "v",
                                                   "variance": "large"}})
    r = Run.open(run)
    assert (r.objective, r.variance, r.image_shape) == ("v", "large", (3, 16, 16))
    assert isinstance(r.schedule, NoiseSchedule) and r.schedule.T == 20 and r.schedule.kind == "cosine"
    r = Run.open(make_run(tmp_path, "bare", {"diffusion": {"schedule": "linear", "T": 5}}))
    assert (r.objective, r.variance) == ("eps", "small")  # the defaults of runs that do not say
    with pytest.raises(CheckpointError, match="has no 'model' section"):
        _ = r.image_shape
    r = Run.open(make_run(tmp_path, "nodiff", {"model": {}}))
    with pytest.raises(CheckpointError, match="has no 'diffusion' section with 'schedule' and 'T'"):
        _ = r.schedule
    r = Run.open(make_run(tmp_path, "betas", {"diffusion": {"schedule": "imported", "T": 3,
                                                             "betas": [0.1, 0.2, 0.3]}}))
    assert r.schedule.T == 3 and torch.allclose(r.schedule.betas.double(), torch.tensor([0.1, 0.2, 0.3]).double())
    r = Run.open(make_run(tmp_path, "badbetas", {"diffusion": {"schedule": "imported", "T": 4, "betas": [0.1]}}))
    with pytest.raises(CheckpointError, match="bad diffusion settings: 1 betas for T=4"):
        _ = r.schedule


# ============================================================================ a run written by ddpmkit 0.1.0


def test_run_written_by_version_0_1_loads_and_samples():
    """tests/data/run_v0_1 was trained (3 steps) by ddpmkit 0.1.0 before the redesign; it still loads through
    Run from every kind of path, and the deterministic samplers reproduce 0.1.0's samples bit for bit."""
    root = DATA / "run_v0_1"
    run = Run.open(root)
    assert run.config["ddpmkit_version"] == "0.1.0" and run.checkpoint_dir is None
    for path in (root / "checkpoints", root / "config.json", root / "checkpoints" / STEP,
                 root / "checkpoints" / STEP / "ema.safetensors"):
        assert Run.open(path).dir == root
    assert (run.objective, run.variance, run.image_shape) == ("eps", "small", (1, 8, 8))
    assert run.schedule.T == 40 and run.schedule.kind == "linear"
    ema, raw = run.load_model(), run.load_model(ema=False)
    assert isinstance(ema, UNet) and not ema.training
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), raw.state_dict().values()))
    ck = run.checkpoint()
    assert ck.step == 3 and ck.optimizer_state is not None and ck.train_state is not None

    den = run.denoiser()
    assert isinstance(den, Denoiser)
    assert (den.objective, den.variance, den.clip_x0, den.T) == ("eps", "small", True, 40)
    assert run.denoiser(variance="large", clip_x0=False).variance == "large"

    from ddpmkit.samplers import sample

    # Run.denoiser puts the network in channels_last on the CPU, which moves the last float bits of a convolution;
    # bit for bit through load_model is test_generate's test_a_run_written_before_the_redesign_samples_as_it_did
    ref = load_file(DATA / "run_v0_1_samples.safetensors")
    x = sample(den, ref["x_T"], sampler="ddim", steps=10, eta=0.0)
    torch.testing.assert_close(x, ref["ddim10_eta0"], atol=1e-5, rtol=0)
    x = sample(run.denoiser(clip_x0=False), ref["x_T"], sampler="ddim", steps=7, spacing="quadratic")
    torch.testing.assert_close(x, ref["ddim7_quad_noclip"], atol=1e-4, rtol=1e-5)  # values up to 150, unclipped


# ============================================================================ models and schedules

TINY_UNET = dict(image_size=8, in_channels=1, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                 attention_resolutions=[4], dropout=0.0, num_groups=4, num_heads=1)


@pytest.fixture
def unet():
    """(UNet class, a small config, a config of another shape)."""
    return UNet, dict(TINY_UNET), {**TINY_UNET, "base_channels": 12}


def _run_with_model(tmp_path, unet, name="run", ema=True):
    cls, cfg, _ = unet
    run = make_run(tmp_path, name, {"model": cfg, "diffusion": {"schedule": "cosine", "T": 50}})
    torch.manual_seed(0)
    raw = cls.from_config(cfg)
    ema_model = cls.from_config(cfg)
    with torch.no_grad():
        for p in ema_model.parameters():
            p.add_(1.0)
    save_checkpoint(run, 3, model_state=raw.state_dict(), ema_state=ema_model.state_dict() if ema else None)
    return run, raw, ema_model


def test_load_model_ema_raw_and_fallback(tmp_path, unet):
    run, raw, ema_model = _run_with_model(tmp_path, unet)
    m = Run.open(run).load_model()
    assert not m.training and all(p.device.type == "cpu" for p in m.parameters())
    for a, b in zip(m.state_dict().values(), ema_model.state_dict().values()):
        assert torch.equal(a, b)
    m_raw = Run.open(run / "checkpoints" / "step_000000003").load_model(ema=False)
    for a, b in zip(m_raw.state_dict().values(), raw.state_dict().values()):
        assert torch.equal(a, b)
    run2, raw2, _ = _run_with_model(tmp_path, unet, "noema", ema=False)
    m2 = Run.open(run2).load_model(ema=True)  # no EMA saved -> the raw weights
    for a, b in zip(m2.state_dict().values(), raw2.state_dict().values()):
        assert torch.equal(a, b)


def test_load_model_wrong_architecture(tmp_path, unet):
    cls, _, other_cfg = unet
    run, _, _ = _run_with_model(tmp_path, unet)
    cfg = read_config(run)
    cfg["model"] = other_cfg
    write_config(run, cfg)
    with pytest.raises(CheckpointError, match="do not match the model .*shape mismatch"):
        Run.open(run).load_model()
    cfg["model"] = {"no_such_key": 1}
    write_config(run, cfg)
    with pytest.raises(CheckpointError, match="does not describe a valid U-Net"):
        Run.open(run).load_model()
    del cfg["model"]
    write_config(run, cfg)
    with pytest.raises(CheckpointError, match="has no 'model' section"):
        Run.open(run).load_model()


def test_load_model_strips_ddp_prefix_and_reports_missing_keys(tmp_path, unet):
    cls, cfg, _ = unet
    run = make_run(tmp_path, "ddp", {"model": cfg})
    model = cls.from_config(cfg)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(run, 1, model_state=sd)
    loaded = Run.open(run).load_model()
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    sd = dict(model.state_dict())
    sd.pop(next(iter(sd)))
    sd["extra.weight"] = torch.ones(1)
    save_checkpoint(run, 2, model_state=sd)
    with pytest.raises(CheckpointError, match="1 missing key.*1 unexpected key"):
        Run.open(run).load_model()


def test_schedule(tmp_path, unet):
    run, _, _ = _run_with_model(tmp_path, unet)
    for target in (run, run / "checkpoints" / "step_000000003"):
        s = Run.open(target).schedule
        assert s.T == 50 and s.kind == "cosine"
    cfg = read_config(run)
    cfg["diffusion"]["schedule"] = "quadratic"
    write_config(run, cfg)
    with pytest.raises(CheckpointError, match="bad diffusion settings"):
        _ = Run.open(run).schedule


def test_checkpoint_outside_a_run_has_no_config(tmp_path):
    run = make_run(tmp_path)
    p = _full_save(run, 1)
    (run / "config.json").unlink()
    c = load_checkpoint(p)
    assert c.config is None and c.run_dir is None
    with pytest.raises(CheckpointError, match="has no config.json"):
        Run.open(p).load_model()
