"""The reference of every config key in docs/configuration.md, written from `raysl.config`'s own
fields: each key's default, what it accepts (its checks) and what it means (its `help`).

`python -m raysl.config_docs [docs/configuration.md]` rewrites the tables between their markers; a
test checks that the page holds what this writes and that every key has its help."""

from __future__ import annotations

import dataclasses
import re
import types
import typing

from raysl.config import Config, section_fields
from raysl.doc_markers import replace_between, rewrite_file
from raysl.methods.base import discover
from raysl.methods.keys import MethodConfig

PAGE = "docs/configuration.md"
BEGIN, END = (
    "<!-- config keys: begin (python -m raysl.config_docs docs/configuration.md) -->",
    "<!-- config keys: end -->",
)
_KINDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("text", "texts")}


def sections() -> dict[str, type]:
    """Each section of Config and the dataclass of its keys (`method`: the keys every method has)."""
    hints = typing.get_type_hints(Config)
    return {name: MethodConfig if name == "method" else hints[name] for name in section_fields(Config)}


def _value(value) -> str:
    """A value as it is written in a recipe or an override."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, list):
        return f"[{', '.join(map(_value, value))}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return re.sub(r"e-0(\d)$", r"e-\1", repr(value))  # 1e-6, not 1e-06


def _bound(value) -> str:
    return _value(int(value) if float(value).is_integer() else value)


def default(f: dataclasses.Field):
    factory = f.default_factory
    return factory() if callable(factory) else f.default


def _range(meta) -> str:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open")
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_bound(lo)}, {_bound(hi)}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_bound(lo)}"
    return f"<= {_bound(hi)}" if hi is not None else ""


def accepts(typ, meta) -> str:
    """What a key takes, in words, from its type and its checks (raysl.checks)."""
    if isinstance(typ, types.UnionType):  # data.shards: one value or a list of them
        return (
            "a path or URI, or a list of them"
            if meta.get("path")
            else " or ".join(accepts(a, meta) for a in typing.get_args(typ))
        )
    origin = typing.get_origin(typ)
    if origin is list:
        each = meta.get("each", {})
        item = _KINDS[typing.get_args(typ)[0]][1]
        what = f"[lo, hi] of {item}" if meta.get("length") == 2 else f"a list of {item}"
        what += f", each {_range(each)}" if _range(each) else ""
        return what + (", or []" if meta.get("empty_ok") else "")
    if origin is dict:
        return f"{{resource: amount}}, amounts {_range(meta)}"
    if "choices" in meta:
        return "one of " + ", ".join(f"`{_value(c)}`" for c in meta["choices"])
    if typ is bool:
        return "true or false"
    if meta.get("path"):
        return "a path or URI"
    return " ".join(filter(None, (_KINDS[typ][0], _range(meta))))


def section_table(name: str, cls: type) -> str:
    hints = typing.get_type_hints(cls)
    lines = ["| key | default | accepts | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        takes = accepts(hints[f.name], f.metadata)
        if (name, f.name) == ("method", "name"):
            takes = "one of " + ", ".join(f"`{m}`" for m in sorted(discover()))
        lines.append(f"| `{name}.{f.name}` | `{_value(default(f))}` | {takes} | {f.metadata['help']} |")
    return "\n".join(lines)


def reference() -> str:
    """A table of the sections, then one table of keys per section."""
    parts = ["| section | what it sets |", "|---|---|"]
    parts += [f"| [`{f.name}`](#{f.name}) | {f.metadata['help']} |" for f in dataclasses.fields(Config)]
    for name, cls in sections().items():
        parts += ["", f"### {name}", "", section_table(name, cls)]
        if name == "method":
            parts += ["", "Every other `method.*` key belongs to one method or a few: see [methods.md](methods.md)."]
    return "\n".join(parts)


def rewrite(text: str) -> str:
    return replace_between(text, BEGIN, END, reference())


if __name__ == "__main__":
    rewrite_file(rewrite, PAGE)
