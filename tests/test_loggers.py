"""`--log tensorboard` and `--log wandb`: what each backend holds, read back by the backend's own reader, against
the run's metrics.csv, sample grids and config.json; a resume that continues the same curves; the refusals."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line, tiny_flags
from PIL import Image

from ddpmkit.cli import build_parser, main
from ddpmkit.train.config import TrainConfig, config_from_preset, train_arguments
from ddpmkit.train.loggers import _reachable, wandb_mode
from ddpmkit.train.settings import locked_settings

# a tiny run of 6 steps: a metrics.csv row every 2 steps, a sample grid of 4 every 2, a checkpoint every 2, and a
# Frechet distance at step 3 (its row comes between the others) and at the end
RUN = dict(steps=6, log_every=2, sample_every=2, num_samples=4, checkpoint_every=2, eval_every=3, eval_n=8,
           eval_steps=2, lr=1e-3, warmup=100, lr_decay="none")


def train(out, *extra, **settings) -> int:
    return main(["train", "--out", str(out), *tiny_flags(**{**RUN, **settings}), *extra])


def metrics(run) -> dict[str, dict[int, float]]:
    """metrics.csv as {column: {step: value}}, blank cells left out (read with the csv module alone)."""
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    table = {c: {int(r["step"]): float(r[c]) for r in rows if r[c] != ""} for c in rows[0] if c != "step"}
    return {c: values for c, values in table.items() if values}


def grids(run) -> dict[int, np.ndarray]:
    """The run's sample grids as RGB pixels, by step."""
    out = {}
    for p in sorted((run / "samples").glob("grid_step_*.png")):
        with Image.open(p) as im:
            out[int(p.stem.rsplit("_", 1)[1])] = np.asarray(im.convert("RGB"))
    return out


def assert_curves_equal(curves: dict[str, list[tuple[int, float]]], run, columns=None) -> None:
    """Each metrics.csv column (or ``columns``) is a curve of the same name with one point per row, at the row's
    step, of the row's value (metrics.csv writes 6 significant digits)."""
    table = metrics(run)
    for c in columns or table:
        points = curves[c]
        assert [s for s, _ in points] == sorted(table[c]), (c, points, table[c])
        assert [v for _, v in points] == pytest.approx([table[c][s] for s, _ in points], rel=1e-5), c


