"""`ddpmkit autoencoder train` and `ddpmkit autoencoder eval`: the autoencoder of latent diffusion."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError, Parser


def add_parser(sub) -> None:
    """Register `autoencoder` with its commands `train` and `eval`."""
    a = sub.add_parser("autoencoder", help="train and measure the autoencoder of latent diffusion",
                       description="The KL autoencoder of latent diffusion (Rombach et al. 2022): `autoencoder "
                                   "train` trains one on images, `autoencoder eval` measures how well it "
                                   "reconstructs held-out images. `ddpmkit train --autoencoder RUN` then trains a "
                                   "diffusion model in its latent space.")
    commands = a.add_subparsers(dest="autoencoder_command", metavar="COMMAND", parser_class=Parser, required=True)
    t = commands.add_parser("train", help="train an autoencoder",
                            description="Train LDM's KL autoencoder: L1 reconstruction, a KL term with a small "
                                        "weight, and optionally a PatchGAN discriminator with LDM's adaptive weight "
                                        "(--disc-weight). The defaults are a small f = 4 autoencoder for the digits "
                                        "at 32x32. A held-out part of the images (--holdout) is never trained on: "
                                        "the pictures and --eval-every measure on it.")
    from ..train.autoencoder_config import AutoencoderConfig
    from .train import add_settings_flags

    def describe_default(name):
        from ..train.settings import class_default, show_value

        return f"default: {show_value(class_default(AutoencoderConfig)(name))}"

    add_settings_flags(t, AutoencoderConfig, describe_default)
    t.add_argument("--out", default="runs/autoencoder", metavar="DIR",
                   help="run directory (default: runs/autoencoder)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")
    t.set_defaults(func=run_train)

    e = commands.add_parser("eval", help="held-out PSNR and Frechet distance of the reconstructions",
                            description="Reconstruct held-out images (the run's own held-out set, or --data) with "
                                        "the posterior's mean, and print their PSNR and the Frechet distance of the "
                                        "reconstructions to the originals (digits classifier features for the "
                                        "digits, Inception features where its weights are present). Writes "
                                        "RUN/eval/reconstructions.png (originals above reconstructions) and "
                                        "RUN/eval/reconstruction.json.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="an autoencoder run (trained, or imported from diffusers)")
    e.add_argument("--n", type=int, default=500, help="held-out images to measure (default: 500, or all there are)")
    e.add_argument("--data", default=None, help="measure on this data source instead of the run's held-out "
                                                "images (needed for an imported autoencoder)")
    e.add_argument("--data-dir", default=None, metavar="DIR", help="folder with CIFAR-10")
    e.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    e.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default: on)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    e.add_argument("--out", default=None, metavar="DIR", help="where the figure and the JSON go (default: "
                                                             "RUN_DIR/eval)")
    e.set_defaults(func=run_eval)


def run_train(args) -> int:
    """Train (or resume) an autoencoder run and print where it stopped."""
    import dataclasses

    from ..train.autoencoder_config import AutoencoderConfig
    from ..train.loop import TrainingLoop
    from ..train.resume import resolve_settings
    from ..train.tasks.autoencoder import AutoencoderTask
    from .train import run_loop

    fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    out = Path(args.out)
    cfg, stored = resolve_settings(AutoencoderConfig, overrides, out, args.resume)
    loop = TrainingLoop(AutoencoderTask, cfg, out, resume=args.resume, quiet=args.quiet, stored_config=stored)
    ae = loop.models["autoencoder"]
    c, h, w = ae.latent_shape(cfg.image_size)
    return run_loop(loop, cfg, out, "autoencoder train",
                    f"the autoencoder {out} on {loop.device} ({ae.num_parameters():,} parameters, f = {ae.factor}, "
                    f"latents {c}x{h}x{w}, {loop.num_images:,} images)")


def run_eval(args) -> int:
    """Measure an autoencoder's reconstructions of held-out images."""
    import json

    from ..files import atomic_write_json, output_dir
    from ..limits import MAX_GRID, check_int
    from ..run import Run
    from ..train.device import pick_device

    n = check_int("--n", args.n, 1, MAX_GRID, CLIError)
    batch_size = check_int("--batch-size", args.batch_size, 1, 65536, CLIError)
    run = Run.open(args.run_dir)
    if run.kind != "autoencoder":
        raise CLIError(f"{run.dir} is a diffusion run, not an autoencoder: `autoencoder eval` measures autoencoders "
                       "(`ddpmkit autoencoder train`, or `ddpmkit import-diffusers` of a VAE)")
    held, source = _held_out_images(run, args)
    held = held[:n]
    device = pick_device(args.device)
    model = run.load_model(ema=args.ema).to(device)
    from ..metrics.reconstruction import evaluate_reconstruction, reconstruct, save_reconstruction_figure

    r = evaluate_reconstruction(model, held, features=source, batch_size=batch_size, device=device)
    print(f"PSNR: {r.psnr:.2f} dB (std {r.psnr_std:.2f} over {r.n} held-out images of {source})")
    if r.fd is not None:
        print(f"Frechet distance of the reconstructions to the originals ({r.features} features): {r.fd:.3f} "
              f"+- {r.fd_stderr:.3f}")
    else:
        print("Frechet distance: no feature network for these images (digits use the digits classifier; others "
              "need Inception's weights, see `ddpmkit eval fid --download`)")
    with output_dir(Path(args.out) if args.out else run.dir / "eval") as out:
        shown = held[:16]
        fig = save_reconstruction_figure(shown, reconstruct(model, shown, device=device).cpu(),
                                         out / "reconstructions.png", n=len(shown))
        facts = {"psnr_db": r.psnr, "psnr_std": r.psnr_std, "n": r.n, "data": source, "fd": r.fd,
                 "fd_stderr": r.fd_stderr, "features": r.features, "ema": bool(args.ema)}
        atomic_write_json(out / "reconstruction.json", json.loads(json.dumps(facts)))
    print(f"figure: {fig}")
    return 0


def _held_out_images(run, args):
    """The images ``autoencoder eval`` measures on: uint8 [N, C, H, W], and their source's name."""
    from ..data import load_dataset
    from ..data.holdout import split_for_training
    from ..train.autoencoder_config import AutoencoderConfig

    model = run.config.get("model") or {}
    size = (run.config.get("data") or {}).get("image_size") or model.get("image_size")
    channels = model.get("in_channels", 3)
    if args.data is not None:
        data = load_dataset(args.data, image_size=size, channels=channels, data_dir=args.data_dir,
                            split="train", progress=False)
        return data.images, args.data
    if "train" not in run.config:
        raise CLIError(f"{run.dir} was not trained by ddpmkit, so it has no held-out images of its own: name some "
                       "with --data")
    cfg = AutoencoderConfig.from_json(run.config)
    if args.data_dir is not None:
        cfg.data_dir = args.data_dir
    data = load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels, data_dir=cfg.data_dir,
                        split="train", progress=False)
    _, held = split_for_training(data, cfg)
    if held is None:
        raise CLIError(f"{run.dir} held no images out of training (--holdout 0): name some with --data")
    return held, cfg.data
