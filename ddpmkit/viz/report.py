"""``ddpmkit report RUN_DIR``: one self-contained HTML page of a run.

The page leads with what a person came to see: a summary (a grid of samples beside how good the model is, how long
it trained, what it is and the commands that train it again and sample from it; ``summary.py`` gathers it). Then,
in this order: the samples and classes, the quality and loss curves, the evaluation, the sampling chains and the
edits; then the figures that are the same for every run (schedules, forward process); last, folded, the
configuration, the settings that differ from the preset first and marked.

An autoencoder run's page leads with its newest picture of held-out originals above their reconstructions, their
PSNR and Frechet distance, and the command that trains a diffusion model on its latents; it has no noise schedule or
forward process. A latent diffusion run's page is a diffusion run's, with its autoencoder and latents named.

Every picture is embedded as a data URI, so the page opens from anywhere with no network and no other files.
Missing pictures are made from the run's own files first.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..files import atomic_write_text
from ..store import read_config
from . import plots
from .summary import sample_grids, settings_rows, space, summarize
from .summary_autoencoder import autoencoder_shape, reconstruction_figures
from .summary_common import Fact, Summary, trainer_grids

__all__ = ["write_report", "SECTIONS"]

# The sections' ids, in the order of the page (a run shows those it has).
SECTIONS = ("summary", "samples", "training", "evaluation", "chains", "editing", "schedules", "forward",
            "configuration")

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.2em auto; max-width: 1120px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin: 0 0 0.1em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 0.8em; text-transform: uppercase; letter-spacing: 0.06em; color: #777; margin: 0.9em 0 0.35em; }
.sub { color: #666; margin: 0 0 0.8em; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { color: #555; font-size: 0.85em; max-width: 60ch; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.9em; } td { padding: 2px 12px 2px 0; vertical-align: top; }
td:first-child { color: #666; }
.w { white-space: nowrap; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em; }
pre { background: #f5f5f5; padding: 5px 8px; margin: 0.2em 0 0.5em; white-space: pre-wrap; overflow-wrap: anywhere; }
#summary { display: flex; gap: 28px; align-items: flex-start; }
#summary figure { flex: none; margin: 0; display: table; }
#summary figcaption { display: table-caption; caption-side: bottom; }
#summary figure img { height: min(640px, calc(100vh - 150px)); min-height: 260px; width: auto; object-fit: contain; }
#summary figure img.wide { height: auto; min-height: 0; width: min(560px, 48vw); }
#summary .facts { flex: 1; min-width: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; }
.card { border: 1px solid #e2e2e2; border-radius: 6px; padding: 6px 12px; flex: 1 1 150px; }
.card .v { font-size: 1.6em; font-weight: 600; } .l { color: #555; font-size: 0.85em; }
.card .s, .note { color: #888; font-size: 0.75em; } .card.muted .v { font-size: 1.1em; color: #888; font-weight: 500; }
tr.changed td { font-weight: 600; } tr.changed td:first-child::before { content: "\\25CF  "; color: #d55e00; }
details > summary { cursor: pointer; font-size: 1.2em; font-weight: 600; margin-top: 1.8em; }
"""

# After loading, the page records on <body> how many images it has, how many failed to decode, the viewport and
# where the summary's grid and headline numbers lie (getBoundingClientRect, CSS pixels), so that a headless
# browser can check the rendering and what the first screen holds.
_CHECK = ("<script>window.addEventListener('load', function () {"
          "var imgs = Array.prototype.slice.call(document.images), b = document.body, pos = {};"
          "b.setAttribute('data-images', imgs.length);"
          "b.setAttribute('data-broken', imgs.filter(function (i) {"
          "return !(i.complete && i.naturalWidth > 0); }).length);"
          "document.querySelectorAll('[data-measure]').forEach(function (e) {"
          "var r = e.getBoundingClientRect(); pos[e.getAttribute('data-measure')] = [r.top, r.bottom, r.width]; });"
          "b.setAttribute('data-viewport', JSON.stringify([window.innerWidth, window.innerHeight]));"
          "b.setAttribute('data-layout', JSON.stringify(pos)); });</script>")

_MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg"}


def _esc(x) -> str:
    return html.escape(str(x))


