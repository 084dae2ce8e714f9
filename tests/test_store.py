"""Tests of ddpmkit.store: the pickle-free state format, safetensors, checkpoint directories, run directories."""

from __future__ import annotations

import ast
import errno
import json
import math
import os
import pickle
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ddpmkit
import ddpmkit.store.checkpoint as ck
from ddpmkit.errors import CheckpointError, DdpmkitError, FileError
from ddpmkit.files import atomic_write_text
from ddpmkit.run import Run
from ddpmkit.store import (atomic_save_safetensors, latest_checkpoint, list_checkpoints, load_checkpoint,
                           load_safetensors, load_state, prepare_run_dir, prune_checkpoints, read_config,
                           save_checkpoint, save_state, verify_checkpoint, write_config)

# ============================================================================ helpers


def assert_identical(a, b, where="root"):
    """Same types all the way down (dict key types, tuple vs list), tensors bit-exact incl. dtype/shape."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for (ka, va), kb in zip(a.items(), b.keys()):
            assert_identical(ka, kb, f"{where} key")
            assert_identical(va, b[kb], f"{where}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(a, np.floating):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), where
    else:
        assert a == b, where


def tiny_state(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g) * scale, "a.bias": torch.randn(4, generator=g),
            "n": torch.tensor(7, dtype=torch.int64)}


def make_run(tmp_path, name="run", config=None):
    run = tmp_path / name
    prepare_run_dir(run, resume=False)
    write_config(run, config or {"model": {}, "diffusion": {"schedule": "linear", "T": 10}})
    return run


def flip_bit(path: Path, offset: int | None = None, bit: int = 0):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 1 << bit
    path.write_bytes(bytes(data))


def truncate(path: Path, n: int = 1):
    data = path.read_bytes()
    path.write_bytes(data[:-n])



def _read_only(monkeypatch, directory: Path):
    """Simulate a read-only file system under ``directory`` (root ignores chmod)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and str(path).startswith(str(directory)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    real_mkdir = os.mkdir

    def fake_mkdir(path, *args, **kwargs):
        if str(path).startswith(str(directory)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_atomic_write_read_only_dir_simulated(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    atomic_write_text(d / "f.txt", "old")
    _read_only(monkeypatch, d)
    with pytest.raises(FileError, match="could not write .*f.txt: Read-only file system"):
        atomic_write_text(d / "f.txt", "new")
    monkeypatch.undo()
    assert (d / "f.txt").read_text() == "old"
    assert sorted(p.name for p in d.iterdir()) == ["f.txt"]

def test_atomic_save_safetensors_shared_views_and_dtypes(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    w = torch.randn(3, 4)
    tensors = {
        "base": base,
        "view": base[2:6],  # shares memory with "base"
        "tied": w,
        "tied_again": w,  # the very same tensor twice (tied weights)
        "transposed": w.t(),  # non-contiguous
        "bf16": torch.randn(5).to(torch.bfloat16),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "param": nn.Parameter(torch.ones(2)),
    }
    p = atomic_save_safetensors(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    back = load_safetensors(p)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert_identical(v.detach().contiguous(), back[k], k)


def test_atomic_save_safetensors_refuses_non_tensors(tmp_path):
    with pytest.raises(CheckpointError, match="not a tensor"):
        atomic_save_safetensors({"a": 1.0}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="metadata"):
        atomic_save_safetensors({"a": torch.ones(1)}, tmp_path / "x.safetensors", metadata={"a": 1})
    assert not (tmp_path / "x.safetensors").exists()


def test_truncated_safetensors_header_is_a_checkpoint_error(tmp_path):
    p = atomic_save_safetensors(tiny_state(), tmp_path / "m.safetensors")
    for data in (p.read_bytes()[:5], p.read_bytes()[:40], b"\xff" * 8 + b"{}", b""):
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match=r"m\.safetensors is not a valid safetensors file"):
            load_safetensors(p)


# ============================================================================ nested state


def test_state_roundtrip_exotic_tree(tmp_path):
    shared = torch.randn(3)
    tree = {
        "ints": {0: "zero", 1: (1, 2), -5: [None]},
        "tuple_key": {(1, "a"): 1.0, None: 2, True: 3, 2.5: "f", b"k": "bytes key"},
        "floats": [0.1, -0.0, float("nan"), float("inf"), float("-inf"), 1e-308, 1.0],
        "tuple": (1, [2, (3,)], ()),
        "bool": [True, False],
        "none": None,
        "str": "ünïcode $tuple",
        "looks_like_tag": {"$tensor": "0", "$tuple": []},
        "bytes": b"\x00\xffraw",
        "tensors": [torch.randn(2, 3), torch.arange(5, dtype=torch.int64), torch.tensor(True),
                    torch.randn(4).to(torch.bfloat16), torch.zeros(0), torch.tensor(float("nan")),
                    torch.randint(0, 255, (7,), dtype=torch.uint8)],
        "same_twice": [shared, shared],
        "od": OrderedDict([("z", 1), ("a", 2)]),
        "numpy": [np.arange(6, dtype=np.uint32).reshape(2, 3), np.float32(1.25), np.int64(-3), np.bool_(True),
                  np.array([1.5, np.nan]), np.float64("nan")],
        "empty": [{}, [], ()],
        "big": 2**80,
    }
    save_state(tree, tmp_path, "weird")
    back = load_state(tmp_path, "weird")
    assert_identical(tree, back)
    assert back["same_twice"][0] is back["same_twice"][1]


def test_state_roundtrip_rng_states(tmp_path):
    torch.manual_seed(123)
    g = torch.Generator().manual_seed(7)
    torch.randn(3, generator=g)
    random.seed(5)
    np.random.seed(9)
    tree = {"torch": torch.get_rng_state(), "gen": g.get_state(), "python": random.getstate(),
            "numpy": np.random.get_state(), "pcg": np.random.default_rng(3).bit_generator.state}
    expected_torch, expected_gen = torch.rand(4), torch.rand(4, generator=g)
    expected_py, expected_np = random.random(), np.random.rand()
    save_state(tree, tmp_path, "rng")
    back = load_state(tmp_path, "rng")
    assert_identical(tree, back)
    torch.set_rng_state(back["torch"])
    g2 = torch.Generator()
    g2.set_state(back["gen"])
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    assert torch.equal(torch.rand(4), expected_torch)
    assert torch.equal(torch.rand(4, generator=g2), expected_gen)
    assert random.random() == expected_py
    assert np.random.rand() == expected_np


@pytest.mark.parametrize("bad", [object(), {1, 2}, torch.float32, torch.Size([1, 2]), {"k": [print]},
                                 {frozenset(): 1}, np.array(["a"], dtype=object)])
def test_state_refuses_unknown_types_before_writing(tmp_path, bad):
    with pytest.raises(CheckpointError, match="cannot be stored"):
        save_state({"x": bad}, tmp_path, "s")
    assert list(tmp_path.iterdir()) == []


def test_state_refuses_cycles(tmp_path):
    a = []
    a.append(a)
    with pytest.raises(CheckpointError, match="cycle"):
        save_state(a, tmp_path, "s")


@pytest.mark.parametrize("payload", [b"not json", b'{"format": "ddpmkit-state", "version": 1, "tree": {"$evil": 1}}',
                                     b'{"format": "ddpmkit-state", "version": 1, "tree": {"$tensor": "99"}}',
                                     b'{"format": "ddpmkit-state", "version": 1, "tree": {"$dict": [[[1], 2]]}}',
                                     b'{"format": "ddpmkit-state", "version": 9, "tree": null}',
                                     b'{"a": 1, "a": 2}'])
def test_state_bad_json_is_checkpoint_error(tmp_path, payload):
    save_state({"t": torch.ones(2)}, tmp_path, "s")
    (tmp_path / "s.json").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"s\.json"):
        load_state(tmp_path, "s")


def _adam_setup(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3, amsgrad=True)
    return model, opt


def _adam_step(model, opt, g):
    x = torch.randn(16, 4, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def test_adam_resume_is_bit_exact_via_save_state(tmp_path):
    model, opt = _adam_setup(0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        _adam_step(model, opt, g)
    atomic_save_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    sd = opt.state_dict()
    save_state(sd, tmp_path, "optimizer")
    save_state({"gen": g.get_state(), "step": 3}, tmp_path, "state")
    loaded = load_state(tmp_path, "optimizer")
    assert_identical(sd, loaded)
    assert all(type(k) is int for k in loaded["state"])
    assert type(loaded["param_groups"][0]["betas"]) is tuple

    for _ in range(3):  # the uninterrupted run
        _adam_step(model, opt, g)

    model2, opt2 = _adam_setup(99)  # different init: everything must come from the files
    model2.load_state_dict(load_safetensors(tmp_path / "model.safetensors"))
    opt2.load_state_dict(load_state(tmp_path, "optimizer"))
    g2 = torch.Generator()
    train = load_state(tmp_path, "state")
    g2.set_state(train["gen"])
    for _ in range(3):
        _adam_step(model2, opt2, g2)

    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    assert_identical(opt.state_dict(), opt2.state_dict())


# ============================================================================ checkpoints


def _full_save(run, step, *, keep=3, seed=None):
    seed = step if seed is None else seed
    return save_checkpoint(run, step, model_state=tiny_state(seed), ema_state=tiny_state(seed + 1000),
                           optimizer_state={"state": {0: {"m": torch.ones(2) * step}}, "param_groups": [{"lr": 0.1}]},
                           train_state={"step": step, "rng": torch.get_rng_state()}, keep=keep)


def test_checkpoint_layout_and_roundtrip(tmp_path):
    run = make_run(tmp_path)
    path = _full_save(run, 1000)
    assert path == run / "checkpoints" / "step_000001000"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["ema.safetensors", "manifest.json", "model.safetensors", "optimizer.json",
                     "optimizer.safetensors", "state.json", "state.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "ddpmkit-checkpoint" and manifest["version"] == 1 and manifest["step"] == 1000
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert manifest["files"]["model.safetensors"]["bytes"] == (path / "model.safetensors").stat().st_size
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001000"]  # no leftovers
    verify_checkpoint(path)

    for target in (path, run, path / "manifest.json", run / "checkpoints"):
        c = load_checkpoint(target)
        assert c.step == 1000 and c.path == path and c.run_dir == run and c.skipped == []
        assert c.config == read_config(run)
        for saved, back in ((tiny_state(1000), c.model_state), (tiny_state(2000), c.ema_state)):
            assert set(saved) == set(back)
            for k in saved:
                assert_identical(saved[k], back[k], k)
        assert c.optimizer_state["state"][0]["m"].tolist() == [1000.0, 1000.0]
        assert c.train_state["step"] == 1000


def test_checkpoint_with_model_only(tmp_path):
    run = make_run(tmp_path)
    p = save_checkpoint(run, 5, model_state=tiny_state())
    assert sorted(x.name for x in p.iterdir()) == ["manifest.json", "model.safetensors"]
    c = load_checkpoint(run)
    assert c.ema_state is None and c.optimizer_state is None and c.train_state is None


def test_keep_last_k(tmp_path):
    run = make_run(tmp_path)
    for step in range(1, 6):
        _full_save(run, step, keep=2)
    assert [p.name for p in list_checkpoints(run)] == ["step_000000004", "step_000000005"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000004", "step_000000005"]


def test_keep_counts_only_intact_checkpoints(tmp_path):
    run = make_run(tmp_path)
    for step in (1, 2, 3):
        _full_save(run, step, keep=None)
    flip_bit(run / "checkpoints" / "step_000000003" / "model.safetensors")
    _full_save(run, 4, keep=3)  # intact: 4, 2, 1 -> nothing older than step 1 to delete; corrupt 3 kept
    assert [ck._step_of(p) for p in list_checkpoints(run)] == [1, 2, 3, 4]
    _full_save(run, 5, keep=2)  # intact: 5, 4 -> 1, 2, 3 go
    assert [ck._step_of(p) for p in list_checkpoints(run)] == [4, 5]
    with pytest.raises(ValueError):
        prune_checkpoints(run, 0)


def test_same_step_resave_replaces(tmp_path):
    run = make_run(tmp_path)
    _full_save(run, 10, seed=1)
    _full_save(run, 10, seed=2)
    c = load_checkpoint(run)
    assert c.step == 10
    assert_identical(tiny_state(2)["a.weight"], c.model_state["a.weight"])
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000000010"]


def test_interrupted_same_step_resave_is_not_lost(tmp_path):
    run = make_run(tmp_path)
    _full_save(run, 1)
    p = _full_save(run, 2)
    # a crash right after the old step_2 was moved aside, before the new one was renamed in
    aside = p.parent / ".old-step_000000002-abcd1234"
    os.rename(p, aside)
    (p.parent / ".tmp-step_000000002-deadbeef").mkdir()
    assert [x.name for x in list_checkpoints(run)] == ["step_000000001", aside.name]
    assert load_checkpoint(run).step == 2
    _full_save(run, 3)  # the next save puts it back and clears the temp dir
    assert sorted(x.name for x in p.parent.iterdir()) == ["step_000000001", "step_000000002", "step_000000003"]


ALL_FILES = ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
             "state.safetensors", "state.json"]


@pytest.mark.parametrize("fname", ALL_FILES)
def test_verify_detects_bit_flip_and_truncation(tmp_path, fname):
    run = make_run(tmp_path)
    p = _full_save(run, 7)
    original = (p / fname).read_bytes()
    flip_bit(p / fname)
    wrong_sha = rf"checkpoint .*step_000000007 is corrupt: {fname} has the wrong SHA-256"
    with pytest.raises(CheckpointError, match=wrong_sha):
        verify_checkpoint(p)
    with pytest.raises(CheckpointError, match="wrong SHA-256"):
        load_checkpoint(p)
    (p / fname).write_bytes(original)
    verify_checkpoint(p)
    truncate(p / fname)
    with pytest.raises(CheckpointError, match=rf"{fname} is truncated"):
        verify_checkpoint(p)
    (p / fname).unlink()
    with pytest.raises(CheckpointError, match=rf"{fname} is missing"):
        verify_checkpoint(p)


def test_verify_detects_bad_manifest(tmp_path):
    run = make_run(tmp_path)
    p = _full_save(run, 7)
    m = p / "manifest.json"
    good = m.read_bytes()
    sha = json.loads(good)["files"]["model.safetensors"]["sha256"]
    flip_bit(m, good.index(sha.encode()) + 3)
    with pytest.raises(CheckpointError, match="is corrupt"):
        verify_checkpoint(p)
    m.write_bytes(good[:-10])
    with pytest.raises(CheckpointError, match="manifest.json is unreadable"):
        verify_checkpoint(p)
    m.write_text(json.dumps({**json.loads(good), "files": {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}}))
    with pytest.raises(CheckpointError, match="corrupt"):
        verify_checkpoint(p)
    m.write_text(json.dumps({**json.loads(good), "step": 8}))
    with pytest.raises(CheckpointError, match="says step 8"):
        verify_checkpoint(p)
    m.unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        verify_checkpoint(p)


def test_latest_falls_back_past_corrupt_and_reports(tmp_path):
    run = make_run(tmp_path)
    for step in (1, 2, 3):
        _full_save(run, step)
    newest = run / "checkpoints" / "step_000000003"
    truncate(newest / "model.safetensors", 10)
    path, skipped = latest_checkpoint(run)
    assert path.name == "step_000000002" and skipped == [newest]
    c = load_checkpoint(run)
    assert c.step == 2 and c.skipped == [newest]
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(newest)
    assert latest_checkpoint(run, verify=False) == (newest, [])
    for step in (1, 2):
        (run / "checkpoints" / f"step_{step:09d}" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        latest_checkpoint(run)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_checkpoint(run)


def test_load_without_verify_reads_unfinished_checkpoint(tmp_path):
    run = make_run(tmp_path)
    p = _full_save(run, 4)
    (p / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(p)
    c = load_checkpoint(p, verify=False)
    assert c.step == 4 and c.train_state["step"] == 4


def test_stale_tmp_dirs_are_ignored_and_cleaned(tmp_path):
    run = make_run(tmp_path)
    _full_save(run, 1)
    stale = run / "checkpoints" / ".tmp-step_000000009-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(run)] == ["step_000000001"]
    assert latest_checkpoint(run)[0].name == "step_000000001"
    assert load_checkpoint(run).step == 1
    _full_save(run, 2)
    assert not stale.exists()


def test_failed_save_leaves_earlier_checkpoints_and_no_tmp(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    p1 = _full_save(run, 1)
    before = {f.name: f.read_bytes() for f in p1.iterdir()}
    calls = {"n": 0}
    real_write = os.write

    def flaky_write(fd, data):
        calls["n"] += 1
        if calls["n"] >= 2:  # model.safetensors goes through, ema.safetensors hits a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", flaky_write)
    with pytest.raises(CheckpointError, match=r"could not save the checkpoint of step 2 .*No space left on device"):
        _full_save(run, 2)
    monkeypatch.undo()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000000001"]
    assert {f.name: f.read_bytes() for f in p1.iterdir()} == before

    calls["n"] = 0
    monkeypatch.setattr(os, "write", flaky_write)
    with pytest.raises(CheckpointError, match="No space left"):
        _full_save(run, 1)  # a failed re-save of the same step keeps the old one
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in p1.iterdir()} == before
    verify_checkpoint(p1)


def test_bad_state_in_save_leaves_no_trace(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(CheckpointError, match="cannot be stored"):
        save_checkpoint(run, 1, model_state=tiny_state(), train_state={"bad": object()})
    assert list((run / "checkpoints").iterdir()) == []


# ============================================================================ run directories


def test_prepare_run_dir_new_and_refusals(tmp_path):
    run = prepare_run_dir(tmp_path / "a" / "b" / "run", resume=False)
    assert run.is_dir() and list(run.iterdir()) == []
    assert prepare_run_dir(run, resume=False) == run  # an empty directory is fine

    (run / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="already exists and is not empty; pass --resume"):
        prepare_run_dir(run, resume=False)
    assert [p.name for p in run.iterdir()] == ["keep.txt"] and (run / "keep.txt").read_text() == "precious"

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        prepare_run_dir(f, resume=False)
    with pytest.raises(CheckpointError, match="cannot create run directory"):
        prepare_run_dir(f / "sub", resume=False)

    with pytest.raises(CheckpointError, match="is not a ddpmkit run directory"):
        prepare_run_dir(run, resume=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        prepare_run_dir(tmp_path / "nope", resume=True)
    write_config(run, {"x": 1})
    assert prepare_run_dir(run, resume=True) == run


def test_prepare_run_dir_not_writable(tmp_path, monkeypatch):
    d = tmp_path / "locked"
    d.mkdir()
    _read_only(monkeypatch, d)
    with pytest.raises(CheckpointError, match="cannot write to run directory .*Read-only"):
        prepare_run_dir(d, resume=False)
    with pytest.raises(CheckpointError, match="cannot create run directory .*Read-only"):
        prepare_run_dir(d / "sub", resume=False)
    monkeypatch.undo()
    assert list(d.iterdir()) == []


def test_read_config_bad_json(tmp_path):
    run = make_run(tmp_path, config={"a": 1})
    assert read_config(run) == {"a": 1}
    (run / "config.json").write_text('{"a": 1,')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        read_config(run)
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        read_config(run)


def test_errors_are_ddpmkit_errors():
    assert issubclass(CheckpointError, DdpmkitError)


# ============================================================================ no pickle, ever


class _Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (str(self.marker), "w"))


def test_planted_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"x": _Trap(marker)})
    run = make_run(tmp_path)
    p = _full_save(run, 1)
    (p / "model.bin").write_bytes(payload)
    (p / "pytorch_model.bin").write_bytes(payload)
    torch.save({"x": torch.ones(1)}, p / "optimizer.pt")
    assert load_checkpoint(p).step == 1  # stray files are not read at all

    (p / "optimizer.json").write_bytes(payload)  # garbage where JSON should be
    with pytest.raises(CheckpointError):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="optimizer.json is not valid JSON"):
        load_checkpoint(p, verify=False)
    (p / "model.safetensors").write_bytes(payload)  # a pickle where safetensors should be
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file"):
        load_checkpoint(p, verify=False)
    with pytest.raises(CheckpointError):
        Run.open(p).load_model(verify=False)
    (p / "state.json").write_bytes(payload)
    with pytest.raises(CheckpointError):
        load_state(p, "state")
    assert not marker.exists()


_ROOT = Path(ddpmkit.__file__).parent
# every module that reads a run's files or a model handed in; data/cifar10.py's restricted unpickler is tested apart
_STORAGE_SOURCES = sorted({"files.py", "run.py"} | {str(p.relative_to(_ROOT)) for d in ("store", "interop")
                                                    for p in (_ROOT / d).glob("*.py")})


@pytest.mark.parametrize("name", _STORAGE_SOURCES)
def test_module_source_never_unpickles(name):
    source = (Path(ddpmkit.__file__).parent / name).read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n and n.split(".")[0] in ("pickle", "dill", "marshal", "shelve", "joblib") for n in names)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "loads"):
            base = node.func.value
            if isinstance(base, ast.Name) and base.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            assert not (isinstance(base, ast.Name) and base.id in ("pickle", "np", "numpy"))


# ============================================================================ storage does not know the network


def _ddpmkit_imports(path: Path) -> set[str]:
    """The ddpmkit modules a source file imports (relative imports resolved)."""
    package = "ddpmkit." + ".".join(path.relative_to(Path(ddpmkit.__file__).parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rstrip(".").split(".")
                base = base[:len(base) - (node.level - 1)]
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("ddpmkit"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ddpmkit")}
    return out


def test_store_and_files_import_no_network_code():
    root = Path(ddpmkit.__file__).parent
    allowed = {"ddpmkit", "ddpmkit.errors", "ddpmkit.files", "ddpmkit.store"}
    for path in [root / "files.py", *sorted((root / "store").glob("*.py"))]:
        for name in _ddpmkit_imports(path):
            assert name in allowed or name.startswith("ddpmkit.store."), f"{path.name} imports {name}"
    import subprocess
    import sys

    code = ("import sys, ddpmkit.store, ddpmkit.files; "
            "bad = [m for m in sys.modules if m.startswith(('ddpmkit.models', 'ddpmkit.unet', 'ddpmkit.diffusion'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
