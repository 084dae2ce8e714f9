"""Pictures of diffusion: grids and plots (``figures``), the sampling chain as a GIF (``animation``), and one
self-contained HTML page of a run (``report``, which leads with the facts ``summary`` reads from the run's files)."""

from .animation import ChainFrame, ChainRecorder, save_chain_gif
from .figures import (
    COLORS,
    MIN_TILE_PX,
    STYLE,
    PlotError,
    default_scale,
    ema_smooth,
    load_metrics,
    make_grid,
    make_labelled_grid,
    plot_bpd_terms,
    plot_forward,
    plot_loss,
    plot_schedule,
    save_grid,
    save_image,
    save_images,
    save_labelled_grid,
)
from .report import write_report

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