def _is_wide(data: bytes) -> bool:
    """Whether a PNG is much wider than tall (an autoencoder's originals above reconstructions), from its IHDR."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return False
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return h > 0 and w > 1.25 * h


def _img(path: Path, caption: str, measure: str = "") -> str:
    raw = path.read_bytes()
    data = base64.b64encode(raw).decode("ascii")
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    attr = f' data-measure="{measure}"' if measure else ""
    if measure and _is_wide(raw):  # the summary's picture: a wide one takes a width, not the screen's height
        attr += ' class="wide"'
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{_esc(caption)}"{attr}>'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _words(command: str) -> str:
    """A command line that wraps between its words only (never inside --time-limit at its hyphens)."""
    return " ".join(f"<span class=w>{_esc(w)}</span>" for w in command.split(" "))


def _section(name: str, body: str) -> str:
    return f'<section id="{name}">{body}</section>' if body else ""


# ---------------------------------------------------------------------------------------------- summary
def _card(fact: Fact) -> str:
    muted = " muted" if fact.value in ("not recorded", "not measured", "not run", "unreadable") else ""
    return (f'<div class="card{muted}" title="{_esc(fact.source)}"><div class=l>{_esc(fact.label)}</div>'
            f"<div class=v>{_esc(fact.value)}</div><div class=s>{_esc(fact.source)}</div></div>")


def _summary(s: Summary) -> str:
    grid = _img(s.grid, s.grid_caption, measure="grid") if s.grid else f"<p class=sub>{_esc(s.grid_caption)}</p>"
    model = "".join(f"<tr><td>{_esc(f.label)}</td><td>{_esc(f.value)}"
                    + (f" <span class=note>{_esc(f.source)}</span>" if f.source else "") + "</td></tr>"
                    for f in s.model)
    commands = "".join(f"<div class=l>{_esc(f.label)}"
                       + (f" <span class=note>({_esc(f.source)})</span>" if f.source else "")
                       + f"</div><pre>{_words(f.value)}</pre>" for f in s.commands)
    facts = (f'<div class=facts><h3>How good</h3><div class=cards data-measure="headline">'
             f'{"".join(_card(f) for f in s.quality)}</div>'
             f'<h3>For how long</h3><div class=cards data-measure="duration">'
             f'{"".join(_card(f) for f in s.training)}</div>'
             f"<h3>What was trained</h3><table>{model}</table><h3>Reproduce</h3>{commands}</div>")
    return _section("summary", grid + facts)


# ---------------------------------------------------------------------------------------------- run's figures
def _samples(run: Path, config: dict, shown: Path | None) -> str:
    grids = [g for g in trainer_grids(run)[-1:] + sample_grids(run) if g != shown]
    body = "<h2>Samples</h2>" + "".join(_img(g, str(g.relative_to(run))) for g in grids) if grids else ""
    classes = config.get("classes") if isinstance(config.get("classes"), dict) else None
    if classes and isinstance(classes.get("names"), list):  # a class-conditional run: a row per class
        rows = "".join(f"<tr><td>{k}</td><td>{_esc(name)}</td></tr>" for k, name in enumerate(classes["names"]))
        body += (f"<h2>Classes</h2><p class=sub>class-conditional: sample one class with <code>ddpmkit sample RUN "
                 f"--class LABEL</code>; label {_esc(classes.get('null'))} is the null class of classifier-free "
                 f"guidance</p><table><tr><td>label</td><td>name</td></tr>{rows}</table>")
    return _section("samples", body)


def _reconstructions(run: Path, shown: Path | None) -> str:
    """An autoencoder run's pictures of reconstructions that the summary does not show."""
    figures = [p for p in reconstruction_figures(run) if p != shown]
    return _section("samples", "<h2>Reconstructions</h2><p class=sub>held-out originals (top rows) above their "
                               "reconstructions</p>" + "".join(_img(p, str(p.relative_to(run))) for p in figures)
                    ) if figures else ""


_CURVES = "sample quality (Frechet distance) and loss, loss by timestep, learning rate, throughput"
_AUTOENCODER_CURVES = ("loss and the Frechet distance of the reconstructions, the loss's parts (L1 reconstruction, "
                       "KL, adversarial), held-out PSNR, gradient norm, learning rate, throughput")


def _training(run: Path, caption: str = _CURVES) -> str:
    if not (run / "metrics.csv").is_file():
        return ""
    try:
        body = _img(plots.plot_loss(run / "metrics.csv", run / "loss.png"), caption)
    except plots.PlotError as e:
        body = f"<p class=sub>no curves: {_esc(e)}</p>"
    return _section("training", "<h2>Training</h2>" + body)


def _evaluation(run: Path, s: Summary, shown_elsewhere: tuple[Path, ...] = ()) -> str:
    pngs = sorted((run / "eval").glob("*.png")) if (run / "eval").is_dir() else []
    pngs = [p for p in pngs if p not in shown_elsewhere]
    if not pngs and all(f.value in ("not recorded", "not measured", "not run") for f in s.quality):
        return ""
    rows = "".join(f"<tr><td>{_esc(f.label)}</td><td>{_esc(f.value)}</td><td class=note>{_esc(f.source)}</td></tr>"
                   for f in s.quality)
    return _section("evaluation", f"<h2>Evaluation</h2><table>{rows}</table>"
                    + "".join(_img(p, f"eval/{p.name}") for p in pngs))


def _chains(run: Path) -> str:
    gifs = sorted(run.glob("*.gif")) + sorted(run.glob("samples*/**/*.gif"))
    return _section("chains", "<h2>Sampling chains</h2><p class=sub>x_t (top) beside the predicted x0 (bottom)</p>"
                    + "".join(_img(g, g.stem) for g in gifs)) if gifs else ""


