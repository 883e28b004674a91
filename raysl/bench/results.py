"""Measured results in `benchmarks/`, and the README's headline table written from them.

Each result is a pair `benchmarks/YYYY-MM-DD-NAME.md` (for people) and `.json` (for
programs) with the fields in `REQUIRED`. Its `headline` is a list of
`{"label", "value", "baseline"}` rows; its `tables` are `{"title", "columns", "rows"}`
(optionally `command`, `commit`, `conditions`), and each table's markdown (`markdown_table`) appears
verbatim in the `.md`. The newest file of each NAME supplies the headline rows.

`python -m raysl.bench.results README.md` rewrites the README's table between its
markers from the `benchmarks/` folder beside it; `python -m raysl.bench.results --tables
FILE.json` prints a result's tables as markdown, to paste into its `.md`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from raysl.doc_markers import replace_between

BEGIN = "<!-- headline results: begin (python -m raysl.bench.results README.md) -->"
END = "<!-- headline results: end -->"
REQUIRED = ("benchmark", "command", "date", "commit", "machine", "versions", "headline", "tables")
HEADLINE_KEYS = ("label", "value", "baseline")
# the headline table's row order; other names follow in name order
ORDER = (
    "bench-data",
    "bench-e2e",
    "bench-step",
    "bench-optim",
    "bench-memory",
    "vitg-pretrain",
    "bench-plan",
    "bench-methods",
)
NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})-([a-z0-9][a-z0-9-]*)$")


def _date_and_name(path: Path) -> tuple[str, str]:
    match = NAME.match(path.stem)
    if not match:
        raise ValueError(f"{path}: name a result YYYY-MM-DD-name.json (lowercase name, dashes)")
    return match.group(1), match.group(2)


def load(path: Path) -> dict:
    """One result's JSON, checked: its name is DATE-NAME.json, its date matches, every field is there."""
    date, _ = _date_and_name(path)
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    missing = [key for key in REQUIRED if key not in result]
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
    if result["date"] != date:
        raise ValueError(f"{path}: field date is {result['date']!r}, the file name says {date}")
    for row in result["headline"]:
        if sorted(row) != sorted(HEADLINE_KEYS):
            raise ValueError(f"{path}: each headline row needs exactly the keys {', '.join(HEADLINE_KEYS)}")
    for table in result["tables"]:
        if not {"title", "columns", "rows"} <= set(table):
            raise ValueError(f"{path}: each table needs the keys title, columns, rows")
        width = len(table["columns"])
        if any(len(row) != width for row in table["rows"]):
            raise ValueError(f"{path}: table {table['title']!r} has a row that is not {width} cells wide")
    return result


def results(folder: Path) -> dict[Path, dict]:
    """Every result in `folder`, oldest first (file names start with the date)."""
    return {path: load(path) for path in sorted(folder.glob("*.json"))}


def latest(folder: Path) -> dict[Path, dict]:
    """The newest result of each benchmark name, in ORDER, then in name order."""
    every = results(folder)
    newest = {_date_and_name(path)[1]: path for path in every}
    names = sorted(newest, key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER), name))
    return {newest[name]: every[newest[name]] for name in names}


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def markdown_table(table: dict) -> str:
    lines = ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def headline_table(folder: Path, link_from: Path) -> str:
    """The headline rows of the newest result of each benchmark; links relative to `link_from`'s folder."""
    lines = ["| benchmark | figure | raysl | baseline (same run) | measured |", "|---|---|---|---|---|"]
    for path, result in latest(folder).items():
        link = Path(os.path.relpath(path.with_suffix(".md"), link_from.parent)).as_posix()
        for row in result["headline"]:
            cells = (result["benchmark"], row["label"], row["value"], row["baseline"], f"[{result['date']}]({link})")
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def rewrite(text: str, folder: Path, link_from: Path) -> str:
    """`text` with the table between BEGIN and END written afresh."""
    table = headline_table(folder, link_from)
    try:
        return replace_between(text, BEGIN, END, table)
    except ValueError as error:
        raise ValueError(f"{link_from}: {error}") from None


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "--tables":
        print("\n\n".join(markdown_table(t) for t in load(Path(argv[1]))["tables"]))
        return
    if len(argv) != 1:
        raise SystemExit("usage: python -m raysl.bench.results README.md | --tables benchmarks/FILE.json")
    readme = Path(argv[0])
    readme.write_text(rewrite(readme.read_text(), readme.parent / "benchmarks", readme))


if __name__ == "__main__":
    main(sys.argv[1:])
