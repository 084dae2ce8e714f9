"""The former home of every still picture, kept so that ``ddpmkit.viz.figures`` imports go on working.

Grids and PNGs of samples live in :mod:`.grids` (no matplotlib); the matplotlib figures in :mod:`.plots`.
"""

from __future__ import annotations

from .grids import (  # noqa: F401  (the helpers animation and editing once imported from here)
    _as_float, _as_uint8_nhwc, _check_int, _font, _save_pil, _text_size, _to_pil, _upscale, _write_file)
from .grids import (MIN_TILE_PX, PlotError, default_scale, make_grid, make_labelled_grid, save_grid, save_image,
                    save_images, save_labelled_grid)
from .plots import (COLORS, STYLE, ema_smooth, load_metrics, plot_bpd_terms, plot_forward, plot_loss,
                    plot_nearest_pairs, plot_schedule)

__all__ = [
    "PlotError",
    "STYLE",
    "COLORS",
    "MIN_TILE_PX",
    "default_scale",
    "make_grid",
    "save_grid",
    "make_labelled_grid",
    "save_labelled_grid",
    "save_image",
    "save_images",
    "plot_schedule",
    "plot_forward",
    "load_metrics",
    "ema_smooth",
    "plot_loss",
    "plot_bpd_terms",
    "plot_nearest_pairs",
]
