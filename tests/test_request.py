"""A request is resolved once: one ``ddpmkit sample`` (or ``eval fid``) reads each file of its run once and
computes its timesteps once, whatever the number of batches (issue 26)."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import tiny_run

_WATCH: dict = {"root": None, "opened": None}


def _hook(event, args):
    """Count the files opened for reading under the watched run directory (an audit hook cannot be removed, so it
    is installed once and switched by ``_WATCH``)."""
    root, opened = _WATCH["root"], _WATCH["opened"]
    if event != "open" or root is None or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path, mode, flags = args[0], args[1] if len(args) > 1 else None, args[2] if len(args) > 2 else 0
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return
    if isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR):
        return
    try:
        rel = Path(os.fsdecode(path)).resolve().relative_to(root)
    except (ValueError, OSError):
        return
    if rel.name == "config.json" or rel.suffix == ".safetensors":
        opened[rel.as_posix()] += 1


_INSTALLED = []


@pytest.fixture
def counts(monkeypatch):
    """``(opened, tau_calls)``: files of the run opened for reading, and calls of the timesteps function."""
    if not _INSTALLED:
        sys.addaudithook(_hook)
        _INSTALLED.append(True)
    import ddpmkit.samplers as S

    module = sys.modules["ddpmkit.samplers.timesteps"]
    real = module.timesteps
    calls = []

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, "timesteps", spy)
    monkeypatch.setattr(S, "timesteps", spy)
    opened = Counter()
    yield opened, calls
    _WATCH["root"] = _WATCH["opened"] = None


def _watch(run: Path, opened: Counter):
    _WATCH["root"], _WATCH["opened"] = run.resolve(), opened


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("request"))


def _weights(opened: Counter) -> dict:
    return {k: v for k, v in opened.items() if k.endswith(".safetensors")}


def test_one_sample_command_reads_each_file_once_and_plans_once(run_dir, counts, tmp_path, capsys):
    from ddpmkit.cli import main

    opened, tau_calls = counts
    _watch(run_dir, opened)
    rc = main(["sample", str(run_dir), "--n", "130", "--batch-size", "50", "--steps", "3", "--quiet",
               "--out", str(tmp_path / "out")])
    _WATCH["root"] = None
    assert rc == 0
    assert len(list((tmp_path / "out").glob("sample_*.png"))) == 130  # 3 batches: 50, 50, 30
    assert opened["config.json"] == 1, dict(opened)
    weights = _weights(opened)
    assert weights and all(v == 1 for v in weights.values()), weights
    assert any(k.endswith("ema.safetensors") for k in weights)
    assert len(tau_calls) == 1


def test_the_default_folder_costs_no_second_reading(run_dir, counts, capsys):
    from ddpmkit.cli import main

    opened, tau_calls = counts
    _watch(run_dir, opened)
    assert main(["sample", str(run_dir), "--n", "3", "--batch-size", "2", "--steps", "2", "--quiet"]) == 0
    _WATCH["root"] = None
    assert opened["config.json"] == 1, dict(opened)
    assert all(v == 1 for v in _weights(opened).values()), dict(opened)
    assert len(tau_calls) == 1


def test_eval_fid_reads_each_file_once_and_plans_once(run_dir, counts, tmp_path, capsys, monkeypatch):
    from ddpmkit.cli import main

    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    opened, tau_calls = counts
    _watch(run_dir, opened)
    rc = main(["eval", "fid", str(run_dir), "--n", "5", "--batch-size", "2", "--steps", "2",
               "--features", "digits", "--reference", "digits"])
    _WATCH["root"] = None
    assert rc == 0
    assert opened["config.json"] == 1, dict(opened)
    # the checkpoint resumed from is read once to load it, and once more by the pruning after the new save, which
    # checks the hashes of what it keeps before it deletes anything older (store/saving.py): a second, deliberate pass
    assert all(v <= 2 for v in _weights(opened).values()), dict(opened)
    assert len(tau_calls) == 1


def test_a_plan_samples_as_the_sampler_named_with_the_same_settings():
    import torch

    from ddpmkit.diffusion import Denoiser, NoiseSchedule
    from ddpmkit.samplers import resolve, sample

    sched = NoiseSchedule.from_name("linear", 40)
    den = Denoiser(lambda x, t, *a, **k: 0.1 * x + 0.01 * t.view(-1, 1, 1, 1), sched, clip_x0=False)
    plan = resolve("ddim", sched, 6, "trailing", eta=0.5)
    by_name = sample(den, (2, 1, 4, 4), sampler="ddim", steps=6, spacing="trailing", noise=3, eta=0.5)
    by_plan = sample(den, (2, 1, 4, 4), sampler=plan, noise=3)
    assert torch.equal(by_name, by_plan)
    with pytest.raises(ValueError, match="SamplingPlan"):
        sample(den, (2, 1, 4, 4), sampler=plan, steps=6)


def test_a_refused_setting_names_itself_and_the_cli_names_its_flag(run_dir, capsys):
    from ddpmkit.cli import main
    from ddpmkit.errors import SettingError
    from ddpmkit.request import Request, SampleOptions

    for opt, setting in ((SampleOptions(sampler="unipc", options={"order": 4}), "order"),
                         (SampleOptions(steps=500), "steps"), (SampleOptions(spacing="nope"), "spacing"),
                         (SampleOptions(sampler="nope"), "sampler"), (SampleOptions(batch_size=0), "batch_size"),
                         (SampleOptions(classes="3"), "classes"), (SampleOptions(guidance=1.0), "guidance")):
        with pytest.raises(SettingError) as info:
            Request.resolve(run_dir, opt)
        assert info.value.setting == setting
    assert main(["sample", str(run_dir), "--class", "3", "--n", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--class 3: this run is unconditional" in err


def test_a_resume_reads_config_json_once(tmp_path, counts, capsys):
    """`train --resume` resolves its settings from config.json once (train.resume.resolve_run) and hands that
    reading to the loop, which checks the locked settings and loads the checkpoint without reading it again."""
    from conftest import tiny_flags

    from ddpmkit.cli import main

    run = tiny_run(tmp_path, steps=2)
    opened, _ = counts
    _watch(run, opened)
    rc = main(["train", "--out", str(run), "--resume", "--steps", "3"] + tiny_flags())
    _WATCH["root"] = None
    assert rc == 0
    assert opened["config.json"] == 1, dict(opened)
    # the checkpoint resumed from is read once to load it, and once more by the pruning after the new save, which
    # checks the hashes of what it keeps before it deletes anything older (store/saving.py): a second, deliberate pass
    assert all(v <= 2 for v in _weights(opened).values()), dict(opened)
