"""Issue 21, items 1 and 2: one writer per run (an fcntl lock), and a graceful stop on SIGINT/SIGTERM that writes a
checkpoint from which the run resumes bit-identically. The stop is tested through the real CLI, in a subprocess."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_cfg, tiny_flags, tiny_run

import ddpmkit.train.trainer as train_mod
from ddpmkit.cli import main
from ddpmkit.store.checkpoint import list_checkpoints, load_checkpoint
from ddpmkit.store.lock import LOCK_NAME, RunLock, RunLockedError
from ddpmkit.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _holder_script(run: Path) -> str:
    return (f"import sys, time; from ddpmkit.store.lock import RunLock; RunLock({str(run)!r}).acquire(); "
            "print('locked', flush=True); time.sleep(60)")


# ------------------------------------------------------------------------------------------------ 1. the lock
def test_a_second_writer_is_refused_in_one_line_naming_the_holder(tmp_path, capsys):
    run = tiny_run(tmp_path, steps=2)
    assert (run / LOCK_NAME).is_file()  # left behind by the finished training: it must not block
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(run)], stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        metrics = (run / "metrics.csv").read_bytes()
        capsys.readouterr()
        rc = main(["train", "--out", str(run), "--resume", "--steps", "4", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0
        assert len(err) == 1 and err[0].startswith("ddpmkit: error:"), err
        assert f"pid {holder.pid}" in err[0] and "another process" in err[0]
        assert (run / "metrics.csv").read_bytes() == metrics and len(list_checkpoints(run)) == 1
        # readers take no lock: sampling works while the run is held
        assert main(["sample", str(run), "--n", "2", "--steps", "2", "--quiet", "--out", str(tmp_path / "s")]) == 0
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock went with it, the file left behind does not block
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--quiet"]) == 0
    assert load_checkpoint(run).step == 4


def test_a_stale_lock_file_never_blocks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text("pid 999999 on elsewhere\n")  # a killed process's file, no lock held
    with RunLock(run) as lock:
        assert lock.held
        assert f"pid {os.getpid()}" in (run / LOCK_NAME).read_text()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()  # a second open file description in the same process is refused too
    RunLock(run).acquire().release()


def test_the_trainer_holds_the_lock_only_while_it_runs(tmp_path):
    trainer = Trainer(tiny_cfg(steps=2), tmp_path / "run", quiet=True)
    with pytest.raises(RunLockedError):
        RunLock(tmp_path / "run").acquire()
    trainer.run()
    RunLock(tmp_path / "run").acquire().release()


# ------------------------------------------------------------------------------------------------ 2. the stop
def _signal_at(monkeypatch, step: int, *signums):
    """Send the signals to this process right after training step ``step`` (1-based)."""
    real = train_mod.Trainer.train_step

    def step_then_signal(self):
        out = real(self)
        if self.step == step:
            for s in signums:
                os.kill(os.getpid(), s)
        return out

    monkeypatch.setattr(train_mod.Trainer, "train_step", step_then_signal)


def _needs_handled(signum):
    """Skip where the test process was started with ``signum`` ignored (nohup, or a script's background job): a
    training then rightly leaves it ignored (test_an_ignored_sigint_stays_ignored)."""
    if signal.getsignal(signum) is signal.SIG_IGN:
        pytest.skip(f"{signal.Signals(signum).name} is ignored in this process, as in a background job")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_finishes_the_step_and_saves(tmp_path, monkeypatch, signum):
    _needs_handled(signum)
    _signal_at(monkeypatch, 3, signum)
    before = signal.getsignal(signum)
    res = Trainer(tiny_cfg(steps=50, checkpoint_every=100), tmp_path / "run", quiet=True).run()
    assert res["stop"] == "signal" and res["signal"] == signal.Signals(signum).name
    assert res["step"] == 3 and load_checkpoint(tmp_path / "run").step == 3
    assert res["checkpoint"] == list_checkpoints(tmp_path / "run")[-1]
    assert signal.getsignal(signum) is before  # the handlers are put back


def test_a_second_ctrl_c_aborts_at_once(tmp_path, monkeypatch):
    _needs_handled(signal.SIGINT)
    _signal_at(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="aborted training at once"):
        Trainer(tiny_cfg(steps=50, checkpoint_every=2), tmp_path / "run", quiet=True).run()
    assert load_checkpoint(tmp_path / "run").step == 2  # no new checkpoint; the last complete one is intact
    RunLock(tmp_path / "run").acquire().release()  # and the lock went with the aborted training


def test_an_ignored_sigint_stays_ignored(tmp_path, monkeypatch):
    """A training started with SIGINT ignored (nohup, a background job) keeps ignoring it and trains on."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _signal_at(monkeypatch, 2, signal.SIGINT)
        res = Trainer(tiny_cfg(steps=4, checkpoint_every=100), tmp_path / "run", quiet=True).run()
        assert res["stop"] == "steps" and res["step"] == 4
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def _train_cmd(run: Path, steps: int, *extra) -> list:
    flags = tiny_flags(dropout=0.1, lr=1e-3, warmup=100, log_every=1, checkpoint_every=100000, num_samples=0)
    return [sys.executable, "-m", "ddpmkit", "train", *flags, "--steps", str(steps), "--out", str(run), *extra]


def _all_tensors(run: Path) -> dict:
    ck = load_checkpoint(run)
    out = {f"model.{k}": v for k, v in ck.model_state.items()}
    out.update({f"ema.{k}": v for k, v in ck.ema_state.items()})
    for i, st in ck.optimizer_state["state"].items():
        out.update({f"adam.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_real_cli_stops_on_a_signal_and_resumes_bit_identically(tmp_path, signum):
    N = 400
    straight = tmp_path / "straight"
    r = subprocess.run(_train_cmd(straight, N), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    run = tmp_path / "cut"
    # SIGINT as at a terminal: not ignored in the child (a background job of a script would ignore it)
    p = subprocess.Popen(_train_cmd(run, N), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for a few steps in metrics.csv
            m = run / "metrics.csv"
            if m.exists() and len(m.read_text().splitlines()) > 5:
                break
            time.sleep(0.05)
        p.send_signal(signum)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signum, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("training ", "resuming "))]
    name = signal.Signals(signum).name
    assert lines[-1].startswith(f"ddpmkit: stopped by {name} at step "), err
    stopped = load_checkpoint(run).step
    assert 0 < stopped < N, (stopped, err)
    assert str(run / "checkpoints" / f"step_{stopped:09d}") in lines[-1]
    assert f"resume with: ddpmkit train --out {run} --resume" in lines[-1]
    assert "Traceback" not in err

    r = subprocess.run(_train_cmd(run, N, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _all_tensors(straight), _all_tensors(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # metrics.csv has each step once, in order
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, N + 1))


@pytest.mark.slow
def test_under_torchrun_all_ranks_stop_at_the_same_step(tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop after the same step, rank 0 writes the checkpoint."""
    from test_distributed import _children, _torchrun_cmd

    run = tmp_path / "run"
    flags = tiny_flags(dropout=0, num_samples=0, log_every=1, checkpoint_every=100000)
    p = subprocess.Popen(_torchrun_cmd(*flags, "--steps", "100000", "--out", str(run)), env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = run / "metrics.csv"
            if m.exists() and len(m.read_text().splitlines()) > 5:
                break
            time.sleep(0.05)
        workers = _children(p.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGTERM)  # the later-started worker: rank 1
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    stopped = load_checkpoint(run).step
    assert "ddpmkit: stopped by SIGTERM at step" in err, err[-3000:]
    assert f"at step {stopped};" in err
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps[-1] == stopped
