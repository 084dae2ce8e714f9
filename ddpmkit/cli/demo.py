"""`ddpmkit demo`: train on the embedded digits and draw samples, pictures and GIFs."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Register `demo` and its flags."""
    from ..demo import DEFAULT_TRAIN_SECONDS, LATENT_TRAIN_SECONDS

    d = sub.add_parser("demo", help="train on the embedded digits and draw samples, pictures and GIFs",
                       description="Train the digits preset class-conditionally (EDM's preconditioning) for two "
                                   "minutes on this machine, "
                                   "sample every digit with DPM-Solver++(2M) SDE (20 steps) and DDIM (50 steps), "
                                   "check the samples for copies, and write grids, GIFs, the schedule, "
                                   "forward-process and loss plots and a report.")
    d.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: runs/demo, or runs/demo-2, ... when that exists)")
    d.add_argument("--train-seconds", type=float, default=None,
                   help=f"wall-clock budget for training (default: {DEFAULT_TRAIN_SECONDS:g}; with --latent "
                        f"{LATENT_TRAIN_SECONDS:g})")
    d.add_argument("--n", type=int, default=64, help="samples per sampler, n // 10 of each digit (default: 64)")
    d.add_argument("--latent", action="store_true",
                   help="latent diffusion: first train an autoencoder (digits at 32x32 to latents of 4x8x8, the first "
                        "60 s of the budget, into OUT-autoencoder), then the digits U-Net on its latents")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=run)


def run(args) -> int:
    """Run the demo."""
    from ..demo import run_demo

    run_demo(out=args.out, train_seconds=args.train_seconds, quiet=args.quiet, n=args.n, latent=args.latent)
    return 0
