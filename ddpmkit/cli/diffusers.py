"""`ddpmkit import-diffusers` and `export-diffusers`: a run from and to a diffusers folder."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Register `import-diffusers` and `export-diffusers` and their flags."""
    im = sub.add_parser("import-diffusers", help="turn a diffusers UNet2DModel (e.g. google/ddpm-cifar10-32), "
                                                 "AutoencoderKL or latent pipeline into a ddpmkit run",
                        description="Read a diffusers UNet2DModel folder (config.json and safetensors or .bin "
                                    "weights, with scheduler_config.json beside it or in scheduler/) or a hub id, "
                                    "and write a ddpmkit run directory whose model gives the same outputs. A "
                                    "pipeline folder with a UNet2DModel in unet/ and an AutoencoderKL in vqvae/ "
                                    "(an LDMPipeline, as export-diffusers writes one) or vae/ becomes a latent "
                                    "diffusion run, the autoencoder copied into it and its latent scale kept. An "
                                    "AutoencoderKL folder, or a pipeline folder with one in vae/ and no "
                                    "UNet2DModel in unet/ (e.g. Stable Diffusion's), becomes an autoencoder run "
                                    "for latent diffusion, its latent scaling factor kept.")
    im.add_argument("source", metavar="SOURCE", help="a local diffusers model folder, or a hub id when the hub "
                                                     "can be reached")
    im.add_argument("--out", required=True, metavar="RUN_DIR", help="the new run directory (must not exist or "
                                                                    "be empty)")
    im.set_defaults(func=run_import)

    ex = sub.add_parser("export-diffusers", help="write a run as a diffusers pipeline (or AutoencoderKL) folder",
                        description="Write a run's model and schedule as a diffusers pipeline folder "
                                    "(model_index.json, unet/, scheduler/): a DDPMPipeline, or for a "
                                    "class-conditional run a ClassConditionalDDPMPipeline in the folder's own "
                                    "pipeline.py, which takes class labels and a guidance weight. A run trained "
                                    "with --precond edm gets the folder's own pipeline too, which applies EDM's "
                                    "preconditioning (and import-diffusers reads it back). A latent "
                                    "diffusion run also writes its autoencoder as an AutoencoderKL: an "
                                    "LDMPipeline (vqvae/, a DDIMScheduler) when its latent map is one scale, else "
                                    "(a per-channel scale or a shift, or class labels) the folder's own pipeline "
                                    "with a vae/ and the exact map. An autoencoder run becomes an AutoencoderKL "
                                    "folder (config.json and its weights). It prints the Python call that loads "
                                    "the folder.")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("--out", required=True, metavar="DIR", help="the new folder (must not exist or be empty)")
    ex.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                    help="export the EMA weights (default: on)")
    ex.set_defaults(func=run_export)


def run_import(args) -> int:
    """Write a run from a diffusers model."""
    from ..interop import import_diffusers

    from ..store import read_config

    run = import_diffusers(args.source, args.out)
    print(f"run: {run}")
    if read_config(run).get("kind") == "autoencoder":
        print(f"train a latent diffusion model on it with: ddpmkit train --autoencoder {run} ...")
    else:
        steps = min(50, int(read_config(run).get("diffusion", {}).get("T", 50)))  # DDIM's 50, never above T
        print(f"sample with: ddpmkit sample {run} --sampler ddim --steps {steps}")
    return 0


def run_export(args) -> int:
    """Write a diffusers pipeline folder from a run."""
    from ..interop import export_diffusers

    export_diffusers(args.run_dir, args.out, ema=args.ema)
    return 0
