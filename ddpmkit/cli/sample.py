"""`ddpmkit sample`: sample from a trained run into a folder of PNGs and a grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_class_flags, add_sampler_flags, sample_options, samplers_epilog

# `ddpmkit sample`'s default: the best of bench/bench_fast_sampling.py's table at 10 and 20 network calls on the
# demo's digits model (docs/sampling.md gives the table). `eval fid` keeps DDIM, the papers' protocol.
SAMPLE_DEFAULT_SAMPLER = "dpmpp-2m-sde"


def add_parser(sub) -> None:
    """Register `sample` and its flags."""
    s = sub.add_parser("sample", help="sample from a trained run",
                       description="Sample from a run with its own schedule and model.", epilog=samplers_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint directory (default: the run's latest intact one)")
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default: on)")
    add_sampler_flags(s, default_sampler=SAMPLE_DEFAULT_SAMPLER)
    add_class_flags(s)
    s.add_argument("--n", type=int, default=None, help="number of samples, of each class with --class (default: 64; "
                                                      "8 of each with several classes)")
    s.add_argument("--batch-size", type=int, default=64, help="samples per batch (default: 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: RUN_DIR/samples/<sampler settings>-seed<K>)")
    s.add_argument("--gif", default=None, metavar="PATH", help="also write a GIF of the chain for a few samples")
    s.add_argument("--device", default=None, help="device to sample on (default: cpu)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run)


def run(args) -> int:
    """Sample and print where the images went."""
    from ..generate import generate
    from ..request import Request

    source = args.checkpoint or args.run_dir
    n = args.n
    if n is None:  # 64 images, or 8 of each class when several are asked for
        several = args.classes is not None and ("," in args.classes or args.classes.strip() == "all")
        n = 8 if several else 64
    opt = sample_options(args, n=n, batch_size=args.batch_size, seed=args.seed, ema=args.ema)
    req = Request.resolve(source, opt)  # the run opened and the request planned once, for the folder and the work
    out = Path(args.out) if args.out else req.out_dir()
    res = generate(req, out, gif_path=args.gif, device=args.device, progress=not args.quiet)
    guided = f", guidance w = {res['guidance']:g}" if res.get("guidance") is not None else ""
    print(f"{res['n']} samples in {res['seconds']:.1f} s ({res['per_second']:.2f} samples/s, "
          f"{res['steps']} network calls per batch{guided})")
    print(f"samples: {res['dir']}")
    print(f"grid:    {res['grid']}")
    if "gif" in res:
        print(f"gif:     {res['gif']} ({res['gif_frames']} frames)")
    return 0
