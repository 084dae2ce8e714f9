"""`ddpmkit serve`: a local page to try a run: draw, watch the chain, inpaint, edit."""

from __future__ import annotations

import sys

from .common import CLIError

DEFAULT_PORT = 8000
STOP_SECONDS = 30  # how long Ctrl-C waits for the request at work to end at its next step


def add_parser(sub) -> None:
    """Register `serve` and its flags."""
    s = sub.add_parser("serve", help="a local page to try a run: draw and watch the chain, inpaint, edit",
                       description="Serve a page to try a run in a browser: pick a sampler, steps, seed, class and "
                                   "guidance, draw and watch x_t beside the predicted x0 at each step; paint a mask "
                                   "on a sample or an uploaded image and inpaint it (RePaint), or edit an image "
                                   "(SDEdit). A request is checked as `sample`, `inpaint` and `edit` check their "
                                   "flags, and draws the same images. Nothing is written to disk. Ctrl-C stops it.")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or one of its checkpoints")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="P",
                   help=f"port to listen on; 0 picks a free one (default: {DEFAULT_PORT})")
    s.add_argument("--host", default="127.0.0.1", metavar="H",
                   help="address to listen on (default: 127.0.0.1, this machine only; any other address lets other "
                        "machines use the page and the model, with a warning)")
    s.add_argument("--device", default=None, help="device to run the model on (default: cpu)")
    s.set_defaults(func=run)


def run(args) -> int:
    """Open the run, listen, print the page's address; serve until Ctrl-C."""
    import torch

    from ..serve import App, is_loopback, make_server
    from .sample import SAMPLE_DEFAULT_SAMPLER

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    if args.device is not None:
        try:
            torch.device(args.device)
        except (RuntimeError, ValueError) as e:
            raise CLIError(f"--device {args.device}: {e}") from None
    try:
        app = App.open(args.run_dir, sample_sampler=SAMPLE_DEFAULT_SAMPLER, edit_sampler="ddim", device=args.device)
    except (RuntimeError, AssertionError) as e:  # a device that does not exist here (no CUDA)
        if args.device is None:
            raise
        raise CLIError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    try:
        server = make_server(app, args.host, args.port)
    except OSError as e:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if not is_loopback(args.host):
        print(f"warning: --host {args.host} is not this machine only: anyone who can reach it can use the page "
              f"and the model", file=sys.stderr)
    print(f"serving {app.run.dir} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # the request at work ends at its next step, before the process does
        app.stop(timeout=STOP_SECONDS)
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
