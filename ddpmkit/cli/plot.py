"""`ddpmkit plot`: the schedules, the forward process or a run's training curves."""

from __future__ import annotations

from pathlib import Path

from .common import CLIError, int_tuple


def add_parser(sub) -> None:
    """Register `plot` and its flags."""
    pl = sub.add_parser("plot", help="draw the schedules, the forward process or a run's training curves",
                        description="Pictures: `plot schedule`, `plot forward`, `plot loss RUN_DIR`.")
    pl.add_argument("what", choices=["schedule", "forward", "loss"])
    pl.add_argument("run_dir", nargs="?", default=None, metavar="RUN_DIR", help="the run (for `plot loss`)")
    pl.add_argument("--T", type=int, default=1000, help="diffusion steps (default: 1000)")
    pl.add_argument("--data", default="digits", help="images for `plot forward` (default: digits)")
    pl.add_argument("--data-dir", default=None, metavar="DIR", help="folder of CIFAR-10 for --data cifar10")
    pl.add_argument("--image", default=None, metavar="FILE", help="one image file for `plot forward`")
    pl.add_argument("--t", default=None, metavar="T,T,...", help="timesteps for `plot forward`")
    pl.add_argument("--out", default=None, metavar="FILE", help="output PNG")
    pl.set_defaults(func=run)


def run(args) -> int:
    """Draw the figure and print its path."""
    from ..diffusion import NoiseSchedule
    from ..limits import check_T

    check_T(args.T, "--T")  # before the schedule's arrays are allocated
    try:
        NoiseSchedule.linear(args.T)
    except ValueError as e:
        raise CLIError(f"--T: {e}") from None
    from ..viz import plots

    if args.what == "schedule":
        path = plots.plot_schedule(args.out or "schedule.png", T=args.T)
    elif args.what == "loss":
        if not args.run_dir:
            raise CLIError("plot loss needs a RUN_DIR")
        run_dir = Path(args.run_dir)
        path = plots.plot_loss(run_dir / "metrics.csv", args.out or run_dir / "loss.png")
    else:  # forward
        from ..demo import forward_images

        images = forward_images(args.data, args.image, args.data_dir)
        ts = int_tuple(args.t) if args.t else (0, 50, 100, 200, 300, 500, 700, 999)
        ts = tuple(t for t in ts if t < args.T) or (0,)
        path = plots.plot_forward(images, args.out or "forward.png", ts=ts, T=args.T)
    print(path)
    return 0
