"""bench/gpu_check.py in --dry mode, on the CPU: every part of the one GPU call runs, so the script cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_runs_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    failed = {k: v for k, v in res.items() if isinstance(v, dict) and "error" in v}
    assert not failed, failed
    assert res["dry"] is True and res["train_flops_per_image"] > 0 and res["matmul_peak"]["bf16_tflops"] > 0
    for kind in ("ddpmkit", "diffusers"):
        for variant in ("fp32", "bf16", "bf16+compile", "fp32+cl", "bf16+cl"):
            row = res[f"train/{kind}/{variant}"]
            assert row["img_per_s"] > 0 and 0 < row["mfu_of_bf16_peak"] < 1, (kind, variant, row)
    assert res["bf16_against_fp32"]["steps"] > 0
    assert set(res["sampling"]) == {"ddim-3", "dpmpp-2m-3"}
    assert res["ddp"]["resumed_to_the_end"] and res["ddp"]["backend"] == "gloo"
    assert "| bf16+compile |" in r.stdout


def test_gpu_check_without_a_gpu_says_to_use_dry(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--dry" in r.stderr and not (tmp_path / "x.json").exists()
