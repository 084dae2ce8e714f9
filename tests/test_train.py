"""Training, checkpoints, exact resume, and sampling from a run, on a tiny configuration."""

import json
import math

import pytest
import torch
from conftest import tiny_cfg, tiny_flags, tiny_run

from ddpmkit.cli import main
from ddpmkit.errors import ConfigError
from ddpmkit.run import Run
from ddpmkit.store.checkpoint import list_checkpoints, load_checkpoint
from ddpmkit.train import EMA, Trainer, config_from_preset
from ddpmkit.train.loop import make_adam

TINY = tiny_flags(log_every=2, num_samples=4)
FUSED_ADAM_ON_CPU = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)  # torch has it since 2.4


def test_resume_is_bit_exact(tmp_path):
    # N steps straight against k steps, a resume, and N - k more: identical weights, EMA and optimizer state.
    # Dropout is on so that the global random state must be restored too; the sample grid drawn at the end
    # of the first part must not disturb it.
    straight = tmp_path / "straight"
    Trainer(tiny_cfg(steps=6, num_samples=4, checkpoint_every=3), straight, quiet=True).run()
    split = tmp_path / "split"
    Trainer(tiny_cfg(steps=4, num_samples=4, checkpoint_every=3), split, quiet=True).run()
    Trainer(tiny_cfg(steps=6, num_samples=4, checkpoint_every=3), split, resume=True, quiet=True).run()
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a.step == b.step == 6
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k
        assert torch.equal(a.ema_state[k], b.ema_state[k]), k
    for i, st in a.optimizer_state["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b.optimizer_state["state"][i][name]), (i, name)
    # and the weights actually moved, so the comparison is not vacuous
    c = Trainer(tiny_cfg(steps=1), tmp_path / "one", quiet=True)
    c.run()
    k0 = next(k for k in a.model_state if k.endswith("conv_in.weight"))
    assert not torch.equal(load_checkpoint(tmp_path / "one").model_state[k0], a.model_state[k0])


def _unfused_adam(params, **kw):
    return torch.optim.Adam(params, fused=None, foreach=False, **kw)


def test_the_loops_adam_is_fused_and_makes_torchs_default_update():
    # make_adam: the fused kernel where this torch has one for the device, the same update as the per-tensor
    # loop up to float rounding, over many steps with every coefficient in play (betas, weight decay)
    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))

    torch.manual_seed(0)
    net, ref, start = mlp(), mlp(), mlp()
    ref.load_state_dict(net.state_dict())
    start.load_state_dict(net.state_dict())
    kw = dict(lr=3e-2, betas=(0.8, 0.95), weight_decay=1e-2)
    opt, ref_opt = make_adam(net.parameters(), **kw), _unfused_adam(ref.parameters(), **kw)
    if FUSED_ADAM_ON_CPU:
        assert opt.param_groups[0]["fused"] is True
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        x, y = torch.randn(32, 6, generator=gen), torch.randn(32, 3, generator=gen)
        for m, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()

    def gap(a, b):
        return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))

    assert gap(net, ref) < 1e-5
    assert gap(net, start) > 0.1  # the weights moved, so the comparison is not vacuous


def test_a_run_begun_with_the_unfused_adam_resumes_with_it_bit_exactly(tmp_path, monkeypatch):
    # a run begun before the loop's Adam was fused keeps the implementation its optimizer state records: its resume
    # equals a straight unfused run bit for bit (the fused kernel rounds differently and would not)
    from ddpmkit.train import loop

    monkeypatch.setattr(loop, "make_adam", _unfused_adam)
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(tiny_cfg(steps=6, num_samples=4, checkpoint_every=3), straight, quiet=True).run()
    Trainer(tiny_cfg(steps=3, num_samples=4, checkpoint_every=3), split, quiet=True).run()
    monkeypatch.undo()
    resumed = Trainer(tiny_cfg(steps=6, num_samples=4, checkpoint_every=3), split, resume=True, quiet=True)
    assert not resumed.optimizer.param_groups[0]["fused"]
    resumed.run()
    a, b = load_checkpoint(straight), load_checkpoint(split)
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k
    if FUSED_ADAM_ON_CPU:  # while a new run's is fused
        assert Trainer(tiny_cfg(steps=1), tmp_path / "fresh", quiet=True).optimizer.param_groups[0]["fused"]


