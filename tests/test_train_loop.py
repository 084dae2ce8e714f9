"""The one training loop with a task that is not diffusion (two networks, two optimizers, one joining late), and
the resume resolver that reads config.json once."""

import builtins
import io

import pytest
import torch

from conftest import tiny_cfg, tiny_run

from ddpmkit.errors import ConfigError
from ddpmkit.store.checkpoint import load_checkpoint
from ddpmkit.train.loop import TrainingLoop
from ddpmkit.train.resume import resolve_config
from ddpmkit.train.task import LossOut, OptimizerSpec, Task


class TwoNets(Task):
    """A toy adversarial pair: a generator fits a target, a critic (from step 2, at half the lr) scores it."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.num_images = 64
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.seen = []

    def build(self):
        return {"g": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.2)),
                "d": torch.nn.Linear(4, 1), "frozen": torch.nn.Linear(4, 4).requires_grad_(False)}

    def optimizers(self, models):
        return {"g": OptimizerSpec(models["g"].parameters()),
                "d": OptimizerSpec(models["d"].parameters(), lr_scale=0.5, start_step=2)}

    def batch(self, step):
        return torch.randn(self.cfg.batch_size, 4, generator=self.gen)

    def loss(self, name, batch, part, nets):
        self.seen.append(name)
        x = batch[part]
        fake = nets["g"](nets["frozen"](x))
        if name == "g":
            per = ((fake - 2 * x) ** 2).mean(1) - 0.1 * nets["d"](fake).squeeze(1)
        else:
            per = nets["d"](fake.detach()).squeeze(1) - nets["d"](2 * x).squeeze(1)
        return LossOut(per.mean(), per.detach(), scalars={"abs": per.abs().mean()})

    def config_json(self):
        return self.cfg.to_json()

    def state_dict(self):
        return {"toy_gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["toy_gen"])


def _run(cfg, out, resume=False):
    loop = TrainingLoop(TwoNets, cfg, out, resume=resume, quiet=True)
    res = loop.run()
    return loop, res


def test_a_second_network_and_optimizer_train_save_and_resume_bit_exactly(tmp_path):
    cfg = dict(checkpoint_every=2, grad_accum=2, lr=1e-2)
    straight, res = _run(tiny_cfg(steps=6, **cfg), tmp_path / "straight")
    assert res["step"] == 6 and res["grid"] is None
    assert straight.task.seen[:4] == ["g", "g"] * 2  # two micro-batches each; the critic from step 2 only
    assert straight.task.seen[4:10] == ["g", "g", "d", "d", "g", "g"]
    assert straight.optimizers["d"].param_groups[0]["lr"] == 0.5 * straight.optimizers["g"].param_groups[0]["lr"]
    _run(tiny_cfg(steps=3, **cfg), tmp_path / "split")
    split, _ = _run(tiny_cfg(steps=6, **cfg), tmp_path / "split", resume=True)
    for n in ("g", "d", "frozen"):
        a, b = straight.models[n].state_dict(), split.models[n].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), n
    ck = load_checkpoint(tmp_path / "split")
    assert set(ck.model_state) == set(straight.models["g"].state_dict())  # the main network alone in model files
    assert set(ck.train_state["models"]) == {"d"} and set(ck.train_state["optimizers"]) == {"d"}
    assert "toy_gen" in ck.train_state
    sa, sb = straight.optimizers["d"].state_dict()["state"], split.optimizers["d"].state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_resolve_config_reads_config_json_once_and_checks_locked_settings(tmp_path, monkeypatch):
    run = tiny_run(tmp_path, steps=2, lr=3e-4)
    opened = []
    real_open, real_io_open = builtins.open, io.open

    def spy(f, *a, **k):
        opened.append(str(f))
        return real_open(f, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    cfg = resolve_config("cifar10", {"steps": 4, "batch_size": None}, run, resume=True)
    monkeypatch.setattr(builtins, "open", real_open)
    monkeypatch.setattr(io, "open", real_io_open)
    assert sum(p.endswith("config.json") for p in opened) == 1
    # the stored run's settings (its preset, lr, architecture), with the flags given now on top
    assert cfg.preset == "digits" and cfg.lr == 3e-4 and cfg.steps == 4 and cfg.base_channels == 8
    with pytest.raises(ConfigError, match=r"cannot resume with a changed base_channels, T \(the run in .* has "
                                          r"base_channels=8, T=40\)"):
        resolve_config("digits", {"base_channels": 12, "T": 50}, run, resume=True)
    # a new run: the preset and the flags
    new = resolve_config("digits", {"steps": 7}, tmp_path / "new", resume=False)
    assert new.steps == 7 and new.preset == "digits" and new.base_channels != 8
