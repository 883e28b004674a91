"""benchmarks/: every result is a complete .md/.json pair, and README's headline table is the one they give."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from raysl import cli
from raysl.bench import results

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "benchmarks"
RESULTS = sorted(FOLDER.glob("*.json"))


def test_readme_headline_table_is_the_generated_one():
    readme = ROOT / "README.md"
    text = readme.read_text()
    assert results.rewrite(text, FOLDER, readme) == text, (
        "README's headline table is stale: run python -m raysl.bench.results README.md"
    )


def test_every_result_is_a_md_and_json_pair():
    stems = {p.stem for p in FOLDER.glob("*.md") if p.name != "README.md"}
    assert RESULTS, "no results in benchmarks/"
    assert stems == {p.stem for p in RESULTS}, "each benchmarks/DATE-NAME.md needs its .json, and the other way round"


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_result_has_the_required_fields(path):
    result = results.load(path)  # names the missing field or the wrong date
    assert re.fullmatch(r"[0-9a-f]{7,40}", result["commit"]), f"{path.name}: commit is not a git hash"
    assert result["command"] and result["machine"]
    assert {"python", "torch"} <= set(result["versions"]), f"{path.name}: versions needs at least python and torch"
    assert result["tables"], f"{path.name}: no table"


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_md_shows_the_json_figures(path):
    result, md = results.load(path), path.with_suffix(".md").read_text()
    for table in result["tables"]:
        assert results.markdown_table(table) in md, f"{path.with_suffix('.md').name}: table {table['title']!r} differs"
    for row in result["headline"]:
        for number in re.findall(r"\d[\d,.]*\d|\d", row["value"] + " " + row["baseline"]):
            assert number in md, f"{path.name}: headline figure {number} is not in its .md"


def test_every_benchmark_named_has_a_result():
    text = (FOLDER / "README.md").read_text()
    (bench,) = [entry for entry in cli.TREE if entry.name == "bench"]
    commands = {command.name for command in bench.commands}
    assert commands, "no bench subcommands found in raysl.cli.TREE"
    named = set(re.findall(r"raysl bench (\w+)", text))
    assert commands <= named, f"benchmarks/README.md does not describe raysl bench {sorted(commands - named)}"
    for name in named:
        assert list(FOLDER.glob(f"*-bench-{name}.json")), f"raysl bench {name} has no benchmarks/*-bench-{name}.json"
    for link in re.findall(r"\]\(([^)#:]+)\)", text):
        assert (FOLDER / link).exists(), f"benchmarks/README.md links to {link}, which is not there"


def _result(folder: Path, stem: str, label: str = "a", drop: str = "", **change) -> Path:
    result = {
        "benchmark": "`raysl bench x`",
        "command": "raysl bench x",
        "date": stem[:10],
        "commit": "abc1234",
        "machine": "m",
        "versions": {"python": "3.11", "torch": "2"},
        "headline": [{"label": label, "value": "1", "baseline": "2"}],
        "tables": [],
    } | change
    result.pop(drop, None)
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(result))
    return path


def test_the_newest_result_of_each_name_gives_the_headline(tmp_path):
    _result(tmp_path, "2026-01-01-bench-x", "old")
    _result(tmp_path, "2026-02-01-bench-y", "other")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.BEGIN}\nanything\n{results.END}\nrest\n")
    before = results.rewrite(readme.read_text(), tmp_path, readme)
    assert "| old |" in before and "| other |" in before and "(2026-01-01-bench-x.md)" in before
    assert before.startswith("intro\n") and before.endswith(f"{results.END}\nrest\n")
    _result(tmp_path, "2026-03-01-bench-x", "new")
    after = results.rewrite(before, tmp_path, readme)
    assert "| new |" in after and "| old |" not in after and "| other |" in after
    assert after != before


@pytest.mark.parametrize(
    ("stem", "change", "says"),
    [
        ("2026-01-01-bench-x", {"drop": "commit"}, "missing field(s) commit"),
        ("2026-01-01-bench-x", {"date": "2026-01-02"}, "file name says 2026-01-01"),
        ("bench-x", {"date": "2026-01-01"}, "YYYY-MM-DD-name.json"),
        ("2026-01-01-bench-x", {"headline": [{"label": "a", "value": "1"}]}, "label, value, baseline"),
        ("2026-01-01-bench-x", {"tables": [{"title": "t", "columns": ["a", "b"], "rows": [[1]]}]}, "2 cells wide"),
        ("2026-01-01-bench-x", {"tables": [{"title": "t", "rows": []}]}, "title, columns, rows"),
    ],
)
def test_a_bad_result_is_one_clear_error(tmp_path, stem, change, says):
    path = _result(tmp_path, stem, **change)
    with pytest.raises(ValueError, match=re.escape(f"{stem}.json: ")) as error:
        results.load(path)
    assert says in str(error.value)


def test_readme_without_markers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="markers"):
        results.rewrite("no table here\n", tmp_path, tmp_path / "README.md")
