"""`ddpmkit report`: one self-contained report.html of a run."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Register `report` and its flags."""
    r = sub.add_parser("report", help="write one self-contained report.html of a run",
                       description="One HTML page of a run: a summary (samples, quality, training time, the commands "
                                   "that reproduce it), then samples, curves, evaluation, GIFs, figures and the "
                                   "configuration, every picture embedded, viewable offline. An autoencoder run's "
                                   "page leads with its reconstructions, their held-out PSNR and Frechet distance "
                                   "and the command that trains a diffusion model on its latents; a latent "
                                   "diffusion run's names its autoencoder, latents and scale.")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--out", default=None, metavar="FILE", help="output file (default: RUN_DIR/report.html)")
    r.set_defaults(func=run)


def run(args) -> int:
    """Write the report and print its path."""
    from ..run import Run
    from ..viz.report import write_report

    Run.open(args.run_dir)  # a one-line error when it is not a run
    print(write_report(args.run_dir, args.out))
    return 0