# ------------------------------------------------------------------------------------------ TensorBoard
def tensorboard(run):
    """RUN/tensorboard read by TensorBoard's own reader, every event kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def tb_curves(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_images(acc) -> list[tuple[int, np.ndarray]]:
    return [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
            for e in acc.Images("samples")]


def tb_hparams(acc) -> dict:
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    return {k: v.string_value if v.HasField("string_value") else v.number_value if v.HasField("number_value")
            else v.bool_value for k, v in start.session_start_info.hparams.items()}


def test_tensorboard_holds_metrics_csv_the_grids_and_the_settings(tmp_path):
    run = tmp_path / "run"
    assert train(run, "--log", "tensorboard") == 0
    acc = tensorboard(run)
    table = metrics(run)
    assert set(table["loss"]) == {2, 3, 4, 6} and set(table["fd"]) == {3, 6}  # every kind of row is there
    curves = tb_curves(acc)
    assert set(curves) == set(table)  # every column with a value: loss, lr, grad_norm, img_per_s, loss_t*, fd...
    assert_curves_equal(curves, run)
    images = tb_images(acc)
    pictures = grids(run)
    assert [s for s, _ in images] == sorted(pictures) == [2, 4, 6]
    for step, pixels in images:
        assert np.array_equal(pixels, pictures[step]), step
    hp = tb_hparams(acc)
    stored = json.loads((run / "config.json").read_text())["train"]
    assert set(hp) == set(stored)
    assert hp["steps"] == 6 and hp["batch_size"] == 8 and hp["schedule"] == "linear" and hp["log"] == "tensorboard"
    assert hp["channel_mults"] == "1,2" and hp["autoencoder"] == "none"
    assert not (run / "wandb").exists()


# ------------------------------------------------------------------------------------------ W&B
def wandb_records(run_folder) -> list[dict]:
    """The records of an offline W&B run folder, read by W&B's own reader: `wandb leet inspect --json` (recent
    W&B), else the datastore module of the Python SDK (older W&B), as {"type": ..., ...}."""
    files = list(run_folder.glob("run-*.wandb"))
    assert len(files) == 1, files
    try:
        from wandb.proto import wandb_internal_pb2 as pb
        from wandb.sdk.internal import datastore
    except ImportError:
        env = {**os.environ, "WANDB_CACHE_DIR": str(run_folder.parent / "cache")}
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(files[0]), "--json"],
                             capture_output=True, text=True, check=True, timeout=120, env=env).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]
    ds = datastore.DataStore()
    ds.open_for_scan(str(files[0]))
    records = []
    while (data := ds.scan_data()) is not None:
        r = pb.Record()
        r.ParseFromString(data)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            records.append({"type": "history", "history": {"item": {i.key or "/".join(i.nested_key):
                                                                    json.loads(i.value_json) for i in r.history.item},
                                                           "step": {"num": r.history.step.num}}})
        elif kind == "run":
            records.append({"type": "run", "run": {"run_id": r.run.run_id, "config": {"update": {
                i.key: json.loads(i.value_json) for i in r.run.config.update}}}})
    return records


def wandb_history(records) -> dict[int, dict]:
    out = {}
    for r in records:
        if r["type"] == "history":
            out.setdefault(r["history"]["step"]["num"], {}).update(r["history"]["item"])
    return out


def offline_runs(run):
    return sorted((run / "wandb").glob("offline-run-*"))


def test_wandb_offline_holds_metrics_csv_the_grids_and_the_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = tmp_path / "run"
    capsys.readouterr()
    assert train(run, "--log", "wandb") == 0
    [folder] = offline_runs(run)
    said = [line for line in capsys.readouterr().err.splitlines() if "W&B" in line]
    assert said == [f"W&B is offline (WANDB_MODE=offline): the run is in {folder}; `wandb sync {folder}` uploads it"]
    run_id = (run / "wandb" / "run_id").read_text().strip()
    assert folder.name.endswith("-" + run_id)
    records = wandb_records(folder)
    [start] = [r["run"] for r in records if r["type"] == "run"]
    assert start["run_id"] == run_id
    config = {k: v for k, v in start["config"]["update"].items() if not k.startswith("_")}
    assert config == json.loads((run / "config.json").read_text())["train"]
    history = wandb_history(records)
    curves = {}
    for step in sorted(history):
        for k, v in history[step].items():
            if not k.startswith(("_", "samples")):
                curves.setdefault(k, []).append((step, v))
    assert set(curves) == set(metrics(run))
    assert_curves_equal(curves, run)
    pictures = grids(run)
    shown = {s: h["samples.path"] for s, h in history.items() if "samples.path" in h}
    assert sorted(shown) == sorted(pictures) == [2, 4, 6]
    for step, path in shown.items():
        with Image.open(folder / "files" / path) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), pictures[step]), step
    assert not (run / "tensorboard").exists()


# ------------------------------------------------------------------------------------------ resume
def test_a_resume_continues_the_same_curves(tmp_path, monkeypatch, capsys):
    """A session stopped after step 6's row but before its checkpoint (step 6's checkpoint removed): the resume
    from step 4, at another learning rate, logs steps 6 and 8 again; TensorBoard keeps only the new points, and W&B
    continues the same run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    assert train(run, "--log", "tensorboard", "--log", "wandb", eval_every=0) == 0
    first = metrics(run)["loss"]
    shutil.rmtree(run / "checkpoints" / "step_000000006")
    assert main(["train", "--out", str(run), "--resume", "--steps", "8", "--lr", "5e-4", "--quiet"]) == 0
    table = metrics(run)
    assert sorted(table["loss"]) == [2, 4, 6, 8] and table["loss"][6] != first[6]  # step 6 trained again, otherwise
    acc = tensorboard(run)
    assert_curves_equal(tb_curves(acc), run)  # each step once, the resumed session's value
    assert [s for s, _ in tb_images(acc)] == [2, 4, 6, 8]
    # TensorBoard reads a tag's first metadata only: its hparams stay those the log began with
    assert tb_hparams(acc)["lr"] == pytest.approx(1e-3) and tb_hparams(acc)["steps"] == 6
    sessions = offline_runs(run)
    run_id = (run / "wandb" / "run_id").read_text().strip()
    # one W&B run in two sessions, a folder each (named by the second it began and the id; W&B adds "-1" to the second
    # folder when both began in the same second), sorted by name: the resumed session last
    ids = [[r["run"]["run_id"] for r in wandb_records(s) if r["type"] == "run"] for s in sessions]
    assert ids == [[run_id], [run_id]], (ids, run_id, [s.name for s in sessions])
    records = wandb_records(sessions[1])
    [start] = [r["run"] for r in records if r["type"] == "run"]
    assert start["run_id"] == run_id and start["config"]["update"]["lr"] == 5e-4  # W&B's config is the session's
    resumed = wandb_history(records)
    assert sorted(resumed) == [6, 8]
    assert [resumed[s]["loss"] for s in (6, 8)] == pytest.approx([table["loss"][6], table["loss"][8]], rel=1e-5)


