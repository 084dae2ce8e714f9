"""The docs site's hooks (``hooks:`` in mkdocs.yml): the same Markdown as on GitHub, nothing copied.

- The repository's README.md is the home page (``index.md`` on the site) and docs/README.md the manual's index
  (at ``manual/``). Their links are written for GitHub: the README's ``docs/x.md`` and ``docs/x.png`` become
  ``x.md`` and ``x.png``, and a docs page's ``../README.md`` becomes the home page, so that MkDocs resolves (and
  under ``--strict`` checks) them as it does every other link.
- The navigation is read from the table of docs/README.md, in its order and with its titles: a page added to that
  table is on the site, and a page left out of it fails the strict build (``validation: omitted_files``).
- The API reference (``api.md``) is generated from :data:`API`: one mkdocstrings ``:::`` directive per object.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

HOME = "index.md"  # the repository's README.md, as the site's home page
INDEX = "README.md"  # docs/README.md, the manual's index
INDEX_DEST = "manual/index.html"  # where the index goes: docs/README.md would be the site's index.html otherwise
API_PAGE = "api.md"

# The API reference: (section, the objects it documents), in the order of docs/python-api.md.
API = [
    ("Runs", ["ddpmkit.run.Run"]),
    ("The Denoiser", ["ddpmkit.diffusion.Denoiser", "ddpmkit.diffusion.Prediction"]),
    ("Schedules", ["ddpmkit.diffusion.NoiseSchedule"]),
    ("Samplers", ["ddpmkit.samplers.sample", "ddpmkit.samplers.resolve", "ddpmkit.samplers.SamplingPlan",
                  "ddpmkit.samplers.register", "ddpmkit.samplers.sampler_names", "ddpmkit.samplers.get_sampler",
                  "ddpmkit.samplers.SamplerInfo", "ddpmkit.samplers.Option", "ddpmkit.samplers.timesteps",
                  "ddpmkit.samplers.PerSampleNoise", "ddpmkit.samplers.GeneratorNoise"]),
    ("Requests and generation", ["ddpmkit.request.SampleOptions", "ddpmkit.request.Request",
                                 "ddpmkit.generate.generate"]),
    ("Models", ["ddpmkit.models.UNet", "ddpmkit.models.unet_from_preset", "ddpmkit.models.AutoencoderKL",
                "ddpmkit.models.DiagonalGaussian"]),
    ("Latent spaces", ["ddpmkit.latent.LatentSpace"]),
    ("Training", ["ddpmkit.train.TrainConfig", "ddpmkit.train.config_from_preset", "ddpmkit.train.train",
                  "ddpmkit.train.Trainer"]),
    ("Editing", ["ddpmkit.edit.repaint", "ddpmkit.edit.sdedit", "ddpmkit.edit.make_mask",
                 "ddpmkit.edit.load_images"]),
    ("diffusers", ["ddpmkit.interop.import_diffusers", "ddpmkit.interop.export_diffusers"]),
]

ROW = re.compile(r"^\|\s*\[([^\]]+)\]\(([^)\s#]+\.md)\)\s*\|", re.M)  # a row of the index: | [Title](page.md) | ...
LINK = re.compile(r"(\]\()([^)\s]+)")  # the target of an inline link or picture
CODE = re.compile(r"^(`{3,}|~{3,}).*?^\1|(`+).+?\2", re.S | re.M)  # fenced blocks and code spans: left as they are


def manual_pages(docs_dir) -> list[tuple[str, str]]:
    """(title, page) of each row of docs/README.md's table, in order."""
    return ROW.findall((Path(docs_dir) / INDEX).read_text(encoding="utf-8"))


def api_page() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings; the [Python API](python-api.md) page is the tour of the same objects.", ""]
    for section, objects in API:
        lines += [f"## {section}", ""]
        for name in objects:
            lines += [f"::: {name}", ""]
    return "\n".join(lines)


def relink(markdown: str, rewrite) -> str:
    """``markdown`` with each link target outside code passed through ``rewrite``."""
    out, at = [], 0
    for m in CODE.finditer(markdown):
        out += [LINK.sub(lambda k: k.group(1) + rewrite(k.group(2)), markdown[at:m.start()]), m.group(0)]
        at = m.end()
    out.append(LINK.sub(lambda k: k.group(1) + rewrite(k.group(2)), markdown[at:]))
    return "".join(out)


def _from_readme(target: str) -> str:
    return target[len("docs/"):] if target.startswith("docs/") else target


def _from_docs(target: str) -> str:
    path, hash_, anchor = target.partition("#")
    return HOME + hash_ + anchor if path == "../README.md" else target


# ---------------------------------------------------------------------------------------------- MkDocs' events
def on_config(config):
    pages = [{title: page} for title, page in manual_pages(config.docs_dir)]
    config.nav = [{"Home": HOME}, {"Manual": [{"Contents": INDEX}, *pages]}, {"API reference": API_PAGE}]
    return config


def on_files(files, config):
    index = files.get_file_from_path(INDEX)
    files.remove(index)
    files.append(File(INDEX, config.docs_dir, config.site_dir, config.use_directory_urls, dest_uri=INDEX_DEST))
    readme = Path(config.config_file_path).parent / "README.md"
    files.append(File.generated(config, HOME, content=readme.read_text(encoding="utf-8")))
    files.append(File.generated(config, API_PAGE, content=api_page()))
    return files


def on_page_markdown(markdown, page, config, files):
    return relink(markdown, _from_readme if page.file.src_uri == HOME else _from_docs)
