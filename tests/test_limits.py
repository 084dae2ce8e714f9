"""Issue 21, items 3 and 4: every number from a flag or a run's config.json is checked against a sane range before
anything is allocated; out of memory is one line saying what to reduce; DDIM's eta above 1 is refused."""

import json
import math
import shutil

import pytest

from conftest import tiny_flags, tiny_run
from test_reliability import assert_one_line_error

import ddpmkit.cli as cli
from ddpmkit.cli import main
from ddpmkit.diffusion import NoiseSchedule
from ddpmkit.limits import MAX_PARAMETERS, check_model_config
from ddpmkit.samplers import get_sampler
from ddpmkit.train import config_from_preset

TINY = tiny_flags(num_samples=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("limits"), steps=2)


def _mutated(run, tmp_path, name, section, key, value):
    out = tmp_path / name
    shutil.copytree(run, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg[section][key] = value
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("section,key,value,match", [
    ("model", "base_channels", 2 ** 20, "base_channels must be an integer in [1, 8192]"),  # was 17 TB, a traceback
    ("model", "image_size", 2 ** 20, "image_size must be an integer in [1, 4096]"),
    ("model", "channel_mults", [1] * 100_000, "channel_mults must be a list of at most 16"),
    ("model", "num_res_blocks", 64, "parameters"),  # in range each, but too big together: counted on meta
    ("diffusion", "T", 2 ** 40, "diffusion.T must be an integer in [1, 100000]"),  # was 8 TiB, a traceback
])
def test_a_run_config_with_absurd_numbers_is_one_line(run, tmp_path, capsys, section, key, value, match):
    bad = _mutated(run, tmp_path, "bad", section, key, value)
    if key == "num_res_blocks":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["model"]["base_channels"] = 4096
        (bad / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(["sample", str(bad), "--n", "2", "--quiet"], capsys, tmp_path, match)


def test_train_resume_of_a_config_with_absurd_sizes_is_one_line(run, tmp_path, capsys):
    bad = _mutated(run, tmp_path, "bad", "train", "base_channels", 2 ** 20)
    assert_one_line_error(["train", "--out", str(bad), "--resume", "--quiet"], capsys, tmp_path,
                          "base_channels must be an integer")


@pytest.mark.parametrize("flags,match", [
    (["--base-channels", str(2 ** 20)], "base_channels must be an integer"),  # was a traceback (17 TB)
    (["--T", str(2 ** 40)], "--T must be an integer in [1, 100000]"),  # was a traceback (8 TiB)
    (["--num-samples", str(2 ** 30)], "--num-samples must be an integer in [0, 4096]"),  # was a traceback
    (["--batch-size", str(2 ** 31)], "--batch-size must be an integer in [1, 65536]"),  # was a hang
    (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["--adam-beta2", "1"], "--adam-beta2 must be a finite number in [0, 1)"),
    (["--time-limit", "inf"], "--time-limit must be a positive number"),
    (["--variance", "huge"], "unknown variance"),
])
def test_train_flags_out_of_range_are_one_line(tmp_path, capsys, flags, match):
    assert_one_line_error(["train", *TINY, *flags, "--out", str(tmp_path / "new")], capsys, tmp_path, match)


@pytest.mark.parametrize("argv,match", [
    (["sample", "RUN", "--sampler", "ddim", "--eta", "inf"], "eta must be a finite number"),
    (["sample", "RUN", "--sampler", "ddim", "--eta", "1.5"], "eta must be <= 1"),
    (["sample", "RUN", "--batch-size", str(2 ** 31), "--n", "4"], "--batch-size must be an integer in [1, 65536]"),
    (["plot", "schedule", "--T", str(2 ** 40)], "--T must be an integer in [1, 100000]"),
])
def test_other_flags_out_of_range_are_one_line(run, tmp_path, capsys, argv, match):
    argv = [str(run) if a == "RUN" else a for a in argv] + ["--out", str(tmp_path / "out")]
    assert_one_line_error(argv, capsys, tmp_path, match)


def test_a_decompression_bomb_for_plot_forward_is_one_line(tmp_path, capsys):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("L", (30000, 30000)).save(bomb, optimize=True)  # 900 megapixels in under 1 MB
    assert bomb.stat().st_size < 2_000_000
    assert_one_line_error(["plot", "forward", "--image", str(bomb), "--out", str(tmp_path / "f.png")], capsys,
                          tmp_path, "DecompressionBombError")
    medium = tmp_path / "medium.png"  # under PIL's own limit, over ours: refused from the header, undecoded
    Image.new("L", (9000, 9000)).save(medium, optimize=True)
    assert_one_line_error(["plot", "forward", "--image", str(medium), "--out", str(tmp_path / "f.png")], capsys,
                          tmp_path, "9000x9000 pixels")


def test_the_model_size_is_counted_without_allocating():
    cfg = config_from_preset("cifar10").model_config()
    assert check_model_config(cfg, "cifar10") == 35_746_307  # the paper's 35.7 M
    big = dict(cfg, base_channels=8192)  # 146 G parameters: counted on the meta device, in well under a second
    with pytest.raises(Exception, match=f"more than the {MAX_PARAMETERS:,} allowed"):
        check_model_config(big, "big")


@pytest.mark.parametrize("command,hint", [("train", "--grad-accum"), ("sample", "reduce --batch-size")])
def test_out_of_memory_is_one_line_saying_what_to_reduce(monkeypatch, capsys, command, hint):
    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 17592186044416 bytes. Error code 12")

    monkeypatch.setattr(cli.train if command == "train" else cli.sample, "run", oom)
    argv = ["train", "--out", "x"] if command == "train" else ["sample", "x"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"ddpmkit: error: out of memory in `{command}` (16,384.0 GiB could not be allocated)")
    assert hint in err

    def other(args):
        raise RuntimeError("some other bug")

    monkeypatch.setattr(cli.train if command == "train" else cli.sample, "run", other)
    with pytest.raises(RuntimeError, match="some other bug"):  # a real bug is not disguised as out of memory
        main(argv)


# ------------------------------------------------------------------------------------------------ 4. eta
def test_eta_above_one_is_where_ddim_stops_being_ddim():
    """At eta <= 1, 1 - a_prev - sigma^2 = (1 - a_prev)(1 - eta^2 (1 - a_t/a_prev)/(1 - a_t)) >= 0 for any pair of
    timesteps (at eta = 1 it is (1 - a_prev)^2 a_t / (a_prev (1 - a_t)), DDIM eq. 16 into eq. 12); above 1 it goes
    negative for few steps, which is why the option stops at 1."""
    ab = NoiseSchedule.linear(1000).alpha_bar.double().numpy()

    def direction_var(eta, t, prev):
        a_t, a_prev = ab[t], ab[prev]
        sigma2 = eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # DDIM eq. 16
        return 1 - a_prev - sigma2

    pairs = [(999, 0), (999, 499), (500, 100), (10, 9), (100, 0)]
    for t, prev in pairs:
        closed = (1 - ab[prev]) ** 2 * ab[t] / (ab[prev] * (1 - ab[t]))
        assert math.isclose(direction_var(1.0, t, prev), closed, rel_tol=1e-9, abs_tol=1e-15)
        assert direction_var(1.0, t, prev) >= 0
    assert direction_var(1.5, 999, 499) < 0  # two steps at eta 1.5: the clamp would hide an imaginary coefficient
    eta = get_sampler("ddim").options[0]
    assert eta.check(1.0) == 1.0 and eta.check(0.0) == 0.0
    with pytest.raises(ValueError, match=r"eta must be <= 1, got 1\.0001 \(DDIM's eta lies in \[0, 1\]"):
        eta.check(1.0001)