def test_a_resume_may_add_or_drop_a_backend(tmp_path):
    assert "log" not in locked_settings(TrainConfig)
    run = tmp_path / "run"
    assert train(run, eval_every=0, steps=2) == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--log", "tensorboard", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["log"] == ["tensorboard"]
    assert [s for s, _ in tb_curves(tensorboard(run))["loss"]] == [4]  # from the resumed step on
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--quiet"]) == 0  # kept when not given
    assert [s for s, _ in tb_curves(tensorboard(run))["loss"]] == [4, 6]
    assert main(["train", "--out", str(run), "--resume", "--steps", "8", "--log", "none", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["log"] == []
    assert [s for s, _ in tb_curves(tensorboard(run))["loss"]] == [4, 6]


# ------------------------------------------------------------------------------------------ the other tasks
def test_the_autoencoder_and_a_distillation_log_too(tmp_path, teacher):
    ae = tmp_path / "ae"
    assert main(["autoencoder", "train", "--out", str(ae), "--image-size", "16", "--factor", "4", "--base-channels",
                 "8", "--num-groups", "4", "--latent-channels", "2", "--batch-size", "8", "--steps", "2",
                 "--log-every", "1", "--num-samples", "2", "--log", "tensorboard", "--quiet"]) == 0
    acc = tensorboard(ae)
    assert_curves_equal(tb_curves(acc), ae, ["loss", "rec", "kl", "lr"])
    assert [s for s, _ in tb_images(acc)] == [2]
    student = tmp_path / "student"
    assert main(["distill", str(teacher), "--out", str(student), "--steps", "2", "--teacher-steps", "4",
                 "--round-steps", "2", "--batch-size", "16", "--log-every", "1", "--log", "tensorboard",
                 "--quiet"]) == 0
    acc = tensorboard(student)
    assert_curves_equal(tb_curves(acc), student, ["loss", "lr", "grad_norm"])
    assert tb_hparams(acc)["teacher"] == json.loads((student / "config.json").read_text())["train"]["teacher"]


@pytest.mark.slow
def test_under_torchrun_rank_0_alone_logs(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "-m", "ddpmkit", "train", "--out", str(run), *tiny_flags(**{**RUN, "eval_every": 0}),
                        "--log-to", "tensorboard", "--log-to", "wandb"], env=env, capture_output=True, text=True,
                       timeout=300)  # --log-to: torchrun's parser would read --log as its own --log-dir
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer: a file per process
    assert len(offline_runs(run)) == 1 and r.stderr.count("W&B is offline") == 1
    assert_curves_equal(tb_curves(tensorboard(run)), run)


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_missing_backend_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, backend, teacher):
    monkeypatch.setitem(sys.modules, backend, None)  # `import tensorboard` (or wandb) now raises ImportError
    install = f"pip install 'ddpmkit[{backend}]'"
    for argv in (["train", "--out", str(tmp_path / "run"), *tiny_flags()],
                 ["autoencoder", "train", "--out", str(tmp_path / "run"), "--quiet"],
                 ["distill", str(teacher), "--out", str(tmp_path / "run"), "--steps", "2", "--teacher-steps", "4",
                  "--quiet"]):
        capsys.readouterr()
        assert main([*argv, "--log", backend]) != 0, argv
        one_error_line(capsys, f"--log {backend}", install)
        assert not (tmp_path / "run").exists(), argv


