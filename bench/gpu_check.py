"""The GPU path in one call: training throughput, peak memory and MFU beside diffusers, bf16 against fp32, sampling
eager and in a CUDA graph, and the NCCL path of torchrun. One JSON file of figures, and a printed table.

    python bench/gpu_check.py --out bench/results/gpu-<device>.json     # on one GPU: about 5 minutes
    python bench/gpu_check.py --dry                                     # on the CPU: a tiny model, a few steps

What it measures (``--dry`` shrinks every size and step count, so that the whole script runs in seconds on a CPU
and a test keeps it from rotting):
- training, the cifar10 preset's U-Net (35,746,307 parameters) at batch 128: fp32, bf16 autocast, bf16 with
  ``torch.compile``, and each in channels_last; images per second and peak GPU memory; the same step on diffusers'
  ``UNet2DModel`` in the same configuration, in the same process, one after the other;
- model FLOP utilisation: the FLOPs of one training step counted by ``torch.utils.flop_counter`` (forward and
  backward), against the bf16 matmul peak measured here on large square matmuls;
- bf16 against fp32: the same initial weights and batches, 300 steps each; the largest gap between the two smoothed
  loss curves (EMA 0.9) beside the spread of the fp32 curve itself, and the gap of the EMA models' outputs on a
  fixed input;
- sampling, 1,000 CIFAR-size images with DDIM 50 and with dpmpp-2m at 10 steps, eager and with the whole sampler
  loop captured in one CUDA graph (fixed shapes; the samplers draw no host data inside the loop);
- DDP: ``torchrun --nproc_per_node 1 -m ddpmkit train`` (NCCL on CUDA, gloo on the CPU), then a resume of the same
  run under plain python, so that the process-group path has run.

A part that fails records its one-line error in the JSON and the rest still runs: a GPU is lent for minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import warnings  # noqa: E402

import torch  # noqa: E402

# torch.compile's tracing warns about diffusers' internals; the figures are what this script is for
warnings.filterwarnings("ignore", category=UserWarning, module="torch._dynamo")

from ddpmkit.diffusion import Denoiser, NoiseSchedule, training_losses  # noqa: E402
from ddpmkit.models.unet import UNET_PRESETS, UNet  # noqa: E402
from ddpmkit.samplers import sample  # noqa: E402

TINY = dict(image_size=8, in_channels=3, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
            attention_resolutions=[4], dropout=0.1, num_groups=4, num_heads=1)


def sizes(dry: bool) -> dict:
    if dry:
        return dict(model=TINY, batch=4, warmup=1, timed=2, compare_steps=6, n_images=8, matmul=256, ddp_steps=2)
    return dict(model=dict(UNET_PRESETS["cifar10"]), batch=128, warmup=5, timed=20, compare_steps=300,
                n_images=1000, matmul=8192, ddp_steps=20)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attempt(results: dict, key: str, fn, *args, **kw):
    """Run one part; on failure record its one-line error under ``key`` and go on."""
    try:
        results[key] = fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - a part that fails must not cost the other parts
        results[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    print(f"{key}: {json.dumps(results[key])[:400]}", flush=True)


# ---------------------------------------------------------------------------------------------- training


class Diffusers(torch.nn.Module):
    """diffusers' UNet2DModel in our model's configuration, called as our networks are: net(x, t) -> tensor."""

    def __init__(self, model_cfg: dict):
        super().__init__()
        import diffusers

        from ddpmkit.interop.diffusers import diffusers_config_from_unet

        cfg = diffusers_config_from_unet(model_cfg)
        cfg.pop("_class_name", None)
        cfg.pop("_diffusers_version", None)
        self.unet = diffusers.UNet2DModel(**cfg)

    def forward(self, x, t):
        return self.unet(x, t).sample


def make_net(kind: str, model_cfg: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return UNet(**model_cfg) if kind == "ddpmkit" else Diffusers(model_cfg)


def batches(model_cfg: dict, batch: int, count: int, device, seed: int = 1):
    """The same data for every contender: x0 in [-1, 1], t and the noise, drawn on the CPU."""
    g = torch.Generator().manual_seed(seed)
    c, s = model_cfg["in_channels"], model_cfg["image_size"]
    for _ in range(count):
        x0 = torch.rand(batch, c, s, s, generator=g) * 2 - 1
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(batch, c, s, s, generator=g)
        yield x0.to(device), t.to(device), eps.to(device)


def train_step(forward, opt, params, schedule, x0, t, eps, bf16: bool, device) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = training_losses(forward, schedule, x0, t=t, noise=eps)[0].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.detach()


def throughput(kind: str, variant: str, sz: dict, device, dry: bool) -> dict:
    bf16 = variant.startswith("bf16")
    net = make_net(kind, sz["model"]).to(device).train()
    channels_last = variant.endswith("+cl")
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    forward = net
    compile_s = None
    if "compile" in variant:
        forward = torch.compile(net, backend="eager" if dry else "inductor")
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    schedule = NoiseSchedule.linear(1000).to(device)
    data = list(batches(sz["model"], sz["batch"], 1, device))[0]
    if channels_last:
        data = (data[0].contiguous(memory_format=torch.channels_last), data[1], data[2])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(sz["warmup"]):
        train_step(forward, opt, list(net.parameters()), schedule, *data, bf16, device)
    sync(device)
    if "compile" in variant:
        compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(sz["timed"]):
        train_step(forward, opt, list(net.parameters()), schedule, *data, bf16, device)
    sync(device)
    seconds = (time.perf_counter() - t0) / sz["timed"]
    out = {"img_per_s": sz["batch"] / seconds, "step_ms": 1000 * seconds}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if compile_s is not None:
        out["warmup_with_compile_s"] = compile_s
    return out


def train_flops(sz: dict, device) -> float:
    """FLOPs of one training step per image (forward and backward), counted, not estimated by hand."""
    from torch.utils.flop_counter import FlopCounterMode

    net = make_net("ddpmkit", sz["model"]).to(device).train()
    schedule = NoiseSchedule.linear(1000).to(device)
    x0, t, eps = list(batches(sz["model"], sz["batch"], 1, device))[0]
    counter = FlopCounterMode(display=False)
    with counter:
        loss = training_losses(net, schedule, x0, t=t, noise=eps)[0].mean()
        loss.backward()
    return counter.get_total_flops() / sz["batch"]


def matmul_peak(sz: dict, device) -> dict:
    """The bf16 (and fp32) matmul rate measured here: the peak that MFU is a fraction of."""
    n = sz["matmul"]
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        sync(device)
        reps = 3 if device.type == "cpu" else 20
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        out[f"{name}_tflops"] = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    return out


def bf16_against_fp32(sz: dict, device) -> dict:
    """The same weights and batches, fp32 and bf16 autocast; loss curves and EMA outputs compared."""
    schedule = NoiseSchedule.linear(1000).to(device)
    curves, emas = {}, {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        net = make_net("ddpmkit", sz["model"], seed=0).to(device).train()
        ema = copy.deepcopy(net).eval()
        opt = torch.optim.Adam(net.parameters(), lr=2e-4)
        torch.manual_seed(5)  # the dropout masks too
        losses = []
        for x0, t, eps in batches(sz["model"], sz["batch"], sz["compare_steps"], device):
            losses.append(float(train_step(net, opt, list(net.parameters()), schedule, x0, t, eps, bf16, device)))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - 0.999)  # EMA decay 0.999
        curves[name], emas[name] = losses, ema

    def smooth(v, beta=0.9):
        out, m = [], v[0]
        for x in v:
            m = beta * m + (1 - beta) * x
            out.append(m)
        return out

    f, b = smooth(curves["fp32"]), smooth(curves["bf16"])
    skip = len(f) // 10  # past the first tenth, where both fall fastest
    gap = max(abs(x - y) for x, y in zip(f[skip:], b[skip:]))
    raw = curves["fp32"][skip:]
    mean = sum(raw) / len(raw)
    spread = math.sqrt(sum((x - mean) ** 2 for x in raw) / len(raw))
    x = torch.randn(8, sz["model"]["in_channels"], sz["model"]["image_size"], sz["model"]["image_size"],
                    generator=torch.Generator().manual_seed(9)).to(device)
    t = torch.arange(8, device=device) * 120
    with torch.no_grad():
        o32, o16 = emas["fp32"](x, t), emas["bf16"](x, t)
    return {"steps": len(f), "smoothed_loss_gap_max": gap, "fp32_loss_sd": spread,
            "final_loss_fp32": f[-1], "final_loss_bf16": b[-1],
            "ema_output_gap_max": float((o32 - o16).abs().max()), "ema_output_sd": float(o32.std())}


# ---------------------------------------------------------------------------------------------- sampling


def graph_sampler(den, x_T, sampler: str, steps: int):
    """The whole sampler loop captured once in a CUDA graph over a static x_T; returns (run(), output)."""
    static_x = x_T.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (allocations, lazy initialisation)
        sample(den, static_x, sampler=sampler, steps=steps, noise=0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(den, static_x, sampler=sampler, steps=steps, noise=0)

    def run(x):
        static_x.copy_(x)
        graph.replay()
        return out

    return run


def sampling(sz: dict, device, dry: bool) -> dict:
    net = make_net("ddpmkit", {**sz["model"], "dropout": 0.0}).to(device).eval()
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    den = Denoiser(net, NoiseSchedule.linear(1000)).to(device)
    c, s = sz["model"]["in_channels"], sz["model"]["image_size"]
    n = sz["n_images"]
    chunk = min(n, 250 if not dry else n)
    out = {}
    for sampler, steps in (("ddim", 50 if not dry else 3), ("dpmpp-2m", 10 if not dry else 3)):
        x = torch.randn(chunk, c, s, s, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.inference_mode():
            sample(den, x, sampler=sampler, steps=steps, noise=0)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for _ in range(math.ceil(n / chunk)):
                eager = sample(den, x, sampler=sampler, steps=steps, noise=0)
            sync(device)
        row = {"images": n, "steps": steps, "eager_s": time.perf_counter() - t0}
        if device.type == "cuda":
            try:
                with torch.inference_mode():
                    run = graph_sampler(den, x, sampler, steps)
                    graphed = run(x)
                    sync(device)
                    t0 = time.perf_counter()
                    for _ in range(math.ceil(n / chunk)):
                        graphed = run(x)
                    sync(device)
                row["graph_s"] = time.perf_counter() - t0
                row["graph_speedup"] = row["eager_s"] / row["graph_s"]
                row["graph_max_abs_diff"] = float((graphed - eager).abs().max())
            except Exception as e:  # noqa: BLE001
                row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            row["graph"] = "n/a: CUDA graphs need a CUDA device"
        out[f"{sampler}-{steps}"] = row
    return out


# ---------------------------------------------------------------------------------------------- DDP


def ddp(sz: dict, device, dry: bool) -> dict:
    """torchrun with one process (NCCL on CUDA, gloo on the CPU), then a resume under plain python."""
    m = sz["model"]
    flags = ["--image-size", str(m["image_size"]), "--channels", str(m["in_channels"]),
             "--base-channels", str(m["base_channels"]), "--channel-mults", ",".join(map(str, m["channel_mults"])),
             "--num-res-blocks", str(m["num_res_blocks"]),
             "--attention-resolutions", ",".join(map(str, m["attention_resolutions"])) or "none",
             "--num-groups", str(m["num_groups"]), "--batch-size", str(min(sz["batch"], 32)), "--num-samples", "0",
             "--log-every", "1", "--checkpoint-every", str(sz["ddp_steps"]), "--device", device.type, "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        first = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                 "-m", "ddpmkit", "train", "--out", str(run), "--steps", str(sz["ddp_steps"])] + flags
        t0 = time.perf_counter()
        a = subprocess.run(first, capture_output=True, text=True, env=env, timeout=600)
        torchrun_s = time.perf_counter() - t0
        if a.returncode != 0:
            raise RuntimeError(f"torchrun failed: {(a.stderr.strip().splitlines() or [''])[-1]}")
        second = [sys.executable, "-m", "ddpmkit", "train", "--out", str(run), "--resume",
                  "--steps", str(2 * sz["ddp_steps"])] + flags
        b = subprocess.run(second, capture_output=True, text=True, env=env, timeout=600)
        if b.returncode != 0:
            raise RuntimeError(f"the resume failed: {(b.stderr.strip().splitlines() or [''])[-1]}")
        rows = (run / "metrics.csv").read_text().splitlines()[1:]
        last = int(rows[-1].split(",")[0])
    return {"backend": "nccl" if device.type == "cuda" else "gloo", "torchrun_s": torchrun_s,
            "steps_after_resume": last, "resumed_to_the_end": last == 2 * sz["ddp_steps"]}


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="a tiny model and a few steps, on whatever device there is")
    p.add_argument("--out", default=None, metavar="FILE", help="the JSON of figures (default: gpu-check.json)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: train, peer, compare, sample, ddp")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not a.dry:
        print("no CUDA device here: run with --dry for the CPU check, or on a GPU for the figures", file=sys.stderr)
        return 2
    skip = {s for s in a.skip.split(",") if s}
    sz = sizes(a.dry)
    if a.dry:
        torch.set_num_threads(1)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "dry": a.dry, "batch": sz["batch"],
           "model_parameters": sum(p.numel() for p in make_net("ddpmkit", sz["model"]).parameters())}
    attempt(res, "matmul_peak", matmul_peak, sz, device)
    attempt(res, "train_flops_per_image", train_flops, sz, device)
    variants = ["fp32", "bf16", "bf16+compile", "fp32+cl", "bf16+cl"]
    for kind in ("ddpmkit", "diffusers"):
        if "train" in skip or (kind == "diffusers" and "peer" in skip):
            continue
        for v in variants:
            attempt(res, f"train/{kind}/{v}", throughput, kind, v, sz, device, a.dry)
    peak = (res.get("matmul_peak") or {}).get("bf16_tflops")
    flops = res.get("train_flops_per_image")
    for key, row in list(res.items()):
        if key.startswith("train/") and isinstance(row, dict) and "img_per_s" in row and peak and \
                isinstance(flops, float):
            row["mfu_of_bf16_peak"] = row["img_per_s"] * flops / (peak * 1e12)
    for v in variants:
        ours, theirs = res.get(f"train/ddpmkit/{v}"), res.get(f"train/diffusers/{v}")
        if isinstance(ours, dict) and isinstance(theirs, dict) and "img_per_s" in ours and "img_per_s" in theirs:
            res[f"ratio/{v}"] = ours["img_per_s"] / theirs["img_per_s"]
    if "compare" not in skip:
        attempt(res, "bf16_against_fp32", bf16_against_fp32, sz, device)
    if "sample" not in skip:
        attempt(res, "sampling", sampling, sz, device, a.dry)
    if "ddp" not in skip:
        attempt(res, "ddp", ddp, sz, device, a.dry)
    out = Path(a.out or "gpu-check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(f"\n{res['device']}, torch {res['torch']}{' (dry run)' if a.dry else ''}; batch {sz['batch']}")
    print("| training | ddpmkit img/s | diffusers img/s | ours / theirs | MFU (ours) | peak GiB (ours) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v in variants:
        o, t = res.get(f"train/ddpmkit/{v}", {}), res.get(f"train/diffusers/{v}", {})
        cell = lambda d, k, f: (f % d[k]) if isinstance(d, dict) and k in d else "-"  # noqa: E731
        print(f"| {v} | {cell(o, 'img_per_s', '%.1f')} | {cell(t, 'img_per_s', '%.1f')} | "
              f"{('%.2f' % res[f'ratio/{v}']) if f'ratio/{v}' in res else '-'} | "
              f"{cell(o, 'mfu_of_bf16_peak', '%.3f')} | {cell(o, 'peak_mem_gib', '%.2f')} |")
    failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    print(f"written {out}; {len(failed)} part(s) failed" + (f": {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
