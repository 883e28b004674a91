"""The README and the manual in docs/: short README, every command named, links that resolve,
generated tables that match the code they are written from."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in _prose(path)
        if line.startswith("#")
    }


def _verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the CLI down to its leaves; a positional with choices (eval's kind)
    counts as one more level."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _verbs(sub, (*path, name))
    if not found and path:
        kinds = [a for a in parser._actions if not a.option_strings and a.choices and a.nargs is None]
        found = [(*path, choice) for action in kinds for choice in action.choices] or [path]
    return found


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the detail into docs/"


def test_the_first_two_commands_are_make_demo_and_make_test():
    commands, fenced = [], False
    for line in README.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced and line.split("#")[0].strip():
            commands.append(line.split("#")[0].strip())
    assert commands[:2] == ["make demo", "make test"]


def test_the_command_table_names_every_verb():
    from raysl.cli import build_parser

    table = "\n".join(line for line in _prose(README) if line.startswith("|"))
    verbs = _verbs(build_parser())
    assert ("shards", "build") in verbs and ("eval", "knn") in verbs and ("bench", "e2e") in verbs
    missing = [" ".join(v) for v in verbs if not re.search(rf"`raysl {' '.join(v)}(?![\w-])", table)]
    assert not missing, f"README.md's command table lacks: {', '.join('raysl ' + m for m in missing)}"


def test_every_relative_link_points_at_something_that_exists():
    broken = []
    for page in PAGES:
        for line in _prose(page):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # https:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                if not dest.exists():
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_links_every_page_of_the_manual():
    text = README.read_text()
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name}" not in text]
    assert not unlinked, f"README.md does not link docs/{', docs/'.join(unlinked)}"


def test_every_config_key_has_its_meaning():
    from raysl.config import Config
    from raysl.config_docs import sections

    assert all(f.metadata.get("help") for f in dataclasses.fields(Config))
    bare = [
        f"{name}.{f.name}"
        for name, cls in sections().items()
        for f in dataclasses.fields(cls)
        if not f.metadata.get("help")
    ]
    assert not bare, f"config keys without help= in raysl/config.py: {', '.join(bare)}"


def test_the_configuration_page_is_what_the_config_writes():
    from raysl import config_docs

    page = ROOT / config_docs.PAGE
    text = page.read_text()
    assert config_docs.rewrite(text) == text, "docs/configuration.md is stale: run python -m raysl.config_docs"
    for name, cls in config_docs.sections().items():  # every key is on the page, with its default
        for f in dataclasses.fields(cls):
            assert f"| `{name}.{f.name}` | `" in text
