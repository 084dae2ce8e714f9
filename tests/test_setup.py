"""Issue 21, items 7 to 9: the two commands (`make demo`, `make test`) install what is missing once, the PyTorch
install tries PyTorch's CPU index once and falls back at once, and the progress bars say something true.

CI (.ci/run) runs the two commands themselves in a fresh clone with a fresh virtual environment; these tests check
the Makefile's logic and the install script quickly, without installing anything."""

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import tiny_cfg, tiny_run

ROOT = Path(__file__).resolve().parents[1]


def _copy(tmp_path) -> Path:
    d = tmp_path / "clone"
    d.mkdir()
    for name in ("Makefile", "pyproject.toml", "tools"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / name)
    return d


# The environment of a make run by a user: not the one of an outer make (CI runs this suite by `make test ...`),
# whose variables (PYTHON=..., PYTEST_ARGS=...) and flags would reach the inner one through MAKEFLAGS.
# make also exports its command-line variables to the recipes' environment, where an inner make reads them.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PYTHON", "TORCH", "PYTEST_ARGS",
                          "DEMO_ARGS")}


def _make_n(d: Path, *args) -> str:
    r = subprocess.run(["make", "-n", *args], cwd=d, capture_output=True, text=True, timeout=60, env=CLEAN_ENV)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_and_make_test_install_first_and_only_once(tmp_path):
    d = _copy(tmp_path)
    for target in ("demo", "test"):
        plan = _make_n(d, target)
        assert "install_torch.sh" in plan and 'pip install -e ".[dev]"' in plan, plan
        last = "python3 -m ddpmkit demo" if target == "demo" else "python3 -m pytest -q"
        assert plan.strip().splitlines()[-1] == last
    subprocess.run(["make", "-n", "install"], cwd=d, check=True, capture_output=True, env=CLEAN_ENV)
    stamp = [ln.split("touch ", 1)[1].strip() for ln in _make_n(d, "test").splitlines() if "touch " in ln][0]
    (d / stamp).parent.mkdir(parents=True)
    (d / stamp).touch()
    time.sleep(0.01)
    for target in ("demo", "test"):  # the stamp holds: nothing is installed again
        plan = _make_n(d, target)
        assert "pip" not in plan and "install_torch" not in plan, plan
    # another interpreter (another venv) has its own stamp, and so installs
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=60)
    assert "install_torch.sh" in _make_n(d, "test", f"PYTHON={tmp_path / 'venv' / 'bin' / 'python'}")
    # a changed pyproject.toml installs again
    time.sleep(1.1)
    (d / "pyproject.toml").touch()
    assert "pip install" in _make_n(d, "demo")


def _fake_python(tmp_path) -> Path:
    """A python3 without torch whose pip only logs its arguments; anything else runs the real interpreter."""
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-c" ] && [ "$2" = "import torch" ]; then exit 1; fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> {log}; exit 0; fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    return fake


def _install(tmp_path, index: str) -> tuple[str, float, list]:
    fake = _fake_python(tmp_path)
    env = dict(os.environ, PYTHON=str(fake), TORCH="torch", TORCH_CPU_INDEX=index, TORCH_TIMEOUT="3",
               PATH=f"{tmp_path / 'nogpu'}:/usr/bin:/bin")  # no nvidia-smi on this PATH
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(ROOT / "tools" / "install_torch.sh")], env=env, capture_output=True, text=True,
                       timeout=60)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "pip.log").read_text().splitlines() if (tmp_path / "pip.log").exists() else []
    return r.stdout, seconds, log


def test_an_unreachable_cpu_index_falls_back_at_once_and_says_so(tmp_path):
    out, seconds, pip = _install(tmp_path, "http://127.0.0.1:9/whl/cpu")  # port 9: refused at once
    assert seconds < 10, seconds  # one try, no retries (it was 166 s and 60 retry warnings)
    assert "cannot be reached (one try, 3 s, no retries); installing torch from the default index" in out
    assert "installed from the default index" in out
    assert pip == ["-m pip install torch"]


def test_a_reachable_cpu_index_is_used_once_without_retries(tmp_path):
    (tmp_path / "www" / "whl" / "cpu" / "torch").mkdir(parents=True)
    def handler(*a, **k):
        return http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"), **k)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
        out, _, pip = _install(tmp_path, index)
    finally:
        server.shutdown()
    assert f"from PyTorch's CPU index {index}" in out and "installed from PyTorch's CPU index" in out
    assert pip == [f"-m pip install --index-url {index} --retries 0 --timeout 3 torch"]


# ------------------------------------------------------------------------------------------------ 9. progress
def test_a_time_limited_run_shows_seconds_not_a_million_steps(tmp_path, capsys):
    from ddpmkit.train import Trainer

    Trainer(tiny_cfg(steps=1_000_000, time_limit=1.0, checkpoint_every=1_000_000), tmp_path / "run").run()
    err = capsys.readouterr().err
    assert "1000000" not in err  # it read "0/1000000" with an ETA of 23 hours
    assert "/1 s [" in err and "step " in err


def test_ddpm_sampling_shows_progress_per_step(tmp_path, capsys):
    from ddpmkit.generate import SampleOptions, generate

    run = tiny_run(tmp_path, steps=1)
    generate(run, tmp_path / "s", SampleOptions(sampler="ddpm", n=6, batch_size=4), progress=True, log=lambda m: None)
    err = capsys.readouterr().err
    assert "80/80" in err and "6/6 images" in err  # 2 batches x 40 steps, counted at every network call