def test_run_directory_contents(tmp_path):
    run = tmp_path / "run"
    res = Trainer(tiny_cfg(steps=6, sample_every=4, keep=2, num_samples=4, checkpoint_every=3), run,
                  quiet=True).run()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["base_channels"] == 8 and cfg["diffusion"] == {"schedule": "linear", "T": 40,
                                                                     "objective": "eps", "variance": "small"}
    assert cfg["train"]["steps"] == 6 and cfg["train"]["seed"] == 0
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss,lr,grad_norm,img_per_s,wall_s")
    assert [int(r.split(",")[0]) for r in lines[1:]] == [2, 4, 6]
    assert all(math.isfinite(float(r.split(",")[1])) for r in lines[1:])
    # checkpoints every 3 steps and at the end, the last 2 kept
    assert [p.name for p in list_checkpoints(run)] == ["step_000000003", "step_000000006"]
    ck = res["checkpoint"]
    for f in ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.safetensors",
              "manifest.json"]:
        assert (ck / f).is_file(), f
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["grid_step_000000004.png",
                                                                   "grid_step_000000006.png"]
    # warm-up: lr grows linearly over the first `warmup` steps
    lrs = [float(r.split(",")[2]) for r in lines[1:]]
    assert lrs == pytest.approx([1e-3 * 2 / 100, 1e-3 * 4 / 100, 1e-3 * 6 / 100])


def test_ema_warmup_formula():
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.999, warmup=True)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # decay_0 = min(0.999, 1/10) = 0.1: shadow = 0.1 * 0 + 0.9 * 1
    assert ema.shadow["weight"].item() == pytest.approx(0.9)
    ema.update(m)  # decay_1 = 2/11
    assert ema.shadow["weight"].item() == pytest.approx(2 / 11 * 0.9 + 9 / 11)
    ema.num_updates = 10 ** 6
    assert ema.current_decay() == 0.999


def test_resume_refuses_changed_architecture(tmp_path):
    run = tiny_run(tmp_path, steps=1)
    with pytest.raises(ConfigError, match="base_channels"):
        Trainer(tiny_cfg(steps=2, base_channels=12), run, resume=True, quiet=True)
    # a changed step count is safe
    Trainer(tiny_cfg(steps=2), run, resume=True, quiet=True).run()
    assert load_checkpoint(run).step == 2


