"""Pictures of diffusion: grids and PNGs (``grids``), matplotlib figures (``plots``), the sampling chain as a GIF
(``animation``), and one self-contained HTML page of a run (``report``, which leads with the facts ``summary`` reads
from the run's files).

Only ``plots`` and ``report`` need matplotlib; their names load on first use, so writing a grid never imports it.
"""

import importlib

from .animation import ChainFrame, ChainRecorder, save_chain_gif
from .grids import (
    MIN_TILE_PX,
    PlotError,
    default_scale,
    make_grid,
    make_labelled_grid,
    save_grid,
    save_image,
    save_images,
    save_labelled_grid,
)

_LAZY = {name: ".plots" for name in ("COLORS", "STYLE", "ema_smooth", "load_metrics", "plot_bpd_terms",
                                     "plot_forward", "plot_loss", "plot_schedule")}
_LAZY["write_report"] = ".report"


def __getattr__(name: str):
    """The names of ``plots`` and ``report``, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COLORS",
    "MIN_TILE_PX",
    "STYLE",
    "ChainFrame",
    "ChainRecorder",
    "PlotError",
    "default_scale",
    "ema_smooth",
    "load_metrics",
    "make_grid",
    "make_labelled_grid",
    "plot_bpd_terms",
    "plot_forward",
    "plot_loss",
    "plot_schedule",
    "save_chain_gif",
    "save_grid",
    "save_image",
    "save_images",
    "save_labelled_grid",
    "write_report",
]
