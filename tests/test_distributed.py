"""Training on several processes with torchrun (gloo on CPU): same weights as one process, rank 0 alone
writes, resume across a change of world size, a dead rank takes the job down."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_flags

from ddpmkit.cli import main
from ddpmkit.store.checkpoint import list_checkpoints, load_checkpoint

TINY = tiny_flags(dropout=0, num_samples=0, log_every=1, checkpoint_every=2)

# Measured: the largest difference of any weight between 1 and 2 processes after 4 steps is ~3e-8 (float32
# summation order in the gradient all-reduce), also with --grad-accum 2 on the 2 processes (2 images per
# micro-batch against 8 in one batch on 1 process). 1e-5 leaves a wide margin and still catches any real error
# (a wrong slice of the batch or of the noise moves weights by ~1e-3 at this learning rate).
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun_cmd(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), "-m", "ddpmkit", "train", *args]


def torchrun(*args, nproc=2, timeout=120):
    return subprocess.run(_torchrun_cmd(*args, nproc=nproc), env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def files(run: Path) -> set:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def max_diff(a, b) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    r = torchrun(*TINY, "--steps", "4", "--out", str(d / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["train", *TINY, "--steps", "4", "--out", str(d / "one")]) == 0
    return d


def test_two_ranks_give_the_weights_of_one(runs):
    one, two = load_checkpoint(runs / "one"), load_checkpoint(runs / "two")
    assert one.step == two.step == 4
    assert max_diff(one.model_state, two.model_state) < TOL
    assert max_diff(one.ema_state, two.ema_state) < TOL
    # not vacuous: training moved the weights (they differ from their moving average)
    k = next(k for k in one.model_state if k.endswith("conv_in.weight"))
    assert not torch.equal(one.model_state[k], one.ema_state[k])
    # the data order and the random streams saved are those of a single process
    assert torch.equal(one.train_state["gen"], two.train_state["gen"])
    # the logged loss is that of the whole global batch
    m1 = (runs / "one" / "metrics.csv").read_text().splitlines()
    m2 = (runs / "two" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in m1] == [r.split(",")[0] for r in m2]
    for a, b in zip(m1[1:], m2[1:]):
        assert abs(float(a.split(",")[1]) - float(b.split(",")[1])) < 1e-4


def test_two_ranks_with_grad_accum_give_the_weights_of_one_rank_without(runs):
    # 2 ranks x 2 micro-batches of 2 images against 1 rank x 1 batch of 8: the same weights and logged metrics
    r = torchrun(*TINY, "--steps", "4", "--grad-accum", "2", "--out", str(runs / "two_accum"))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = load_checkpoint(runs / "one"), load_checkpoint(runs / "two_accum")
    assert one.step == two.step == 4
    assert max_diff(one.model_state, two.model_state) < TOL
    assert max_diff(one.ema_state, two.ema_state) < TOL
    assert torch.equal(one.train_state["gen"], two.train_state["gen"])
    m1 = [r.split(",") for r in (runs / "one" / "metrics.csv").read_text().splitlines()[1:]]
    m2 = [r.split(",") for r in (runs / "two_accum" / "metrics.csv").read_text().splitlines()[1:]]
    assert [a[0] for a in m1] == [b[0] for b in m2] == ["1", "2", "3", "4"]
    for a, b in zip(m1, m2):  # loss of the global batch; the gradient norm of its mean (not K times it)
        assert abs(float(a[1]) - float(b[1])) < 1e-4
        assert float(b[3]) == pytest.approx(float(a[3]), rel=1e-4)


def test_only_rank_zero_writes(runs):
    # the same files as a single process: no second config, metrics rows, checkpoints or probe files
    assert files(runs / "two") == files(runs / "one")
    assert [p.name for p in list_checkpoints(runs / "two")] == ["step_000000002", "step_000000004"]
    rows = (runs / "two" / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]


def test_resume_of_a_two_rank_run_on_one_rank(runs):
    assert main(["train", "--out", str(runs / "two"), "--resume", "--steps", "6", "--quiet"]) == 0
    assert main(["train", *TINY, "--steps", "6", "--out", str(runs / "straight")]) == 0
    a, b = load_checkpoint(runs / "two"), load_checkpoint(runs / "straight")
    assert a.step == b.step == 6
    assert max_diff(a.model_state, b.model_state) < TOL
    assert max_diff(a.ema_state, b.ema_state) < TOL
    rows = (runs / "two" / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]


def test_batch_not_divisible_by_the_world_is_one_clear_error(tmp_path):
    args = list(TINY)
    args[args.index("--batch-size") + 1] = "7"
    r = torchrun(*args, "--steps", "2", "--out", str(tmp_path / "run"))
    assert r.returncode != 0
    assert "ddpmkit: error: --batch-size 7 (the global batch) is not divisible by the 2 processes" in r.stderr
    # (torchrun itself then prints its own report of the failed workers, with its launcher's traceback)
    assert "ddpmkit.errors" not in r.stderr and 'trainer.py", line' not in r.stderr and 'loop.py", line' not in r.stderr
    assert not (tmp_path / "run").exists()


def _children(pid: int) -> list:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the worker processes")
def test_killing_a_rank_takes_the_job_down_and_leaves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen(_torchrun_cmd(*TINY, "--steps", "100000", "--out", str(run)), env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list_checkpoints(run) if run.exists() else []) < 2:
            time.sleep(0.2)
        assert list_checkpoints(run), "no checkpoint appeared"
        workers = _children(p.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)  # one worker (the later-started one: rank 1)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    assert "FAILED" in err or "SIGKILL" in err
    ck = load_checkpoint(run)
    assert ck.step >= 2 and ck.step % 2 == 0


def test_an_autoencoder_with_its_discriminator_trains_on_two_ranks_as_on_one(tmp_path):
    """The autoencoder task on the same loop: 2 processes give the weights of 1, the discriminator's and the
    adaptive weight's included (its gradient norms are those of the global batch: averaged over the ranks)."""
    flags = ["--image-size", "16", "--base-channels", "8", "--num-groups", "4", "--batch-size", "8", "--steps", "3",
             "--disc-weight", "0.5", "--disc-start", "1", "--disc-layers", "1", "--disc-channels", "8",
             "--log-every", "1", "--sample-every", "1000", "--num-samples", "0", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "ddpmkit", "autoencoder", "train", *flags, "--out", str(tmp_path / "two")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["autoencoder", "train", *flags, "--out", str(tmp_path / "one")]) == 0
    one, two = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert one.step == two.step == 3
    assert max_diff(one.model_state, two.model_state) < TOL
    assert max_diff(one.ema_state, two.ema_state) < TOL
    d1, d2 = one.train_state["models"]["discriminator"], two.train_state["models"]["discriminator"]
    assert max_diff(d1, d2) < TOL
    # not vacuous: the discriminator updated (from step 1) and the adaptive weight was applied and logged
    import csv

    def rows(name):
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    r1, r2 = rows("one"), rows("two")
    assert float(r1[-1]["d_weight"]) > 0 and float(r1[-1]["d_loss"]) > 0  # d_loss: logged when it updated
    for a, b in zip(r1, r2):  # the loss and the adaptive weight of the global batch, on every rank
        assert abs(float(a["loss"]) - float(b["loss"])) < 1e-4
        assert (a["d_weight"] == b["d_weight"] == "") or float(a["d_weight"]) == pytest.approx(float(b["d_weight"]),
                                                                                             rel=1e-4)
