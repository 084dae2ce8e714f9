"""The README and docs/ name only commands, flags, scripts, files and anchors that exist."""
import argparse
import functools
import re
from pathlib import Path

import pytest

from ddpmkit.cli import build_parser

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

# A flag the docs name on purpose as one the parser refuses (the tests page: flags are never abbreviated).
REFUSED_ON_PURPOSE = {("train", "--log-e")}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")
# `ddpmkit CMD`, `python -m ddpmkit CMD` and torchrun's `-m ddpmkit CMD`; not `ddpmkit.x`, `ddpmkit[x]` or `ddpmkit:`
COMMAND = re.compile(r"(?:^|(?<=[\s(]))(?:python3? )?(?:-m )?ddpmkit +([a-z][\w-]*)(.*)")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
BENCH = re.compile(r"(?:^|(?<=\s))(?:python3? )?(?:bench/)?([\w]+\.py)(?=\s|$)(.*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$", re.M)


def _text(path):
    return path.read_text(encoding="utf-8")


def _bash_lines(text):
    """The command lines of the ```bash blocks: continuations joined, comments dropped."""
    for lang, body in FENCE.findall(text):
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            yield re.sub(r"(?:^|\s)#.*$", "", line)


def _prose(text):
    """The text outside fenced blocks."""
    return FENCE.sub("", text)


def _spans(text):
    """The inline code spans outside fenced blocks, whitespace (a span may wrap a line) made single."""
    return [" ".join(s.split()) for s in SPAN.findall(_prose(text))]


def _pieces():
    """(page, the text of one command line or inline span) for every place a command could be named."""
    for page in PAGES:
        text = _text(page)
        for line in _bash_lines(text):
            yield page, line
        for span in _spans(text):
            if span.split(" ", 1)[0] in _commands_by_name() and FLAG.search(span):
                span = "ddpmkit " + span  # `sample --sampler ddim`, `eval fid --class C`: a command without its name
            yield page, span


def _subcommands(parser):
    """{name: parser} of a parser's subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@functools.cache
def _commands_by_name():
    """{name: parser} of ddpmkit's subcommands."""
    return _subcommands(build_parser())


def _commands():
    """(page, subcommand, its parser or None, the flags named after it) for each ddpmkit command in the docs."""
    found = []
    for page, piece in _pieces():
        for part in re.split(r"&&|\|\||;|\|", piece):
            m = COMMAND.search(part)
            if not m:
                continue
            name, rest = m.group(1), m.group(2)
            parser = _commands_by_name().get(name)
            words = rest.split()
            while parser is not None and words and _subcommands(parser).get(words[0]) is not None:
                parser = _subcommands(parser)[words.pop(0)]  # a nested subcommand, should one appear
            found.append((page, name, parser, FLAG.findall(rest)))
    return found


def _bench_scripts():
    """(page, script name, the flags named after it) for each `python bench/X.py ...` in the docs."""
    found = []
    for page, piece in _pieces():
        for part in re.split(r"&&|\|\||;|\|", piece):
            m = BENCH.search(part)
            if m and (part.lstrip().startswith(("python", "bench/")) or (ROOT / "bench" / m.group(1)).exists()):
                found.append((page, m.group(1), FLAG.findall(m.group(2))))
    return found


def test_the_docs_name_many_commands():
    # the extraction itself works: it finds the commands the pages are full of
    commands = _commands()
    assert len(commands) >= 80, len(commands)
    assert {name for _, name, _, _ in commands} >= {"demo", "train", "sample", "eval", "plot", "report", "inpaint",
                                                    "edit", "import-diffusers", "export-diffusers"}
    assert len(_bench_scripts()) >= 15


def test_every_ddpmkit_command_is_a_subcommand_with_its_flags():
    bad = []
    for page, name, parser, flags in _commands():
        where = page.relative_to(ROOT)
        if parser is None:
            bad.append(f"{where}: `ddpmkit {name}` is not a subcommand")
            continue
        for flag in flags:
            known = flag in parser._option_string_actions
            if (name, flag) in REFUSED_ON_PURPOSE:
                assert not known, f"{where}: `ddpmkit {name} {flag}` is named as refused but exists"
            elif not known:
                bad.append(f"{where}: `ddpmkit {name}` has no flag {flag}")
    assert not bad, "\n".join(bad)


def test_every_bench_script_exists_with_its_flags():
    bad = []
    for page, script, flags in _bench_scripts():
        where = page.relative_to(ROOT)
        path = ROOT / "bench" / script
        if not path.exists():
            bad.append(f"{where}: bench/{script} does not exist")
            continue
        source = _text(path)
        bad += [f"{where}: bench/{script} has no flag {f}" for f in flags
                if f'"{f}"' not in source and f"'{f}'" not in source]
    assert not bad, "\n".join(bad)


def test_readme_is_a_front_page():
    text = _text(README)
    assert len(text.splitlines()) <= MAX_README_LINES
    ci = _text(ROOT / ".ci" / "run")
    for command in ("make demo", "make test"):  # the README's two commands are the ones CI runs
        assert command in text and command in ci, command


def test_every_make_target_exists():
    targets = set(re.findall(r"^([\w-]+):", _text(ROOT / "Makefile"), re.M))
    named = set()
    for page, piece in _pieces():
        named |= {(page.relative_to(ROOT), m) for m in re.findall(r"(?:^|(?<=\s))make +([a-z][\w-]*)", piece)}
    assert {m for _, m in named} >= {"demo", "test"}
    missing = [f"{where}: `make {m}` is not a target of the Makefile" for where, m in sorted(named) if m not in targets]
    assert not missing, "\n".join(missing)


def _slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"`([^`]*)`", r"\1", heading)
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path):
    seen, anchors = {}, set()
    for _, heading in HEADING.findall(_prose(_text(path))):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_relative_link_and_anchor_resolves():
    bad, checked = [], 0
    for page in PAGES:
        prose = SPAN.sub("", _prose(_text(page)))
        for target in LINK.findall(prose):
            if re.match(r"[a-z][\w+.-]*:", target):  # https:, mailto:
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = page.relative_to(ROOT)
            if not dest.is_file():
                bad.append(f"{where}: {target} is not a file")
            elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
                bad.append(f"{where}: {target} has no heading #{anchor}")
    assert not bad, "\n".join(bad)
    assert checked >= 20, checked


def test_every_docs_page_is_listed_and_linked():
    index = _text(ROOT / "docs" / "README.md")
    readme = _text(README)
    assert "docs/README.md" in readme
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert f"]({page.name}" in index, f"docs/README.md does not list {page.name}"


@pytest.mark.parametrize("heading, slug", [
    ("Multi-GPU and multi-node training", "multi-gpu-and-multi-node-training"),
    ("Evaluation: bits/dim", "evaluation-bitsdim"),
    ("Quality during training, and copying", "quality-during-training-and-copying"),
    ("The `digits` preset", "the-digits-preset"),
])
def test_slug_follows_github(heading, slug):
    assert _slug(heading) == slug