def test_a_missing_backend_on_a_resume_changes_nothing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert train(run, eval_every=0, steps=2) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.setitem(sys.modules, "wandb", None)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--log", "wandb", "--quiet"]) != 0
    one_error_line(capsys, "pip install 'ddpmkit[wandb]'")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_unknown_backend_is_one_line_with_the_choices(tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), *tiny_flags(), "--log", "tensorbored"]) != 0
    one_error_line(capsys, "'tensorbored'", "tensorboard or wandb")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ the setting
def test_the_flag_repeats_and_the_run_is_given_again():
    parse = build_parser().parse_args
    assert parse(["train", "--log", "tensorboard", "--log", "wandb,tensorboard"]).log == ("tensorboard", "wandb")
    assert parse(["train", "--log", "none"]).log == () and parse(["train"]).log is None
    for sub in (["autoencoder", "train"], ["distill", "R", "--out", "D"]):
        assert parse([*sub, "--log", "wandb"]).log == ("wandb",), sub
        assert parse([*sub, "--log-to", "wandb", "--log", "tensorboard"]).log == ("wandb", "tensorboard"), sub
    cfg = config_from_preset("digits", log=("tensorboard", "wandb"))
    args = train_arguments(cfg)
    assert args[-4:] == ["--log", "tensorboard", "--log", "wandb"]
    assert parse(["train", *args]).log == cfg.log


# ------------------------------------------------------------------------------------------ W&B offline or not
def test_wandb_goes_offline_without_a_key_or_a_network(tmp_path):
    def never(host, port):
        raise AssertionError("the network was asked")

    assert wandb_mode({"WANDB_MODE": "online"}, never) == ("online", "WANDB_MODE=online")  # the user's choice
    assert wandb_mode({"WANDB_MODE": "disabled"}, never)[0] == "disabled"
    no_key = {"NETRC": str(tmp_path / "absent")}
    assert wandb_mode(no_key, never)[0] == "offline"  # no key: offline, without asking the network
    key = {"WANDB_API_KEY": "k" * 40}
    assert wandb_mode(key, lambda host, port: False) == ("offline", "api.wandb.ai cannot be reached")
    asked = []
    assert wandb_mode(key, lambda host, port: asked.append((host, port)) or True) == ("online", "")
    assert asked == [("api.wandb.ai", 443)]
    netrc = tmp_path / "netrc"
    netrc.write_text("machine wandb.example.org\n  login user\n  password " + "p" * 40 + "\n")
    netrc.chmod(0o600)
    own = {"NETRC": str(netrc), "WANDB_BASE_URL": "http://wandb.example.org"}  # a key in .netrc, for this host
    assert wandb_mode(own, lambda host, port: asked.append((host, port)) or True)[0] == "online"
    assert asked[-1] == ("wandb.example.org", 80)
    assert wandb_mode({**own, "WANDB_BASE_URL": "https://other.example.org"}, never)[0] == "offline"


def test_the_reachability_probe_connects():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert _reachable("127.0.0.1", port)
    assert not _reachable("127.0.0.1", port)  # closed now: refused
