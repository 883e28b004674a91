"""Builder inputs: find them on the driver as small references, read them in tasks.

A SRC is a folder of images (searched recursively; WebDataset tars and image parquet
files inside it are read as such), a WebDataset tar, or an img2dataset-style parquet
file. The driver only lists files and reads parquet footers; it turns them into a
table of references (one per image file, tar, or parquet row group). `read_ref` runs
inside a Ray task and turns one reference into `Item`s carrying the encoded bytes.

Keys are "<SRC name>/<path inside SRC>" for files, "<tar>/<sample key>" for tar
samples and "<parquet file>/<key column or row number>" for parquet rows, where a
tar or parquet file found inside a folder SRC is named by its path there.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysl.data.schema import filesystem_and_path
from raysl.errors import UserError

IMAGE_EXTS = {"jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "tif", "tiff", "gif"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "image")  # first one present is the image
PARQUET_COLUMNS = ("key", "url", "source", "license", "attribution", "label")

REF_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "file", "tar" or "parquet"
        ("root", pa.string()),  # the SRC as an absolute path or URI
        ("rel", pa.string()),  # path inside SRC; "" when SRC is the file itself
        ("key", pa.string()),  # the row key (file) or the key prefix (tar, parquet)
        ("source", pa.string()),  # where it came from, or the prefix of that
        ("group", pa.int64()),  # parquet row group, else -1
        ("first_row", pa.int64()),  # parquet: row number of the group's first row
        ("rows", pa.int64()),  # parquet: rows in the group
        ("column", pa.string()),  # parquet: the image column
    ]
)


@dataclass
class Inputs:
    refs: pa.Table
    ignored_files: int = 0  # files in folders that are neither images, tars nor image parquet
    roots: dict[str, str] = field(default_factory=dict)  # SRC name -> SRC root
    file_keys: set[str] = field(default_factory=set)  # keys of plain image files

    @property
    def estimated_images(self) -> int:
        kinds = self.refs.column("kind").to_pylist()
        rows = self.refs.column("rows").to_pylist()
        return sum(1000 if k == "tar" else r for k, r in zip(kinds, rows))


@dataclass
class Item:
    key: str
    data: bytes | None
    source: str
    license: str = ""
    attribution: str = ""
    label: int | None = None
    reason: str = ""  # set when the input could not even be read (schema.SKIP_REASONS)


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if rel else prefix


def _root(src: str) -> str:
    return src.rstrip("/") if "://" in src else posixpath.abspath(src)


def _parquet_refs(fs, path: str, root: str, rel: str, name: str) -> list[dict] | None:
    """One reference per row group, or None when the file has no image column."""
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
        names = meta.schema.to_arrow_schema().names
    column = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
    if column is None:
        return None
    refs, first = [], 0
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        refs.append(
            dict(
                kind="parquet",
                root=root,
                rel=rel,
                key=_join(name, rel),
                source=_join(root, rel),
                group=g,
                first_row=first,
                rows=rows,
                column=column,
            )
        )
        first += rows
    return refs


def _container_refs(fs, path: str, root: str, rel: str, name: str) -> list[dict] | None:
    """References for a tar or parquet file, or None if it is neither (or has no images)."""
    lower = path.lower()
    if lower.endswith(TAR_SUFFIXES):
        return [
            dict(
                kind="tar",
                root=root,
                rel=rel,
                key=_join(name, rel),
                source=_join(root, rel),
                group=-1,
                first_row=0,
                rows=0,
                column="",
            )
        ]
    if lower.endswith(".parquet"):
        return _parquet_refs(fs, path, root, rel, name)
    return None


def list_inputs(sources: list[str], *, exclude: str | None = None) -> Inputs:
    """References for every input under `sources`; `exclude` (the output folder) is skipped."""
    refs: list[dict] = []
    inputs = Inputs(refs=pa.table({}))
    skip = _root(exclude).rstrip("/") + "/" if exclude else None
    for src in sources:
        fs, path = filesystem_and_path(src)
        path = path.rstrip("/") or "/"
        root = _root(src)
        name = posixpath.basename(path)
        if name in inputs.roots:
            raise UserError(
                f"{src}: has the same name as {inputs.roots[name]}; keys start with the SRC name, "
                "so two SRCs must have different names (rename or link one of them)"
            )
        inputs.roots[name] = root
        info = fs.get_file_info(path)
        found: list[dict] = []
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{src}: no such file or folder")
        if info.type == pafs.FileType.File:
            found = _container_refs(fs, path, root, "", name) or []
            if not found and _ext(name) in IMAGE_EXTS:
                found = [
                    dict(
                        kind="file", root=root, rel="", key=name, source=root, group=-1, first_row=0, rows=1, column=""
                    )
                ]
                inputs.file_keys.add(name)
            if not found:
                raise UserError(
                    f"{src}: not a folder, an image, a WebDataset .tar or a parquet file with an image column"
                )
        else:
            files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            for f in sorted((f for f in files if f.type == pafs.FileType.File), key=lambda f: f.path):
                rel = posixpath.relpath(f.path, path)
                if skip and _join(root, rel).startswith(skip):
                    continue
                if _ext(f.base_name) in IMAGE_EXTS:
                    found.append(
                        dict(
                            kind="file",
                            root=root,
                            rel=rel,
                            key=_join(name, rel),
                            source=_join(root, rel),
                            group=-1,
                            first_row=0,
                            rows=1,
                            column="",
                        )
                    )
                    inputs.file_keys.add(_join(name, rel))
                else:
                    more = _container_refs(fs, f.path, root, rel, name)
                    if more is None:
                        inputs.ignored_files += 1
                    found.extend(more or [])
            if not found:
                raise UserError(f"{src}: no images found in this folder")
        refs.extend(found)
    inputs.refs = pa.Table.from_pylist(refs, schema=REF_SCHEMA)
    return inputs


@lru_cache(maxsize=64)
def _fs(root: str):
    return filesystem_and_path(root)


def _path(ref: dict) -> tuple[pafs.FileSystem, str]:
    fs, root = _fs(ref["root"])
    return fs, posixpath.join(root, ref["rel"]) if ref["rel"] else root


def _int_or_none(value) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        return None


def _str(value) -> str:
    return "" if value is None else str(value)


def _read_file(ref: dict):
    fs, path = _path(ref)
    try:
        with fs.open_input_file(path) as f:
            data = f.read()
    except OSError:
        yield Item(ref["key"], None, ref["source"], reason="unreadable")
        return
    yield Item(ref["key"], data, ref["source"])


def _tar_sample(ref: dict, key: str, members: dict[str, bytes]) -> Item | None:
    image = next((ext for ext in members if ext.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
    if image is None:
        return None  # a sample without an image (e.g. only a caption) is not an input
    item = Item(_join(ref["key"], key), members[image], _join(ref["source"], f"{key}.{image}"))
    if "cls" in members:
        item.label = _int_or_none(members["cls"].strip())
    try:
        side = json.loads(members.get("json", b"{}"))
    except ValueError:
        side = {}
    if isinstance(side, dict):
        item.license = _str(side.get("license"))
        item.attribution = _str(side.get("attribution"))
        item.source = _str(side.get("source") or side.get("url")) or item.source
        if side.get("label") is not None:
            item.label = _int_or_none(side["label"])
    return item


def _read_tar(ref: dict):
    """WebDataset: members with the same key (path up to the first dot of the name) are
    one sample, and a sample's members are consecutive in the tar."""
    fs, path = _path(ref)
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                folder, base = posixpath.split(m.name)
                stem, _, ext = base.partition(".")
                key = posixpath.join(folder, stem)
                if key != current:
                    if current is not None and members and (item := _tar_sample(ref, current, members)):
                        yield item
                    current, members = key, {}
                member = tar.extractfile(m)
                assert member is not None  # a regular file (m.isfile())
                members[ext.lower()] = member.read()
    except (OSError, tarfile.TarError):
        yield Item(ref["key"], None, ref["source"], reason="unreadable")  # the rest of the tar
    if current is not None and members and (item := _tar_sample(ref, current, members)):
        yield item


def _read_parquet(ref: dict):
    fs, path = _path(ref)
    row = ref["first_row"]
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            columns = [ref["column"]] + [c for c in PARQUET_COLUMNS if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=256, row_groups=[ref["group"]], columns=columns):
                for r in batch.to_pylist():
                    data = r[ref["column"]]
                    if isinstance(data, dict):  # Hugging Face image struct {bytes, path}
                        data = data.get("bytes")
                    key = _join(ref["key"], _str(r.get("key")) or str(row))
                    source = _str(r.get("source") or r.get("url")) or f"{ref['source']}#{row}"
                    yield Item(
                        key,
                        data,
                        source,
                        _str(r.get("license")),
                        _str(r.get("attribution")),
                        _int_or_none(r.get("label")),
                    )
                    row += 1
    except OSError:
        for n in range(row, ref["first_row"] + ref["rows"]):
            yield Item(_join(ref["key"], str(n)), None, f"{ref['source']}#{n}", reason="unreadable")


def read_ref(ref: dict):
    """Items of one reference, in a Ray task. Never raises for bad input: an input that
    cannot be read comes back with reason "unreadable"."""
    return {"file": _read_file, "tar": _read_tar, "parquet": _read_parquet}[ref["kind"]](ref)
