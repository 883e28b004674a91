"""The table of `method.*` keys in docs/methods.md, written from the methods' config dataclasses.

`python -m raysl.methods.docs [docs/methods.md]` rewrites the table between its markers; a test
checks that the page's table is what this writes."""

from __future__ import annotations

import dataclasses

from raysl.doc_markers import replace_between, rewrite_file
from raysl.methods.base import discover
from raysl.methods.keys import MethodConfig

PAGE = "docs/methods.md"
BEGIN, END = "<!-- method keys: begin (python -m raysl.methods.docs docs/methods.md) -->", "<!-- method keys: end -->"


def _default(f: dataclasses.Field) -> str:
    value = f.default
    return f"`{str(value).lower()}`" if isinstance(value, bool) else f"`{value!r}`".replace("''", '""')


def key_table() -> str:
    """One row per key: the key, its default, what it means, and the methods that read it."""
    methods = discover()
    common = {g.name for g in dataclasses.fields(MethodConfig)}
    rows: dict[tuple, list[str]] = {}  # a key two methods define differently gets two rows
    for name in sorted(methods):
        for f in dataclasses.fields(methods[name].config_class):
            if f.name not in common:
                rows.setdefault((f.name, _default(f), f.metadata.get("help", "")), []).append(name)
    lines = ["| key | default | meaning | methods |", "|---|---|---|---|"]
    for (key, default, meaning), users in rows.items():
        others = sorted(set(methods) - set(users))
        used = f"all but {', '.join(others)}" if len(users) > 2 and len(others) <= 1 else ", ".join(users)
        lines.append(f"| `method.{key}` | {default} | {meaning} | {used} |")
    return "\n".join(lines)


def rewrite(text: str) -> str:
    return replace_between(text, BEGIN, END, key_table())


if __name__ == "__main__":
    rewrite_file(rewrite, PAGE)
