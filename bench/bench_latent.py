"""Latent diffusion against pixel diffusion on the digits at 32x32, on this machine (issue 27).

Four tables, each measured side by side in one run, one process at a time:

1. **The autoencoder** (``ddpmkit autoencoder train``'s defaults, f = 4, latents 4x8x8): its held-out PSNR and the
   Frechet distance of its reconstructions to the originals (digits classifier) against its training time,
   measured every ``--ae-eval-every`` steps for ``--ae-seconds``.
2. **A training step**: ms per step of the digits U-Net on the 4x8x8 latents against the same U-Net (the same
   settings: the digits preset, batch 128) on 1x32x32 pixels, each timed over ``--step-probe`` steps after warm-up.
3. **Equal wall-clock**: a pixel run trained for ``--budget`` seconds against a latent run whose autoencoder's
   training time is counted on its side (the latent U-Net trains for the budget minus that time); 500 samples of
   each (class-conditional, every digit in turn, the demo's guidance 0.1, DDIM 50 steps), judged by the digits
   classifier at 16x16 (the 32x32 samples brought down bicubically, as the data source resizes digits), beside
   the judge's floor: real held-out digits at 32x32 read the same way.
4. **Sampling**: seconds per image of each, for those 500 samples (the latent side includes decoding).

    python bench/bench_latent.py [--budget 300] [--ae-seconds 120] [--n 500] [--threads 2] [--out runs/bench-latent]

Prints markdown tables. The runs stay in --out (delete it to measure again).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

try:
    import ddpmkit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_tools import evaluate  # noqa: E402

from ddpmkit.data import load_dataset  # noqa: E402
from ddpmkit.metrics.digits import DigitsClassifier, to_classifier_size  # noqa: E402
from ddpmkit.metrics.quality import draw_samples  # noqa: E402
from ddpmkit.images import to_uint8  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.train import Trainer, config_from_preset  # noqa: E402
from ddpmkit.train.autoencoder_config import AutoencoderConfig  # noqa: E402
from ddpmkit.train.loop import TrainingLoop  # noqa: E402
from ddpmkit.train.tasks.autoencoder import AutoencoderTask  # noqa: E402

SIZE = 32
GUIDANCE = 0.1  # the latent demo's (ddpmkit/demo.py LATENT_DEMO_GUIDANCE)


def diffusion_settings(**kw):
    """The demo's recipe (the digits preset, class-conditional) at 32x32 pixels, or on latents."""
    return config_from_preset("digits", image_size=SIZE, class_cond=True, sample_every=10**9, num_samples=0,
                              checkpoint_every=10**9, **kw)


def train_autoencoder(out: Path, seconds: float, eval_every: int) -> list[dict]:
    if not (out / "config.json").is_file():
        cfg = AutoencoderConfig(time_limit=seconds, steps=10**9, eval_every=eval_every, eval_n=300,
                                sample_every=10**9, checkpoint_every=10**9)
        TrainingLoop(AutoencoderTask, cfg, out, quiet=True).run()
    with open(out / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("psnr")]


def ms_per_step(cfg, out: Path, steps: int) -> float:
    """The mean time of ``steps`` training steps after 3 of warm-up (a throwaway run directory)."""
    trainer = Trainer(cfg, out, quiet=True)
    for _ in range(3):
        trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    dt = (time.perf_counter() - t0) / steps
    trainer._release_lock()
    return 1000 * dt


def train_for(cfg, out: Path) -> dict:
    if not (out / "config.json").is_file():
        Trainer(cfg, out, quiet=True).run()
    run = Run.open(out)
    return {"steps": run.checkpoint(parts=("train",)).step, "run": run}


def judge_samples(clf, run: Run, n: int) -> tuple[object, float]:
    den = run.denoiser()
    t0 = time.perf_counter()
    x, _ = draw_samples(den, n, run.image_shape, sampler="ddim", steps=50, num_classes=len(run.class_names),
                        guidance=GUIDANCE, null_class=run.null_class)
    seconds = time.perf_counter() - t0
    return evaluate(clf, to_classifier_size(to_uint8(x)), str(run.dir)), seconds / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds of training of each side (default 300)")
    ap.add_argument("--ae-seconds", type=float, default=120.0, help="the autoencoder's training (default 120)")
    ap.add_argument("--ae-eval-every", type=int, default=100)
    ap.add_argument("--n", type=int, default=500, help="samples judged of each side (default 500)")
    ap.add_argument("--step-probe", type=int, default=10, help="steps timed for table 2 (default 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-latent")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    # 1. the autoencoder against its training time
    rows = train_autoencoder(out / "ae", args.ae_seconds, args.ae_eval_every)
    print("| autoencoder step | seconds | held-out PSNR (dB) | Frechet distance of reconstructions |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {int(r['step'])} | {float(r['wall_s']):.0f} | {float(r['psnr']):.2f} | "
              f"{float(r['fd']):.2f} +- {float(r['fd_stderr']):.2f} |")
    ae_seconds = float(rows[-1]["wall_s"])

    # 2. one training step, latent against pixel, the same U-Net settings
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ms_pixel = ms_per_step(diffusion_settings(steps=10**9), Path(tmp) / "p", args.step_probe)
        ms_latent = ms_per_step(diffusion_settings(steps=10**9, autoencoder=str(out / "ae")), Path(tmp) / "l",
                                args.step_probe)
    print(f"\n| training step (batch 128) | ms | ratio |\n| --- | ---: | ---: |\n| pixel U-Net, 1x32x32 | "
          f"{ms_pixel:.0f} | 1 |\n| latent U-Net, 4x8x8 | {ms_latent:.0f} | {ms_latent / ms_pixel:.3f} |")

    # 3 and 4. equal wall-clock, the autoencoder's time on the latent side
    clf = DigitsClassifier.load_or_train()
    pixel = train_for(diffusion_settings(steps=10**9, time_limit=args.budget), out / "pixel")
    latent_seconds = args.budget - ae_seconds
    latent = train_for(diffusion_settings(steps=10**9, time_limit=latent_seconds, autoencoder=str(out / "ae")),
                       out / "latent")
    real = load_dataset("digits", image_size=SIZE, progress=False).images
    floor = evaluate(clf, to_classifier_size(real[torch.as_tensor(clf.test_idx)]), "real held-out digits, 32x32")
    print(f"\n| side | training | steps | Frechet distance ({args.n} samples, digits classifier) | mean top "
          "probability | classes covered | s per sample |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, side, how in (("pixel", pixel, f"{args.budget:.0f} s of U-Net"),
                            ("latent", latent, f"{ae_seconds:.0f} s autoencoder + {latent_seconds:.0f} s U-Net")):
        row, per = judge_samples(clf, side["run"], args.n)
        print(f"| {name} | {how} | {side['steps']} | {row.fd:.2f} | {row.confidence:.3f} | {row.coverage} | "
              f"{per:.4f} |")
    print(f"| real digits (the judge's floor, n = {floor.n}) | | | {floor.fd:.2f} | {floor.confidence:.3f} | "
          f"{floor.coverage} | |")


if __name__ == "__main__":
    main()
