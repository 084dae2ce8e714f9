"""The ``ddpmkit`` command line: one module per command (its flags and its handler); the work is done below."""

from __future__ import annotations

import sys

from .. import __version__
from ..errors import DdpmkitError
from . import autoencoder, demo, diffusers, distill, edit, eval, plot, report, sample, serve, train
from .common import (CLIError, Parser, add_class_flags, add_sampler_flags, check_counts, int_tuple, sample_options,
                     samplers_epilog)
from .sample import SAMPLE_DEFAULT_SAMPLER

__all__ = ["main", "build_parser", "CLIError", "Parser", "SAMPLE_DEFAULT_SAMPLER", "samplers_epilog",
           "sample_options", "check_counts", "add_sampler_flags", "add_class_flags", "int_tuple"]

# The commands in the order `ddpmkit --help` lists them; each module registers its own subparser(s).
COMMANDS = (demo, train, sample, eval, report, plot, diffusers, edit, autoencoder, distill, serve)

# What to reduce when a command runs out of memory (CPU RAM or GPU memory).
_OOM_HINT = {
    "train": "reduce --batch-size, or keep it and split it with --grad-accum K; or use a smaller model "
             "(--base-channels, --channel-mults, --num-res-blocks, --attention-resolutions)",
    "demo": "reduce --n",
    "plot": "use a smaller --image or fewer --t",
}


def build_parser() -> Parser:
    """The top-level parser with every command's subparser."""
    p = Parser(prog="ddpmkit",
               description="Denoising diffusion (DDPM, DDIM) for images: train, sample, plot.")
    p.add_argument("--version", action="version", version=f"ddpmkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: MemoryError (numpy), torch.OutOfMemoryError (a GPU), or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    import torch

    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(e)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _oom_detail(e: BaseException) -> str:
    """How much could not be allocated, read from the allocator's message."""
    import re

    m = re.search(r"allocate ([0-9]+) bytes", str(e))
    if m:
        return f"{int(m.group(1)) / 2**30:,.1f} GiB could not be allocated"
    m = re.search(r"allocate ([0-9.]+ [KMGT]i?B)", str(e))
    return f"{m.group(1)} could not be allocated" if m else type(e).__name__


def main(argv=None) -> int:
    """Parse ``argv``, run the command; a user's error is one line on stderr and a non-zero exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except DdpmkitError as e:
        from .common import error_line

        print(f"ddpmkit: error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"ddpmkit: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # out of memory: one line that says what to reduce
        if not _is_out_of_memory(e):
            raise
        hint = _OOM_HINT.get(args.command, "reduce --batch-size")
        print(f"ddpmkit: error: out of memory in `{args.command}` ({_oom_detail(e)}): {hint}", file=sys.stderr)
        return 1
    except OSError as e:  # a file system problem the modules did not anticipate: still one line
        print(f"ddpmkit: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1

