"""Reliability: crash safety, numerical faults, disk faults, and the table of bad inputs.

Every user error goes through ``ddpmkit.cli.main`` and must give one line on stderr, a non-zero exit, no
traceback, and leave everything on disk as it was.
"""

import errno
import hashlib
import importlib.util
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_cfg, tiny_flags, tiny_run

import ddpmkit.data.cifar10 as D
import ddpmkit.store.saving as C  # the checkpoint writer
import ddpmkit.train.tasks.diffusion as diffusion_task
import ddpmkit.train.trainer as train_mod
from ddpmkit.cli import main
from ddpmkit.store.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from ddpmkit.train import NonFiniteError, Trainer

TINY = tiny_flags(log_every=2, num_samples=0, sample_every=1000)


def snapshot(root: Path) -> dict:
    """Every path under root with its kind, bytes' hash and mode: what 'nothing on disk changed' compares."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                         st.st_mode)
    return out


def _error_lines(stderr: str) -> str:
    """stderr without the banners that `train` prints once the run has started ("training RUN on cpu ...",
    "resuming RUN from step N")."""
    return "\n".join(ln for ln in stderr.strip().splitlines()
                     if not ln.startswith(("training ", "resuming "))).strip()


def assert_one_line_error(argv, capsys, root, match=None):
    before = snapshot(root)
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    err = _error_lines(cap.err)
    assert rc != 0, (argv, err)
    assert len(err.splitlines()) == 1, (argv, err)
    assert "Traceback" not in err + cap.out, (argv, err)
    assert err.startswith("ddpmkit: error:") or "error:" in err, (argv, err)
    if match:
        assert match.lower() in err.lower(), (argv, err)
    assert snapshot(root) == before, argv
    return err


def all_finite(ck) -> bool:
    tensors = list(ck.model_state.values()) + list(ck.ema_state.values())
    for st in ck.optimizer_state["state"].values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    return all(torch.isfinite(v).all() for v in tensors if v.is_floating_point())


def poison_at(monkeypatch, steps: set, factor: float = float("nan")):
    """Make training_losses multiply the losses by ``factor`` on the given (1-based) training steps."""
    real = diffusion_task.training_losses
    calls = {"n": 0}

    def poisoned(model, schedule, x0, **kw):
        losses, t = real(model, schedule, x0, **kw)
        calls["n"] += 1
        return (losses * factor if calls["n"] in steps else losses), t

    monkeypatch.setattr(diffusion_task, "training_losses", poisoned)
    return calls


# ================================================================================= crash safety
@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path):
    # `ddpmkit train` killed by SIGKILL at random moments (inside a step, a save or the pruning of old
    # checkpoints: --keep 2), resumed after each kill: every checkpoint on disk verifies, a resume loses at
    # most the checkpoint interval, and the finished run equals an uninterrupted one bit for bit.
    path = Path(__file__).parents[1] / "bench" / "crash_safety.py"
    spec = importlib.util.spec_from_file_location("crash_safety", path)
    cs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cs)
    r = cs.run_crash_safety(tmp_path, kills=2, steps=120, checkpoint_every=2, max_delay=0.5, seed=1, keep=2,
                            log=lambda *a: None)
    assert not r["done_early"] and r["kills"] == 2  # each process died of the SIGKILL, not finished before it
    assert r["resumes_ok"] == r["resumes"] == 2
    assert r["unreadable"] == 0
    assert 0 <= r["max_lost"] <= 2
    assert r["equal"] and r["max_abs_diff"] == 0.0 and r["final_steps"] == (120, 120)


# ================================================================================= numerical faults
def _state_copy(tr):
    return ({k: v.clone() for k, v in tr.model.state_dict().items()},
            {k: v.clone() for k, v in tr.ema.state_dict().items()},
            {i: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in st.items()}
             for i, st in tr.optimizer.state_dict()["state"].items()},
            tr.ema.num_updates)


def _same(a, b):
    for x, y in zip(a[:2], b[:2]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    for i in a[2]:
        for n in a[2][i]:
            assert torch.equal(torch.as_tensor(a[2][i][n]), torch.as_tensor(b[2][i][n])), (i, n)
    assert a[3] == b[3]


@pytest.mark.parametrize("factor,what", [(float("nan"), "loss became nan"), (float("inf"), "loss became inf"),
                                         (1e9, "gradient norm exploded")])
def test_skip_nonfinite_skips_the_step_entirely(tmp_path, monkeypatch, factor, what):
    logs = []
    tr = Trainer(tiny_cfg(skip_nonfinite=True, lr=1e-2, warmup=0), tmp_path / "run", quiet=True, log=logs.append)
    tr.train_step()
    tr.train_step()
    before = _state_copy(tr)
    poison_at(monkeypatch, {1}, factor)
    tr.train_step()  # step 3 is poisoned
    assert tr.step == 3 and tr.skipped_steps == 1 and tr.last_step_skipped
    _same(before, _state_copy(tr))  # no optimizer step, no EMA update
    assert all(p.grad is None for p in tr.model.parameters())  # gradients dropped
    assert len(logs) == 1 and what in logs[0] and "step 3" in logs[0] and "skipped" in logs[0]
    tr.train_step()  # and training goes on
    assert tr.step == 4 and not tr.last_step_skipped


def test_skipped_step_keeps_data_and_random_streams_aligned(tmp_path, monkeypatch):
    # The skipped step consumes its batch and noise like any step, so after it the data order and every
    # random stream are where an unfaulted run's are at the same step.
    clean = Trainer(tiny_cfg(), tmp_path / "a", quiet=True)
    for _ in range(4):
        clean.train_step()
    faulty = Trainer(tiny_cfg(skip_nonfinite=True), tmp_path / "b", quiet=True, log=lambda m: None)
    poison_at(monkeypatch, {2})
    for _ in range(4):
        faulty.train_step()
    assert faulty.skipped_steps == 1 and faulty.step == clean.step == 4
    assert torch.equal(faulty.gen.get_state(), clean.gen.get_state())
    fb, cb = faulty.batcher.state_dict(), clean.batcher.state_dict()
    assert fb.keys() == cb.keys()
    for k in fb:
        assert torch.equal(torch.as_tensor(fb[k]), torch.as_tensor(cb[k])), k
    ca, fa = clean._train_state(), faulty._train_state()
    assert torch.equal(ca["torch_rng"], fa["torch_rng"])


def test_skip_nonfinite_run_saves_only_finite_checkpoints(tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison_at(monkeypatch, {3, 4, 5})  # a whole metrics window and a checkpoint step are poisoned
    logs = []
    res = Trainer(tiny_cfg(steps=8, keep=10, skip_nonfinite=True), run, quiet=True, log=logs.append).run()
    assert res["step"] == 8
    assert sum("skipped" in m for m in logs) == 3
    cks = list_checkpoints(run)
    assert [p.name for p in cks] == [f"step_{s:09d}" for s in (2, 4, 6, 8)]
    for p in cks:
        ck = load_checkpoint(p)
        assert all_finite(ck), p
    assert load_checkpoint(run).train_state["skipped_steps"] == 3
    # metrics.csv: the skipped steps' losses stay out of it; the window of steps 3-4 has no loss at all
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    losses = {int(r[0]): float(r[1]) for r in rows}
    assert math.isfinite(losses[2]) and math.isfinite(losses[6]) and math.isfinite(losses[8])
    # a resume carries the count on
    poison_at(monkeypatch, {1})
    tr = Trainer(tiny_cfg(steps=9, keep=10, skip_nonfinite=True), run, resume=True, quiet=True,
                 log=lambda m: None)
    tr.run()
    assert load_checkpoint(run).train_state["skipped_steps"] == 4


@pytest.mark.parametrize("factor,what", [(float("nan"), "loss became nan"), (1e30, "gradient norm")])
def test_fault_without_skip_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, factor, what):
    # A fault on the first step after a resume (step 5): one line naming the fault, the step and the way out;
    # no checkpoint after it, and those before it unchanged, byte for byte, and finite.
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "4", "--checkpoint-every", "2"] + TINY) == 0
    before = snapshot(run / "checkpoints")
    poison_at(monkeypatch, {1}, factor)
    capsys.readouterr()
    rc = main(["train", "--out", str(run), "--resume", "--steps", "8", "--quiet"])
    err = _error_lines(capsys.readouterr().err)
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert what in err and "at step 5" in err and "--skip-nonfinite" in err
    assert snapshot(run / "checkpoints") == before
    cks = list_checkpoints(run)
    assert [p.name for p in cks] == ["step_000000002", "step_000000004"]  # nothing saved after the fault
    for p in cks:
        verify_checkpoint(p)
        assert all_finite(load_checkpoint(p))
    # the same through the Python API: NonFiniteError
    poison_at(monkeypatch, {1}, factor)
    with pytest.raises(NonFiniteError, match=f"{what}.* at step 5"):
        Trainer(tiny_cfg(steps=8), run, resume=True, quiet=True).run()


def test_skip_nonfinite_flag_through_the_cli(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    poison_at(monkeypatch, {3})
    rc = main(["train", "--out", str(run), "--steps", "4", "--checkpoint-every", "2", "--skip-nonfinite"] + TINY)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "warning: the loss became nan at step 3; step skipped (1 skipped so far)" in err
    ck = load_checkpoint(run)
    assert ck.step == 4 and all_finite(ck) and ck.train_state["skipped_steps"] == 1


def test_exploding_gradient_threshold_is_far_above_healthy_norms(tmp_path):
    tr = Trainer(tiny_cfg(lr=2e-3, warmup=0), tmp_path / "run", quiet=True)
    norms = [tr.train_step()[2].item() for _ in range(5)]
    assert max(norms) < train_mod.MAX_GRAD_NORM / 1e3


# ================================================================================= disk faults
@pytest.mark.parametrize("err_no", [errno.ENOSPC, errno.EROFS])
def test_save_failing_midway_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys, err_no):
    run = tmp_path / "run"
    real = C.atomic_write_bytes

    def failing(path, data, **kw):
        path = Path(path)
        # the checkpoint of step 4: its second file is cut off half way, as a full disk would
        if "step_000000004" in path.parent.name and path.name == "ema.safetensors":
            with open(path, "wb") as f:
                f.write(bytes(memoryview(data).cast("B")[: len(data) // 2]))
            raise OSError(err_no, os.strerror(err_no), str(path))
        return real(path, data, **kw)

    monkeypatch.setattr(C, "atomic_write_bytes", failing)
    rc = main(["train", "--out", str(run), "--steps", "6", "--checkpoint-every", "2"] + TINY)
    err = _error_lines(capsys.readouterr().err)
    assert rc != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    reason = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system"}[err_no]
    assert reason in err and "step 4" in err and "untouched" in err, err
    # the previous checkpoint is intact and loadable, no half-written one is left behind
    assert [p.name for p in list_checkpoints(run)] == ["step_000000002"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000002"]
    verify_checkpoint(run / "checkpoints" / "step_000000002")
    assert load_checkpoint(run).step == 2
    # once the disk has room again, the run resumes from it and finishes
    monkeypatch.setattr(C, "atomic_write_bytes", real)
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert load_checkpoint(run).step == 6


# ================================================================================= bad input table
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished one-step runs of different architectures."""
    root = tmp_path_factory.mktemp("runs")
    tiny_run(root, "a", steps=1)
    tiny_run(root, "b", steps=1, base_channels=12, num_groups=4)
    return root