def test_cli_train_sample_resume_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "4", "--checkpoint-every", "2", "--schedule", "cosine"]
                + TINY) == 0
    assert main(["train", "--out", str(run), "--steps", "6", "--resume", "--quiet"]) == 0
    assert load_checkpoint(run).step == 6
    capsys.readouterr()
    # a resume to fewer steps than the run has: said so, nothing trained, no NaN loss printed
    assert main(["train", "--out", str(run), "--steps", "3", "--resume", "--quiet"]) == 0
    said = capsys.readouterr()
    assert "at step 6, at or past --steps 3: nothing to train" in said.err
    assert "no step taken" in said.out and "nan" not in said.out and load_checkpoint(run).step == 6
    out = tmp_path / "samples"
    gif = tmp_path / "chain.gif"
    assert main(["sample", str(run), "--sampler", "ddim", "--steps", "5", "--n", "6", "--batch-size", "4",
                 "--out", str(out), "--gif", str(gif), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "samples/s" in printed
    pngs = sorted(p.name for p in out.glob("sample_*.png"))
    assert len(pngs) == 6 and (out / "grid.png").is_file()
    from PIL import Image

    with Image.open(gif) as im:
        # 5 DDIM steps, every one recorded, plus the initial noise frame
        assert im.n_frames == 6
    # deterministic for a fixed seed
    out2 = tmp_path / "samples2"
    assert main(["sample", str(run), "--sampler", "ddim", "--steps", "5", "--n", "6", "--batch-size", "4",
                 "--out", str(out2), "--quiet"]) == 0
    for name in pngs:
        assert (out / name).read_bytes() == (out2 / name).read_bytes()


def test_sampling_uses_the_runs_own_schedule(tmp_path):
    from ddpmkit.diffusion import Denoiser
    from ddpmkit.generate import SampleOptions, generate
    from ddpmkit.images import to_uint8
    from ddpmkit.samplers import PerSampleNoise, sample

    run = tiny_run(tmp_path, steps=2, schedule="cosine", T=30)
    sched = Run.open(run).schedule
    assert sched.kind == "cosine" and sched.T == 30
    model = Run.open(run).load_model()
    calls = []

    res = generate(run, tmp_path / "s", SampleOptions(sampler="ddpm", n=3, batch_size=3, seed=7), progress=False)
    assert res["steps"] == 30
    # the same chain, replayed by hand with the cosine schedule, gives the same pixels
    counting = Denoiser(lambda x, t: (calls.append(1), model(x, t))[1], sched, "eps")
    x = sample(counting, (3, 1, 8, 8), sampler="ddpm", noise=PerSampleNoise(7))

    assert len(calls) == 30
    assert torch.equal(to_uint8(x), res["images"])


def test_cli_eval_nll_writes_terms(tmp_path, capsys):
    run = tiny_run(tmp_path, steps=2)
    assert main(["eval", "nll", str(run), "--n", "4", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out
    rows = (run / "eval" / "nll_terms.csv").read_text().splitlines()
    assert rows[0] == "t,bits" and len(rows) == 1 + 41  # T = 40 terms and the prior
    total = sum(float(r.split(",")[1]) for r in rows[1:])
    assert f"{total:.4f}" in out
    from PIL import Image

    with Image.open(run / "eval" / "nll_terms.png") as im:
        assert im.size[0] > 100
    assert main(["eval", "nll", str(run), "--n", "0"]) != 0


def test_labels_reach_the_loss_only_when_the_network_takes_them(tmp_path, monkeypatch):
    # Batcher -> train_step -> training_losses(cond=...): labels only for a class-conditional run (--class-cond)
    import ddpmkit.train.tasks.diffusion as train_mod

    seen = []
    real = train_mod.training_losses

    def spy(net, schedule, x0, *, cond=None, **kw):
        seen.append(cond)
        return real(net, schedule, x0, cond=cond, **kw)

    monkeypatch.setattr(train_mod, "training_losses", spy)
    Trainer(tiny_cfg(), tmp_path / "plain", quiet=True).train_step()
    assert seen == [None]
    seen.clear()
    tr = Trainer(tiny_cfg(grad_accum=2, class_cond=True, p_uncond=0.0), tmp_path / "cond", quiet=True)
    tr.train_step()
    assert len(seen) == 2 and all(y.dtype == torch.int64 and y.shape == (4,) for y in seen)  # per micro-batch
    assert all(0 <= int(y.min()) and int(y.max()) <= 9 for y in seen)  # the digits' classes


# ---------------------------------------------------------------------------- gradient accumulation, dropout
ACCUM = tiny_flags(dropout=0, num_samples=0, log_every=1, checkpoint_every=2)

# Measured: after 4 steps the largest difference of any weight (and EMA weight) between --grad-accum 1 and 2
# (also 4 and 8) is ~3e-8, float32 summation order in the accumulated gradients. 1e-5 leaves a wide margin and
# still catches a real error (a wrong slice of the batch or of the noise moves weights by ~1e-4 .. 1e-3 here).
ACCUM_TOL = 1e-5


def _max_diff(a, b) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _metrics(run):
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    return [(int(r[0]), float(r[1]), float(r[3])) for r in rows]  # step, loss, grad_norm


def test_grad_accum_gives_the_weights_of_one_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *ACCUM, "--steps", "4", "--out", str(one)]) == 0
    assert main(["train", *ACCUM, "--steps", "4", "--grad-accum", "2", "--out", str(two)]) == 0
    assert json.loads((two / "config.json").read_text())["train"]["grad_accum"] == 2
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert a.step == b.step == 4
    assert _max_diff(a.model_state, b.model_state) < ACCUM_TOL
    assert _max_diff(a.ema_state, b.ema_state) < ACCUM_TOL
    k = next(k for k in a.model_state if k.endswith("conv_in.weight"))
    assert not torch.equal(a.model_state[k], a.ema_state[k])  # not vacuous: the weights moved
    assert torch.equal(a.train_state["gen"], b.train_state["gen"])  # the same noise draws
    # the logged loss is that of the whole batch, and the gradient (norm) is that of its mean, not K times it
    # (a gradient K times too large barely moves the weights: Adam and the clipping hide its scale)
    ma, mb = _metrics(one), _metrics(two)
    assert [r[0] for r in ma] == [r[0] for r in mb] == [1, 2, 3, 4]
    for (_, la, ga), (_, lb, gb) in zip(ma, mb):
        assert lb == pytest.approx(la, rel=1e-4) and gb == pytest.approx(ga, rel=1e-4)


def test_grad_accum_resumes_exactly_and_old_configs_load_as_one(tmp_path):
    straight, split, old = tmp_path / "straight", tmp_path / "split", tmp_path / "old"
    assert main(["train", *ACCUM, "--steps", "4", "--grad-accum", "2", "--out", str(straight)]) == 0
    # resume keeps the run's grad_accum from config.json
    assert main(["train", *ACCUM, "--steps", "2", "--grad-accum", "2", "--out", str(split)]) == 0
    assert main(["train", "--out", str(split), "--resume", "--steps", "4", "--quiet"]) == 0
    assert json.loads((split / "config.json").read_text())["train"]["grad_accum"] == 2
    a, b = load_checkpoint(straight), load_checkpoint(split)
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k
        assert torch.equal(a.ema_state[k], b.ema_state[k]), k
    # a config.json written before grad_accum existed resumes with 1 (the same run up to summation order)
    assert main(["train", *ACCUM, "--steps", "2", "--grad-accum", "2", "--out", str(old)]) == 0
    cfg = json.loads((old / "config.json").read_text())
    del cfg["train"]["grad_accum"]
    (old / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--out", str(old), "--resume", "--steps", "4", "--quiet"]) == 0
    assert json.loads((old / "config.json").read_text())["train"]["grad_accum"] == 1
    c = load_checkpoint(old)
    assert c.step == 4 and _max_diff(a.model_state, c.model_state) < ACCUM_TOL


@pytest.mark.parametrize("extra,world,match", [
    (["--grad-accum", "0"], None, "--grad-accum must be a positive integer, got 0"),
    (["--grad-accum", "-2"], None, "--grad-accum must be a positive integer, got -2"),
    (["--grad-accum", "3"], None, "--batch-size 8 (the global batch) over 1 process is 8 images per process, "
                                  "which --grad-accum 3 does not split evenly: use a batch size that is a "
                                  "multiple of 3"),
    # checked before joining the process group, so WORLD_SIZE alone (no torchrun) is enough to reach it
    (["--grad-accum", "8"], "2", "--batch-size 8 (the global batch) over 2 processes is 4 images per process, "
                                 "which --grad-accum 8 does not split evenly: use a batch size that is a "
                                 "multiple of 16"),
])
def test_bad_grad_accum_is_one_clear_error(tmp_path, capsys, monkeypatch, extra, world, match):
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    run = tmp_path / "run"
    rc = main(["train", *ACCUM, "--steps", "2", "--out", str(run), *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err == "ddpmkit: error: " + match
    assert not run.exists()


def test_dropout_differs_per_rank_but_initial_weights_do_not(tmp_path):
    from ddpmkit.train.trainer import seed_dropout

    cfg = tiny_cfg(dropout=0.5)
    a = Trainer(cfg, tmp_path / "a", quiet=True)
    seed_dropout(cfg.seed, 1, 0)  # what rank 1 leaves in the global generator must not reach the initialisation
    b = Trainer(cfg, tmp_path / "b", quiet=True)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn((4, 1, 8, 8), generator=g), torch.randint(0, 40, (4,), generator=g)

    # the dropout masks: the zeros of what enters each ResBlock's conv2 (dropout is applied right before it;
    # the network's output cannot show them, its last convolutions start at zero)
    masks = []
    convs = [m.conv2 for m in a.model.modules() if hasattr(m, "conv2") and hasattr(m, "dropout")]
    assert convs
    for c in convs:
        c.register_forward_pre_hook(lambda mod, args: masks.append(args[0] == 0))

    def drawn(rank, step):  # what train_step does on `rank` at `step`: reseed, then a forward pass
        masks.clear()
        seed_dropout(cfg.seed, rank, step)
        a.model.train()
        with torch.no_grad():
            a.model(x, t)
        m = torch.cat([v.flatten() for v in masks])
        assert 0.3 < m.float().mean().item() < 0.7  # dropout 0.5 is on
        return m

    assert torch.equal(drawn(0, 0), drawn(0, 0))  # repeatable
    assert not torch.equal(drawn(0, 0), drawn(1, 0))  # another rank: other masks
    assert not torch.equal(drawn(0, 0), drawn(0, 1))  # another step: other masks
    assert not torch.equal(drawn(0, 0), drawn(1, 1))


def test_dropout_on_one_process_is_reproducible(tmp_path, monkeypatch):
    import ddpmkit.train.loop as train_mod

    calls = []
    real = train_mod.seed_dropout
    monkeypatch.setattr(train_mod, "seed_dropout", lambda *a: (calls.append(a), real(*a))[1])
    runs = []
    for name in ("a", "b"):
        tr = Trainer(tiny_cfg(dropout=0.5), tmp_path / name, quiet=True)
        for _ in range(3):
            tr.train_step()
        runs.append({k: v.clone() for k, v in tr.model.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert calls == [(0, 0, 0), (0, 0, 1), (0, 0, 2)] * 2  # (seed, rank, step): reseeded at every step


# ---------------------------------------------------------------------------- settings: declared once
def test_every_setting_is_a_field_with_a_default_and_a_help_and_a_flag():
    import dataclasses

    from ddpmkit.cli import build_parser
    from ddpmkit.train import PRESETS, TrainConfig
    from ddpmkit.train.config import flag, resume_locked, settings

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    actions = {opt: a for a in train._actions for opt in a.option_strings}
    for f, _ in settings():
        assert f.metadata["help"], f.name
        assert flag(f.name) in actions, f.name  # one flag per field, its help taken from the field
        assert actions[flag(f.name)].help.startswith(f.metadata["help"]), f.name
    assert {f.name for f, _ in settings()} | {"preset"} == {f.name for f in dataclasses.fields(TrainConfig)}
    # the defaults are the digits preset; a preset names only fields
    assert TrainConfig() == config_from_preset("digits")
    for name, values in PRESETS.items():
        assert set(values) <= {f.name for f in dataclasses.fields(TrainConfig)}, name
    assert "base_channels" in resume_locked() and "steps" not in resume_locked() and "dropout" not in resume_locked()


@pytest.mark.parametrize("preset", ["digits", "cifar10"])
def test_the_presets_u_net_is_the_u_nets_preset(preset):
    # the architecture's numbers live in ddpmkit.models (UNET_PRESETS); the training presets take them from there
    from ddpmkit.models import UNET_PRESETS, UNet

    cfg = config_from_preset(preset)
    assert UNet(**cfg.model_config()).config == UNET_PRESETS[preset]
    assert json.loads(json.dumps(cfg.to_json()))["model"] == cfg.model_config()


def test_the_docs_settings_table_is_generated_from_the_fields():
    from pathlib import Path

    from ddpmkit.train import settings_table

    readme = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    begin = "<!-- settings table: generated by ddpmkit.train.settings_table() -->\n"
    assert begin in readme
    table = readme.split(begin, 1)[1].split("<!-- end of settings table -->", 1)[0]
    assert table == settings_table(), ("docs/training.md's settings table is stale: replace it with the output of "
                                       "python -c 'from ddpmkit.train import settings_table; print(settings_table())'")


def test_the_docs_autoencoder_settings_table_is_generated_from_the_fields():
    from pathlib import Path

    from ddpmkit.train.autoencoder_config import settings_table

    page = (Path(__file__).parents[1] / "docs" / "latent.md").read_text()
    begin = "<!-- autoencoder settings table: generated by ddpmkit.train.autoencoder_config.settings_table() -->\n"
    assert begin in page
    table = page.split(begin, 1)[1].split("<!-- end of autoencoder settings table -->", 1)[0]
    assert table == settings_table(), ("docs/latent.md's settings table is stale: replace it with the output of "
                                       "python -c 'from ddpmkit.train.autoencoder_config import settings_table; "
                                       "print(settings_table())'")


def test_the_diffusion_and_autoencoder_settings_share_the_loop_and_data_fields():
    """The settings every run has are declared once (train/settings.py): both classes carry them with the same help,
    and each class's own fields come between the data's and the loop's in the flags and the tables."""
    import dataclasses

    from ddpmkit.train import TrainConfig
    from ddpmkit.train.autoencoder_config import AutoencoderConfig
    from ddpmkit.train.settings import DataSettings, LoopSettings, settings

    shared = {f.name for f in dataclasses.fields(LoopSettings)} | {f.name for f in dataclasses.fields(DataSettings)}
    for cls in (TrainConfig, AutoencoderConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert shared <= set(fields)
        names = [f.name for f, _ in settings(cls)]
        groups = [0 if n in DataSettings.__dataclass_fields__ else 2 if n in LoopSettings.__dataclass_fields__ else 1
                  for n in names]
        assert groups == sorted(groups)
    # a redeclared default keeps the shared help (unless the class words it for itself)
    assert AutoencoderConfig.__dataclass_fields__["lr"].metadata["help"] == LoopSettings.__dataclass_fields__[
        "lr"].metadata["help"]
    assert AutoencoderConfig().batch_size != TrainConfig().batch_size


def test_config_json_round_trips_and_old_configs_take_the_defaults():
    from ddpmkit.train import TrainConfig

    cfg = tiny_cfg(channel_mults=(1, 2), attention_resolutions=(4,), time_limit=5.0)
    d = json.loads(json.dumps(cfg.to_json()))
    assert TrainConfig.from_json(d) == cfg
    del d["train"]["grad_accum"], d["train"]["skip_nonfinite"]  # written before those settings existed
    old = TrainConfig.from_json(d)
    assert old.grad_accum == 1 and old.skip_nonfinite is False
    with pytest.raises(Exception, match="no 'train' section"):
        TrainConfig.from_json({"model": {}})