def _editing(run: Path) -> str:
    edits = sorted(run.glob("edits/*/inpaint.png")) + sorted(run.glob("edits/*/sdedit.png"))  # ddpmkit inpaint, edit
    return _section("editing", "<h2>Editing</h2><p class=sub>inpainting (RePaint): original, masked, results; "
                    "SDEdit: the input, then its edits over strengths</p>"
                    + "".join(_img(p, str(p.parent.relative_to(run))) for p in edits)) if edits else ""


# ---------------------------------------------------------------------------------------------- every run's
def _schedules(run: Path, T: int) -> str:
    png = run / "schedule.png"
    if not png.is_file():
        plots.plot_schedule(png, T=T)
    return _section("schedules", "<h2>Noise schedules</h2><p class=sub>the same for every run of this T</p>"
                    + _img(png, f"linear and cosine, T = {T}"))


def _forward(run: Path) -> str:
    png = run / "forward.png"
    return _section("forward", "<h2>Forward process</h2>" + _img(png, "q(x_t given x_0) at several t")
                    ) if png.is_file() else ""


def _configuration(config: dict) -> str:
    rows = settings_rows(config)
    if not rows:
        return ""
    n_changed = sum(r.changed for r in rows)
    if config.get("kind") == "autoencoder":  # no presets: the defaults of `ddpmkit autoencoder train`
        baseline, against = "default", "the defaults of ddpmkit autoencoder train"
    else:
        baseline = config.get("train", {}).get("preset", "?")
        against = f"the {baseline} preset"
    body = "".join(f'<tr class="changed"><td>{_esc(r.name)}</td><td>{_esc(json.dumps(r.value))}</td>'
                   f"<td class=note>{_esc(baseline)}: {_esc(json.dumps(r.preset_value))}</td></tr>"
                   if r.changed else f"<tr><td>{_esc(r.name)}</td><td>{_esc(json.dumps(r.value))}</td></tr>"
                   for r in rows)
    return _section("configuration", f"<details><summary>Configuration: {len(rows)} settings, {n_changed} differ "
                                     f"from {_esc(against)} (marked, first)</summary><table>{body}</table>"
                                     "</details>")


# ---------------------------------------------------------------------------------------------- page
def write_report(run_dir, out=None) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) and return its path."""
    run = Path(run_dir)
    config = read_config(run)
    if config.get("kind") == "autoencoder":
        return _write_page(run, out, _autoencoder_page(run, config))
    diffusion = config.get("diffusion", {})
    T = int(diffusion.get("T", 1000))
    s = summarize(run, config)
    sections = [_summary(s), _samples(run, config, s.grid), _training(run), _evaluation(run, s), _chains(run),
                _editing(run), _schedules(run, T), _forward(run), _configuration(config)]
    sub = (f"{config.get('train', {}).get('preset', 'no')} preset, {diffusion.get('schedule', '?')} schedule, "
           f"T = {T}, objective {diffusion.get('objective', 'eps')}, variance {diffusion.get('variance', '?')}")
    precond = diffusion.get("precond")
    if isinstance(precond, dict) and precond.get("kind") == "edm":
        sub += f", EDM preconditioning (sigma_data {precond.get('sigma_data', '?')})"
    if space(config) == "latent":
        latent = config["latent"]
        shape = latent.get("shape")
        shape = f", {'x'.join(map(str, shape))} latents" if isinstance(shape, list) else ""
        sub += f", in the latent space of the autoencoder {latent.get('autoencoder', '?')}{shape}"
    return _write_page(run, out, (f"ddpmkit run {run.resolve().name}", sub, sections))


def _autoencoder_page(run: Path, config: dict) -> tuple[str, str, list[str]]:
    """An autoencoder run's title, subtitle and sections."""
    s = summarize(run, config)
    sections = [_summary(s), _reconstructions(run, s.grid), _training(run, _AUTOENCODER_CURVES),
                _evaluation(run, s, tuple(reconstruction_figures(run))), _configuration(config)]
    _, f, shape = autoencoder_shape(config.get("model"))
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    sub = f"LDM's KL autoencoder, f = {f}" + (f", {'x'.join(map(str, shape))} latents" if shape else "")
    if "kl_weight" in train:
        sub += f", KL weight {train['kl_weight']:g}"
        sub += ", PatchGAN discriminator" if (train.get("disc_weight") or 0) > 0 else ", no discriminator"
    return f"ddpmkit autoencoder run {run.resolve().name}", sub, sections


def _write_page(run: Path, out, page: tuple[str, str, list[str]]) -> Path:
    title, sub, sections = page
    html_page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
                 f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1><p class=sub>{_esc(sub)}</p>"
                 + "".join(sections) + _CHECK + "</body></html>\n")
    out = Path(out) if out else run / "report.html"
    return atomic_write_text(out, html_page)
