"""A progress bar that moves at every network evaluation, for sampling.

A batch of DDPM samples is 1000 network calls: a bar of images would sit at 0 for the whole batch (46 s for the
demo's 64 digits on a laptop CPU). This one counts the network's forward calls with a forward hook, so it moves
at every step, and shows the images done beside it.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager

__all__ = ["steps_bar"]


@contextmanager
def steps_bar(net, *, n: int, batch_size: int, calls_per_batch: int, desc: str, disable: bool = False):
    """A tqdm bar of ``ceil(n / batch_size) * calls_per_batch`` network calls, counted by a forward hook on ``net``
    (removed on exit). Call ``bar.images(done)`` after each batch to show the images done."""
    from tqdm import tqdm

    bar = tqdm(total=math.ceil(n / max(1, batch_size)) * calls_per_batch, unit="step", desc=desc, disable=disable,
               file=sys.stderr, dynamic_ncols=True)
    bar.images = lambda done: bar.set_postfix_str(f"{done}/{n} images", refresh=True)
    def count(*_):  # returns None: a forward hook's return value would replace the network's output
        bar.update(1)

    handle = None if disable else net.register_forward_hook(count)
    try:
        yield bar
    finally:
        if handle is not None:
            handle.remove()
        bar.close()
