"""Generated blocks in the docs: text between a begin and an end marker that a generator rewrites.

`raysl.methods.docs` and `raysl.config_docs` write their tables this way; their tests check that
the page holds what the generator writes now."""

from __future__ import annotations

import sys
from collections.abc import Callable


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """`text` with everything between the `begin` and `end` marker lines replaced by `body`."""
    if begin not in text or end not in text:
        raise ValueError(f"no {begin!r} ... {end!r} markers")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"


def rewrite_file(rewrite: Callable[[str], str], default_path: str, argv: list[str] | None = None) -> None:
    """`python -m GENERATOR [PATH]`: rewrite PATH (default: `default_path`, from the repository root)
    in place with `rewrite`."""
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else default_path
    with open(path) as f:
        new = rewrite(f.read())
    with open(path, "w") as f:
        f.write(new)
