"""The README's table of `method.*` keys, written from the methods' config dataclasses.

`python -m raysl.methods.docs README.md` rewrites the table between its markers; a test
checks that the README's table is what this writes."""

from __future__ import annotations

import dataclasses
import sys

from raysl.methods.base import discover
from raysl.methods.keys import MethodConfig

BEGIN, END = "<!-- method keys: begin (python -m raysl.methods.docs README.md) -->", "<!-- method keys: end -->"


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
    if BEGIN not in text or END not in text:
        raise ValueError(f"no {BEGIN!r} ... {END!r} markers")
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{key_table()}\n{END}{rest.split(END, 1)[1]}"


if __name__ == "__main__":
    path = sys.argv[1]
    with open(path) as f:
        new = rewrite(f.read())
    with open(path, "w") as f:
        f.write(new)
