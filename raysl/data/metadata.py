"""`--metadata FILE`: per-image license, attribution, source and label from CSV or JSONL.

Each row names its image by `key` (as stored in the shards) or by `path` (absolute, or
relative to a SRC folder). Values given here win over tar sidecars and parquet columns.
The file is checked whole on the driver before any task starts, so a bad row stops the
build with FILE:LINE instead of surfacing inside a Ray task.
"""

from __future__ import annotations

import csv
import json
import posixpath

from raysl.data.schema import filesystem_and_path
from raysl.errors import UserError

FIELDS = ("license", "attribution", "source", "label")


def _label(value, where: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise UserError(f"{where}: label must be an integer, got {value!r}")


def _clean(row: dict, where: str) -> dict:
    """{"path" or "key": ..., and the FIELDS that have a value}. Unknown columns are ignored."""
    out: dict[str, str | int] = {}
    for name in ("path", "key", "license", "attribution", "source"):
        value = row.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise UserError(f"{where}: {name} must be a string, got {value!r}")
        out[name] = value
    if "path" not in out and "key" not in out:
        raise UserError(f"{where}: row has neither a `path` nor a `key` naming its image")
    label = _label(row.get("label"), where)
    if label is not None:
        out["label"] = label
    return out


def read_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, cleaned row) for every row of a CSV or JSONL metadata file."""
    fs, local = filesystem_and_path(path)
    try:
        with fs.open_input_stream(local) as f:
            text = f.read().decode("utf-8-sig")
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise UserError(f"{path}: metadata file not found") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: metadata file is not UTF-8 text ({exc})") from exc
    ext = path.lower().rsplit(".", 1)[-1]
    rows = []
    if ext == "csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"path", "key"} & set(reader.fieldnames):
            raise UserError(f"{path}:1: the CSV header needs a `path` or `key` column")
        for row in reader:
            rows.append((reader.line_num, _clean(row, f"{path}:{reader.line_num}")))
    elif ext in ("jsonl", "ndjson", "json"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{path}:{n}: not valid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
            rows.append((n, _clean(row, f"{path}:{n}")))
    else:
        raise UserError(f"{path}: metadata must be a .csv or .jsonl file")
    return rows


def _key_of_path(p: str, roots: dict[str, str], file_keys: set[str]) -> str | None:
    if posixpath.isabs(p) or "://" in p:
        p = p if "://" in p else posixpath.normpath(p)
        for name, root in roots.items():
            if p.startswith(root.rstrip("/") + "/"):
                return f"{name}/{posixpath.normpath(p[len(root.rstrip('/')) + 1 :])}"
        return None
    candidates = [f"{name}/{posixpath.normpath(p)}" for name in roots]
    return next((k for k in candidates if k in file_keys), candidates[0] if len(candidates) == 1 else None)


def load_metadata(path: str, roots: dict[str, str], file_keys: set[str]) -> tuple[dict[str, dict], int]:
    """(key -> fields, number of rows) for the inputs listed by sources.list_inputs.
    Rows whose path lies in no SRC are left out (the build reports them as unmatched)."""
    rows = read_rows(path)
    by_key: dict[str, dict] = {}
    lines: dict[str, int] = {}
    for line, row in rows:
        key = row.get("key") or _key_of_path(row["path"], roots, file_keys)
        if key is None:
            continue
        if key in lines:
            raise UserError(f"{path}:{line}: {key} already has metadata on line {lines[key]}")
        lines[key] = line
        by_key[key] = {f: row[f] for f in FIELDS if f in row}
    return by_key, len(rows)
