"""The ``ddpmkit`` command line: argument parsing and printing only."""

from __future__ import annotations

import argparse
import sys

from . import __version__


from .errors import DdpmkitError


class CLIError(DdpmkitError):
    """A bad combination of command-line arguments."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddpmkit",
        description="Denoising diffusion (DDPM, DDIM) for images: train, sample, plot, evaluate.",
    )
    p.add_argument("--version", action="version", version=f"ddpmkit {__version__}")
    p.add_subparsers(dest="command", metavar="COMMAND")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except DdpmkitError as e:
        print(f"ddpmkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddpmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