def _png(path: Path, size=12, color=(200, 10, 10)):
    from PIL import Image

    Image.new("RGB", (size, size), color).save(path)


def test_bad_data_paths(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("not an image")
    (texts / "data.csv").write_text("1,2,3")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    _png(corrupt / "good.png")
    (corrupt / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "out"
    cases = [
        (["--data", str(tmp_path / "nowhere")], "nowhere"),  # a missing data path
        (["--data", str(empty)], None),  # an empty folder
        (["--data", str(texts)], None),  # a folder of non-images
        (["--data", str(corrupt), "--strict"], "bad.png"),  # a corrupt image with --strict
    ]
    for extra, match in cases:
        assert_one_line_error(["train", "--out", str(out), "--steps", "1"] + TINY + extra, capsys, tmp_path, match)
        assert not out.exists()


@pytest.mark.parametrize("extra,match", [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--image-size", "10", "--channel-mults", "1,2,2"], None),  # an image size the U-Net cannot take
    (["--image-size", "0"], "--image-size"),
    (["--T", "0"], "--T"),
    (["--lr", "nan"], "--lr"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--sample-steps", "41"], "exceeds"),  # more sampling steps than T
    (["--schedule", "quadratic"], "schedule"),
    (["--objective", "score"], "objective"),
    (["--precision", "fp8"], "precision"),
    (["--device", "cuda:99" if not torch.cuda.is_available() else "nonsense"], None),
    (["--preset", "imagenet"], None),  # an unknown preset
    (["--channel-mults", "1,x"], None),
])
def test_bad_training_flags(tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    assert_one_line_error(["train", "--out", str(out)] + TINY + extra, capsys, tmp_path, match)
    assert not out.exists()


def test_bad_sampling_flags(runs, capsys):
    a = runs / "a"
    for extra, match in [
        (["--sampler", "ddim", "--steps", "0"], "--steps"),
        (["--sampler", "ddim", "--steps", "41"], "--steps"),  # more than T
        (["--sampler", "ddim", "--eta", "-1"], "--eta"),
        (["--sampler", "euler"], "sampler"),  # an unknown sampler
        (["--spacing", "cubic"], "spacing"),
        (["--batch-size", "0"], "--batch-size"),
        (["--n", "0"], "--n"),
        (["--sampler", "unipc", "--order", "4"], "--order"),  # outside the option's declared range
        (["--sampler", "unipc", "--order", "0"], "--order"),
    ]:
        assert_one_line_error(["sample", str(a), "--quiet", "--out", str(runs / "s")] + extra, capsys, runs, match)
    assert_one_line_error(["sample", str(runs)], capsys, runs)  # the folder that holds runs is not one


def _parsers(parser):
    """The parser and every subparser below it."""
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_matches_an_abbreviated_flag(tmp_path, capsys):
    from ddpmkit.cli import build_parser

    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 10 and all(not p.allow_abbrev for p in parsers)
    # --log-e is not --log-every, --samp not --sampler: refused in one line, nothing written
    assert_one_line_error(["train", "--out", str(tmp_path / "out"), "--log-e", "5"] + TINY, capsys,
                          tmp_path, "--log-e")
    assert_one_line_error(["sample", str(tmp_path), "--samp", "ddim"], capsys, tmp_path, "--samp")
    assert not (tmp_path / "out").exists()


def test_the_benchmarks_parsers_match_no_abbreviated_flag():
    bench = Path(__file__).resolve().parent.parent / "bench"
    for path in sorted(bench.glob("*.py")):
        text = path.read_text()
        made = text.count("argparse.ArgumentParser(")
        assert text.count("allow_abbrev=False") == made, path.name


def test_run_dir_that_is_not_a_run(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    bad_cfg = tmp_path / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text("{not json")
    for argv in (["sample", str(plain)], ["sample", str(tmp_path / "missing")], ["sample", str(bad_cfg)],
                 ["eval", "nll", str(plain)],
                 ["train", "--out", str(plain), "--resume"] + TINY,
                 ["train", "--out", str(bad_cfg), "--resume"] + TINY):
        assert_one_line_error(argv, capsys, tmp_path)


def test_run_with_only_corrupt_checkpoints(runs, tmp_path, capsys):
    work = tmp_path / "a"
    shutil.copytree(runs / "a", work)
    ck = list_checkpoints(work)[-1] / "model.safetensors"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    ck.write_bytes(bytes(data))
    for argv in (["sample", str(work), "--quiet", "--out", str(tmp_path / "s")],
                 ["train", "--out", str(work), "--resume", "--steps", "3", "--quiet"],
                 ["train", "--out", str(tmp_path / "never-made"), "--resume", "--steps", "3"] + TINY):
        assert_one_line_error(argv, capsys, tmp_path)


def test_checkpoint_from_a_different_architecture(runs, tmp_path, capsys):
    work = tmp_path / "a"
    shutil.copytree(runs / "a", work)
    foreign = list_checkpoints(runs / "b")[-1]
    # (`sample A --checkpoint B/checkpoints/step_N` is not an error: a checkpoint inside a run is read with
    # its own run's configuration.) b's checkpoint taken out of its run and handed in, then planted as a's
    # newest checkpoint:
    loose = tmp_path / "loose" / foreign.name
    shutil.copytree(foreign, loose)
    assert_one_line_error(["sample", str(work), "--checkpoint", str(loose), "--quiet", "--out",
                           str(tmp_path / "s")], capsys, tmp_path)
    own = work / "checkpoints" / foreign.name  # the same step, so that it is a valid checkpoint of that step
    shutil.rmtree(own)
    shutil.copytree(foreign, own)
    assert_one_line_error(["sample", str(work), "--quiet", "--out", str(tmp_path / "s")], capsys, tmp_path)
    assert_one_line_error(["train", "--out", str(work), "--resume", "--steps", "6", "--quiet"], capsys, tmp_path)


def test_refuses_to_overwrite_without_resume(runs, tmp_path, capsys):
    # a finished run, and a folder with something else in it: both left exactly as they were
    work = tmp_path / "a"
    shutil.copytree(runs / "a", work)
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    for out in (work, other):
        err = assert_one_line_error(["train", "--out", str(out), "--steps", "2"] + TINY, capsys, tmp_path,
                                    "already exists")
        assert "--resume" in err
    assert sorted(p.name for p in other.iterdir()) == ["precious.txt"]


def test_unwritable_out(tmp_path, monkeypatch, capsys):
    # root ignores permission bits, so the refusal of the file system is simulated where directories are made
    parent = tmp_path / "ro"
    parent.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(parent)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    err = assert_one_line_error(["train", "--out", str(parent / "run"), "--steps", "1"] + TINY, capsys, tmp_path)
    assert "ermission" in err


def _cifar_archive(path: Path) -> Path:
    import io
    import pickle
    import tarfile

    import numpy as np

    def batch(n):
        return {b"data": np.zeros((n, 3072), dtype=np.uint8), b"labels": [0] * n}

    with tarfile.open(path, "w:gz") as tar:
        for name, n in [("data_batch_%d" % i, 2) for i in range(1, 6)] + [("test_batch", 2)]:
            raw = pickle.dumps(batch(n), protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_cifar_archive_with_bad_md5(tmp_path, monkeypatch, capsys):
    pytest.importorskip("numpy")
    server = tmp_path / "server"
    server.mkdir()
    src = _cifar_archive(server / "cifar-10-python.tar.gz")
    monkeypatch.setattr(D, "CIFAR10_URL", src.as_uri())
    monkeypatch.setattr(D, "CIFAR10_MD5", "0" * 32)
    data = tmp_path / "data"
    data.mkdir()
    argv = ["train", "--out", str(tmp_path / "out"), "--steps", "1", "--data", "cifar10", "--channels", "3",
            "--data-dir", str(data), "--download"] + TINY
    assert_one_line_error(argv, capsys, tmp_path, "MD5")  # a download with a bad MD5 is discarded
    shutil.copy(src, data / src.name)
    assert_one_line_error(argv, capsys, tmp_path, "MD5")  # an archive already there is refused and kept


def test_download_that_cannot_reach_the_host(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "CIFAR10_URL", (tmp_path / "unreachable" / "cifar-10-python.tar.gz").as_uri())
    data = tmp_path / "data"
    data.mkdir()
    argv = ["train", "--out", str(tmp_path / "out"), "--steps", "1", "--data", "cifar10", "--channels", "3",
            "--data-dir", str(data), "--download"] + TINY
    assert_one_line_error(argv, capsys, tmp_path, "could not download")
    # and without --download, a missing CIFAR-10 says where to put it
    assert_one_line_error(argv[:-len(TINY) - 1] + TINY, capsys, tmp_path, "cifar")


def test_sampling_retries_out_of_memory_with_smaller_batches(tmp_path, monkeypatch):
    import ddpmkit.samplers.batches as batches
    from ddpmkit.generate import SampleOptions, generate

    run = tiny_run(tmp_path, steps=1)
    opts = SampleOptions(sampler="ddim", steps=3, n=7, batch_size=8)
    plenty = generate(run, tmp_path / "plenty", opts, progress=False)
    real = batches.sample
    sizes = []

    def small_memory(denoiser, x_T, **kw):
        sizes.append(x_T.shape[0])
        if x_T.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(denoiser, x_T, **kw)

    monkeypatch.setattr(batches, "sample", small_memory)
    messages = []
    res = generate(run, tmp_path / "s", opts, progress=False, log=messages.append)
    assert sizes[:3] == [7, 4, 2] and sum(s for s in sizes if s <= 3) == 7
    assert any("retrying with batch size 4" in m for m in messages)
    assert len(list((tmp_path / "s").glob("sample_*.png"))) == 7 and res["images"].shape[0] == 7
    assert torch.equal(res["images"], plenty["images"])  # the retry does not change the images


def test_sampling_memory_is_bounded_by_the_grid(tmp_path, monkeypatch):
    import ddpmkit.generate as gen
    from ddpmkit.generate import SampleOptions, generate
    run = tiny_run(tmp_path, steps=1)
    monkeypatch.setattr(gen, "GRID_MAX", 5)
    res = generate(run, tmp_path / "s", SampleOptions(sampler="ddim", steps=2, n=12, batch_size=4), progress=False)
    assert res["images"].shape[0] == 5  # only the grid's samples are held
    assert len(list((tmp_path / "s").glob("sample_*.png"))) == 12
