"""``ddpmkit report RUN_DIR``: one self-contained HTML page of a run.

The page embeds every picture as a data URI, so it opens from anywhere with no network and no other files:
the configuration, the training curves, the latest samples, the sampling GIFs, the schedule figure and the
evaluation figures where they exist. Missing pictures are made from the run's own files first.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..files import atomic_write_text
from ..store import read_config
from . import figures

__all__ = ["write_report"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #666; } figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { color: #555; font-size: 0.9em; } img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.9em; } td { padding: 2px 12px 2px 0; } td:first-child { color: #666; }
"""

# After loading, the page records on <body> how many images it has and how many failed to decode, so that a
# headless browser can check the rendering.
_CHECK = ("<script>window.addEventListener('load', function () {"
          "var imgs = Array.prototype.slice.call(document.images);"
          "document.body.setAttribute('data-images', imgs.length);"
          "document.body.setAttribute('data-broken', imgs.filter(function (i) {"
          "return !(i.complete && i.naturalWidth > 0); }).length); });</script>")

_MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg"}


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _latest(paths) -> Path | None:
    paths = sorted(paths)
    return paths[-1] if paths else None


def write_report(run_dir, out=None) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) and return its path."""
    run = Path(run_dir)
    config = read_config(run)
    train = config.get("train", {})
    diffusion = config.get("diffusion", {})
    out = Path(out) if out else run / "report.html"

    sections = []
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                   for k, v in sorted(train.items()))
    sections.append(f"<h2>Configuration</h2><table>{rows}</table>")

    metrics = run / "metrics.csv"
    if metrics.is_file():
        loss_png = run / "loss.png"
        try:
            figures.plot_loss(metrics, loss_png)
            sections.append("<h2>Training</h2>" + _img(loss_png, "loss, learning rate, throughput"))
        except figures.PlotError as e:
            sections.append(f"<h2>Training</h2><p class=sub>no curves: {html.escape(str(e))}</p>")

    figs = []
    grid = _latest((run / "samples").glob("grid_step_*.png")) if (run / "samples").is_dir() else None
    classes = config.get("classes") if isinstance(config.get("classes"), dict) else None
    if grid:
        per_class = ", guided, one row per class" if classes else ""
        figs.append(_img(grid, f"EMA samples at step {int(grid.stem.rsplit('_', 1)[-1])}{per_class}"))
    for g in sorted(run.glob("samples*/**/grid.png")):
        figs.append(_img(g, f"{g.parent.relative_to(run)}"))
    if figs:
        sections.append("<h2>Samples</h2>" + "".join(figs))
    if classes and isinstance(classes.get("names"), list):  # a class-conditional run: a row per class
        rows = "".join(f"<tr><td>{k}</td><td>{html.escape(str(name))}</td></tr>"
                       for k, name in enumerate(classes["names"]))
        sections.append(f"<h2>Classes</h2><p class=sub>class-conditional: sample one with <code>ddpmkit sample "
                        f"RUN --class LABEL</code>; label {html.escape(str(classes.get('null')))} is the null class "
                        f"of classifier-free guidance</p><table><tr><td>label</td><td>name</td></tr>{rows}</table>")

    gifs = sorted(run.glob("*.gif")) + sorted(run.glob("samples*/**/*.gif"))
    if gifs:
        sections.append("<h2>Sampling chains</h2><p class=sub>x_t (top) beside the predicted x0 (bottom)</p>"
                        + "".join(_img(g, g.stem) for g in gifs))

    edits = sorted(run.glob("edits/*/inpaint.png")) + sorted(run.glob("edits/*/sdedit.png"))  # ddpmkit inpaint, edit
    if edits:
        sections.append("<h2>Editing</h2><p class=sub>inpainting (RePaint): original, masked, results; SDEdit: the "
                        "input, then its edits over strengths</p>"
                        + "".join(_img(p, str(p.parent.relative_to(run))) for p in edits))

    T = int(diffusion.get("T", 1000))
    schedule_png = run / "schedule.png"
    if not schedule_png.is_file():
        figures.plot_schedule(schedule_png, T=T)
    sections.append("<h2>Noise schedules</h2>" + _img(schedule_png, f"linear and cosine, T = {T}"))
    if (run / "forward.png").is_file():
        sections.append("<h2>Forward process</h2>" + _img(run / "forward.png", "q(x_t given x_0) at several t"))

    evals = sorted((run / "eval").glob("*.png")) if (run / "eval").is_dir() else []
    if evals:
        sections.append("<h2>Evaluation</h2>" + "".join(_img(p, p.stem) for p in evals))

    title = f"ddpmkit run {run.resolve().name}"
    sub = (f"{train.get('preset', '?')} preset, {diffusion.get('schedule', '?')} schedule, T = {T}, "
           f"objective {diffusion.get('objective', 'eps')}, data {train.get('data', '?')}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p class=sub>{html.escape(sub)}</p>"
            + "".join(sections) + _CHECK + "</body></html>\n")
    return atomic_write_text(out, page)
