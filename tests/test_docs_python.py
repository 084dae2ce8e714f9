"""Every ```python block of the README and docs/ runs, as a user would run it, against tiny runs.

Each page's blocks run in order in one namespace (a block may use what an earlier block of its page defined, as in
a doctest session), in a fresh working directory where the runs the blocks name exist at the paths they use:
``runs/demo`` (class-conditional, as ``ddpmkit demo`` trains it), ``runs/digits`` (unconditional, as ``ddpmkit train
--preset digits`` does), ``runs/ae`` (an autoencoder) and ``runs/latent`` (class-conditional, on ``runs/ae``'s
latents). They are tiny (conftest's TINY_NET at the digits' 8x8, T = 1000 as a real run has, a few steps): the
blocks' numbers mean nothing, their names, calls and shapes are what is checked.

A block that cannot run here (it needs a GPU, a download, CIFAR-10 on disk) says so in the Markdown, on the line
just before its fence: ``<!-- not run: the reason -->``. It is still compiled, and reported as skipped with its
reason; such blocks are to stay rare.
"""

from __future__ import annotations

import re
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import tiny_flags, tiny_run

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# a ```python fence and its body; an optional `<!-- not run: why -->` on the line just before it
BLOCK = re.compile(r"^(?:<!--\s*not run:\s*(?P<why>.*?)\s*-->\n)?```python[^\n]*\n(?P<body>.*?)^```", re.S | re.M)
RUN_PATH = re.compile(r"""["']runs/([\w.-]+)""")

MAX_NOT_RUN = 3  # blocks marked `not run` in all the pages together: the exception, not the rule


@dataclass
class Block:
    page: Path
    line: int  # the line of the page where the block's code starts (1-based)
    code: str
    not_run: str | None  # the reason given, for a block marked not run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("body")) + 1
        found.append(Block(page, line, m.group("body"), m.group("why")))
    return found


ALL = [b for page in PAGES for b in blocks(page)]


# ---------------------------------------------------------------------------------------------- the runs they use
T = 1000  # a real run's: the blocks may ask for 50, 100 or 250 steps
TINY_AE = ["--image-size", "8", "--factor", "2", "--latent-channels", "2", "--base-channels", "8",
           "--layers-per-block", "1", "--num-groups", "4", "--no-mid-attention", "--steps", "3", "--batch-size", "8",
           "--num-samples", "0", "--eval-every", "0", "--sample-every", "1000", "--quiet"]


def _train_demo(out: Path, runs: Runs):
    tiny_run(out.parent, out.name, class_cond=True, T=T, steps=4, batch_size=16)


def _train_digits(out: Path, runs: Runs):
    tiny_run(out.parent, out.name, T=T, steps=4)


def _train_ae(out: Path, runs: Runs):
    from ddpmkit.cli import main

    assert main(["autoencoder", "train", *TINY_AE, "--out", str(out)]) == 0


def _train_latent(out: Path, runs: Runs):
    from ddpmkit.cli import main

    flags = tiny_flags(class_cond=True, T=T, steps=3, num_samples=0, sample_every=1000)
    assert main(["train", "--autoencoder", str(runs.path("ae")), *flags, "--out", str(out)]) == 0


class Runs:
    """The tiny runs, each trained once per test session, when a page first names it."""

    BUILDERS = {"demo": _train_demo, "digits": _train_digits, "ae": _train_ae, "latent": _train_latent}

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        if name not in self.built:
            out = self.root / name
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("DDPMKIT_CACHE", str(self.root / "cache"))  # the latent run's encoded data set stays here
                self.BUILDERS[name](out, self)
            self.built[name] = out
        return self.built[name]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("docs-runs"))


# ---------------------------------------------------------------------------------------------- running them
def run_blocks(page_blocks: list[Block], namespace: dict) -> str | None:
    """Run the blocks in order in ``namespace``; None, or the first failure: where, and its traceback (the frames
    of the block and below, its lines numbered as in the page)."""
    for b in page_blocks:
        code = compile("\n" * (b.line - 1) + b.code, str(b.page.relative_to(ROOT)), "exec")
        try:
            exec(code, namespace)
        except Exception as e:
            lines = traceback.format_exception(type(e), e, e.__traceback__.tb_next)  # not this function's frame
            return f"the block at {b.where} failed:\n" + "".join(lines)
    return None


# ---------------------------------------------------------------------------------------------- the tests
def test_the_pages_have_python_blocks():
    # the extraction works: the blocks are found, with the lines they start on
    assert len(ALL) >= 6, [b.where for b in ALL]
    readme = [b for b in ALL if b.page == ROOT / "README.md"]
    assert readme
    text = readme[0].page.read_text(encoding="utf-8").splitlines()
    assert text[readme[0].line - 2] == "```python" and text[readme[0].line - 1] == readme[0].code.splitlines()[0]


def test_a_failing_block_fails_and_names_its_line():
    page = ROOT / "docs" / "example.md"  # never written: the blocks are made here, as the pages' would be
    good = Block(page, 3, "import math\nx = math.sqrt(4)\n", None)
    bad = Block(page, 12, "y = x + 1\n\nz = y / undefined_name\n", None)
    namespace = {}
    assert run_blocks([good], namespace) is None and namespace["x"] == 2.0
    failure = run_blocks([good, bad], {})
    assert failure.startswith("the block at docs/example.md:12 failed")
    assert 'File "docs/example.md", line 14' in failure and "NameError" in failure, failure


def test_a_block_is_marked_not_run_just_before_its_fence(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n<!-- not run: needs a GPU -->\n```python\nimport torch\n```\n\n"
                    "<!-- not run: too far above -->\n\n```python\nx = 1\n```\n", encoding="utf-8")
    found = blocks(page)
    assert [(b.line, b.code, b.not_run) for b in found] == [(5, "import torch\n", "needs a GPU"), (11, "x = 1\n", None)]


def test_few_blocks_are_not_run_and_each_says_why():
    not_run = [b for b in ALL if b.not_run is not None]
    assert all(b.not_run for b in not_run), [f"{b.where}: no reason given" for b in not_run if not b.not_run]
    assert len(not_run) <= MAX_NOT_RUN, [f"{b.where}: {b.not_run}" for b in not_run]
    for b in not_run:
        compile(b.code, b.where, "exec")  # still Python
    if not_run:
        pytest.skip(f"{len(not_run)} of {len(ALL)} Python blocks not run: "
                    + "; ".join(f"{b.where} ({b.not_run})" for b in not_run))


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.not_run is None for b in blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_blocks_of_a_page_run(page, runs, tmp_path, monkeypatch):
    page_blocks = [b for b in blocks(page) if b.not_run is None]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a block never reaches the network
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))  # nor writes into the user's cache
    for name in sorted({n for b in page_blocks for n in RUN_PATH.findall(b.code)} & set(Runs.BUILDERS)):
        shutil.copytree(runs.path(name), tmp_path / "runs" / name)  # a copy: a block may write into its run
    failure = run_blocks(page_blocks, {"__name__": "__main__"})
    if failure is not None:
        pytest.fail(failure, pytrace=False)
