"""Mixtures of shard sets: `data.shards` as a list of sets, sampled in the proportions
`data.weights` (e.g. a curated set at 0.3 and a web set at 0.7).

How a mixture is read. Each set keeps its own per-worker stream exactly as a single set
has it (reader.read_rows: one permutation of its shards per epoch, rank r reads every
world_size-th shard, rows shuffled in windows). The weights become small integers, the
rows each set gives per *round* (0.3/0.7 -> 3 and 7 of every 10 rows; weights are kept
exactly when they are ratios of integers summing to at most 1,000, else rounded to
1/1,000), and a round interleaves them evenly (the j-th row of a set with s rows per
round sits at (2j+1)/2s of the round). So the mixed stream of (seed, epoch, rank) is a
pure function of the sets' streams, and the rows of each set consumed before any
position P are a closed formula of P (`consumed`): a resumed run opens each set's
stream at that count, skipping whole shards before any image is decoded, and replays
the same batches. Every batch holds the sets in the weights' proportions (to one row),
not only the run on average.

How an epoch is defined: it ends when the first set runs out (no sampling with
replacement). Rank r's epoch is as many whole rounds as every set's share for r allows;
steps per epoch are the smallest rank's rows // rows per step, as for one set. Why:
each set is then read at most once per epoch, so no image repeats within an epoch (or a
batch, where a repeated image is a false negative for contrastive methods), and each
set's plan and resume stay the single-set ones, O(shards) per epoch. The larger sets are
read only in part in an epoch, but a different random part each epoch (the shard order
is reshuffled per epoch), so upweighting a small curated set gives shorter epochs, not
repeated images inside one; run more epochs (or set train.max_steps) to see the big set.
The alternative, an epoch of the weighted total that re-reads the small sets (DINOv2's
or webdataset's resampling), needs a second permutation per pass and repeats images
within an epoch.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pyarrow.fs as pafs

from raysl.data import reader
from raysl.data.ahead import Started
from raysl.data.schema import Manifest, filesystem_and_path, read_manifest
from raysl.errors import UserError

MAX_ROUND = 1000  # rows per round at most: weights are exact to 1/1,000
PINS = "shard_sets.json"  # in a run's directory: the index file of each set the run reads


def set_paths(shards: str | list[str]) -> list[str]:
    """`data.shards` as a list of set paths (a single string is a list of one)."""
    return [shards] if isinstance(shards, str) else list(shards)


def shares(weights: list[float]) -> list[int]:
    """Rows per round of each set: the smallest integers in the weights' proportions (up to
    MAX_ROUND in all), else the proportions rounded to 1/MAX_ROUND (largest remainder), at
    least 1 for every positive weight. A zero weight gives 0: the set is listed, never read."""
    total = math.fsum(weights)
    p = [w / total for w in weights]
    for size in range(1, MAX_ROUND + 1):
        s = [round(x * size) for x in p]
        if sum(s) == size and all(abs(x * size - n) < 1e-9 for x, n in zip(p, s)):
            return s
    exact = [x * MAX_ROUND for x in p]
    s = [math.floor(e) for e in exact]
    for i in sorted(range(len(p)), key=lambda i: s[i] - exact[i])[: MAX_ROUND - sum(s)]:
        s[i] += 1
    for i, w in enumerate(weights):
        if w > 0 and s[i] == 0:
            s[max(range(len(s)), key=s.__getitem__)] -= 1
            s[i] = 1
    g = math.gcd(*s)
    return [n // g for n in s]


def round_order(shares: list[int]) -> np.ndarray:
    """The set of each position of a round: the j-th of a set's s rows at (2j+1)/2s, ties
    by set order (exact fractions: the same order on every machine)."""
    slots = sorted((Fraction(2 * j + 1, 2 * s), i) for i, s in enumerate(shares) for j in range(s))
    return np.array([i for _, i in slots], np.int64)


@dataclass
class ShardSet:
    path: str
    name: str  # metrics: drawn/<name>
    share: int  # rows per round
    index: str | None = None  # the index file the run pinned (None: the one manifest.json names now)


class Mixture:
    """One or more shard sets and their interleaving (see the module docstring)."""

    def __init__(self, sets: list[ShardSet]):
        self.sets = sets
        self.shares = np.array([s.share for s in sets], np.int64)
        self.round = int(self.shares.sum())
        self.order = round_order([s.share for s in sets])
        hits = self.order[None, :] == np.arange(len(sets))[:, None]
        # before[i, p]: rows of set i among the first p positions of a round
        self.before = np.concatenate([np.zeros((len(sets), 1), np.int64), np.cumsum(hits, axis=1)], axis=1)
        self._manifests: dict[int, Manifest] = {}

    @property
    def single(self) -> bool:
        return len(self.sets) == 1

    def manifest(self, i: int) -> Manifest:
        if i not in self._manifests:
            self._manifests[i] = read_manifest(self.sets[i].path, self.sets[i].index)
        return self._manifests[i]

    def consumed(self, position: int) -> np.ndarray:
        """Rows of each set among the first `position` rows of the mixed stream."""
        return position // self.round * self.shares + self.before[:, position % self.round]

    def sources(self, start: int, n: int) -> np.ndarray:
        """The set of each of the mixed stream's positions start .. start + n - 1."""
        return self.order[(start + np.arange(n)) % self.round]

    def rows_per_worker(self, *, seed: int, epoch: int, world_size: int) -> np.ndarray:
        """Rows of each rank's (mixed) stream in `epoch`: whole rounds, until the first set
        runs out. One permutation per set (reader.rows_per_worker)."""
        if self.single:
            return np.array(reader.rows_per_worker(self.manifest(0), seed=seed, epoch=epoch, world_size=world_size))
        rounds: np.ndarray | None = None
        for i, s in enumerate(self.sets):
            if not s.share:
                continue
            try:
                rows = np.array(reader.rows_per_worker(self.manifest(i), seed=seed, epoch=epoch, world_size=world_size))
            except UserError as exc:
                raise UserError(f"config key data.shards: {s.path}: {exc}") from exc
            rounds = rows // s.share if rounds is None else np.minimum(rounds, rows // s.share)
        assert rounds is not None  # shares() gives a positive weight a positive share
        return rounds * self.round

    def steps_per_epoch(self, *, batch_size: int, seed: int, epoch: int, world_size: int) -> int:
        """Steps every worker can take in `epoch`; for one set, reader.steps_per_epoch."""
        if self.single:
            return reader.steps_per_epoch(
                self.manifest(0), batch_size=batch_size, seed=seed, epoch=epoch, world_size=world_size
            )
        return int(self.rows_per_worker(seed=seed, epoch=epoch, world_size=world_size).min()) // batch_size

    def batches(
        self,
        open_set,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        batch_size: int,
        start: int = 0,
        drawn: dict | None = None,
    ):
        """Rank `rank`'s batches of `epoch` from position `start`. `open_set(shard_set, start)`
        gives one set's view dataset (reader.read_views) from its position `start`. One set:
        reader.ViewBatches, as without mixtures. `drawn` (name -> images) is added to in place."""
        if self.single:
            return reader.ViewBatches(open_set(self.sets[0], start), batch_size=batch_size, start=start)
        length = int(self.rows_per_worker(seed=seed, epoch=epoch, world_size=world_size)[rank])
        return MixedBatches(self, open_set, length=length, batch_size=batch_size, start=start, drawn=drawn)

    def record(self) -> list[dict]:
        """What a run records about the sets it reads (shard_sets.json)."""
        out = []
        for i, s in enumerate(self.sets):
            m = self.manifest(i)
            out.append(
                {"path": s.path, "name": s.name, "share": s.share, "index": m.index_file, "shards": len(m.shards)}
                | {"rows": m.rows}
            )
        return out


def _names(paths: list[str]) -> list[str]:
    """A short, unique name per set for metrics: its folder name (`web`), with `.<n>` (its
    place in the list) where two folders share a name."""
    names = [posixpath.basename(p.rstrip("/")) or p for p in paths]
    return [f"{n}.{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def from_config(data, pins: dict[str, str] | None = None) -> Mixture:
    """The mixture of a DataConfig (`shards`, `weights`), each set read at the index file
    `pins` names for it (see `pin`). Every problem is one UserError naming data.shards or
    data.weights, raised before Ray starts (raysl.pretrain.validate calls this)."""
    paths = set_paths(data.shards)
    weights = list(data.weights)
    if not paths or not all(paths):
        raise UserError(
            "config key data.shards is empty: point it at a shard set (raysl shards build ... --out DIR), "
            "or at a list of them with data.weights"
        )
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise UserError(f"config key data.shards: {twice[0]} is listed twice; list each set once and weight it")
    if len(paths) > 1 and not weights:
        raise UserError(
            f"config key data.weights: data.shards lists {len(paths)} sets; give one weight per set, "
            f"in the same order (e.g. data.weights=[{', '.join(['0.5'] * len(paths))}])"
        )
    if weights and len(weights) != len(paths):
        raise UserError(
            f"config key data.weights: {len(weights)} weight(s) for {len(paths)} shard set(s) in data.shards; "
            "give one weight per set, in the same order"
        )
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise UserError(f"config key data.weights: {bad[0]!r} is not a weight (each must be a number >= 0)")
    if weights and not any(weights):
        raise UserError("config key data.weights: all weights are 0, so no set would be read; give one a weight > 0")
    pins = pins or {}
    sets = [
        ShardSet(path, name, share, pins.get(path))
        for path, name, share in zip(paths, _names(paths), shares(weights or [1.0] * len(paths)))
    ]
    mix = Mixture(sets)
    for i in range(len(paths)):
        try:
            mix.manifest(i)
        except UserError as exc:
            key = "data.shards" if isinstance(data.shards, str) else f"data.shards[{i}]"
            raise UserError(f"config key {key}: {exc}") from exc
    return mix


def pin(data, run_dir: str) -> dict[str, str]:
    """The index file of each set the run reads, decided when the run first starts and kept
    in `<run_dir>/shard_sets.json`: a resumed run, or one whose sets were appended to
    since (`raysl shards build --append` writes a new index file and never rewrites an old
    one), reads the shards it started with. A set added to data.shards later is pinned
    when the run first reads it."""
    fs, root = filesystem_and_path(run_dir)
    path = posixpath.join(root, PINS)
    recorded = []
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        with fs.open_input_stream(path) as f:
            try:
                recorded = json.loads(f.read())["sets"]
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{path}: not a shard_sets.json raysl wrote ({exc}); delete it to re-pin") from exc
    pins = {s["path"]: s["index"] for s in recorded}
    missing = [p for p in set_paths(data.shards) if p not in pins]
    if missing:
        new = from_config(data, pins).record()
        recorded += [s for s in new if s["path"] in missing]
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps({"sets": recorded}, indent=2).encode())
        pins.update({s["path"]: s["index"] for s in new})
    return pins


def concat_rows(columns: list[np.ndarray]) -> np.ndarray:
    """The rows of `columns` in one array; decoded images of different sizes (the "pixels"
    of views made on the worker) as an object array of them."""
    try:
        return np.concatenate(columns)
    except ValueError:
        out = np.empty(sum(len(c) for c in columns), dtype=object)
        for i, row in enumerate(row for c in columns for row in c):
            out[i] = row  # one by one: a slice assignment would stack same-shaped rows
        return out


class StreamRows:
    """One set's stream in a mixture, opened at its first use and read in order."""

    def __init__(self, open_ds, prefetch_batches: int, batch_size: int):
        self.open_ds, self.prefetch_batches, self.batch_size = open_ds, prefetch_batches, batch_size
        self.it: Started | None = None
        self.buf: dict | None = None
        self.at = 0

    def open(self, lo: int) -> Started:
        """Start the set's pipeline at position `lo` (its first batch in a background thread)."""
        if self.it is None:
            rows = self.open_ds(lo).iter_batches(
                batch_size=self.batch_size,
                batch_format="numpy",
                drop_last=False,
                prefetch_batches=self.prefetch_batches,
            )
            self.it = Started(rows)
        return self.it

    def take(self, lo: int, hi: int) -> dict | None:
        """The rows of this stream with `pos` in [lo, hi), in order: fewer than hi - lo where
        images did not decode (read_views drops them). None when there are none."""
        it = self.open(lo)
        pieces = []
        while True:
            if self.buf is None or self.at == len(self.buf["pos"]):
                try:
                    self.buf, self.at = next(it), 0
                except StopIteration:
                    break
            end = self.at + int(np.searchsorted(self.buf["pos"][self.at :], hi))
            if end > self.at:
                pieces.append({k: v[self.at : end] for k, v in self.buf.items()})
            self.at = end
            if end < len(self.buf["pos"]):
                break
        if not pieces:
            return None
        return {k: concat_rows([p[k] for p in pieces]) for k in pieces[0]}


class MixedBatches:
    """Fixed-shape batches of a mixture's stream for one rank and epoch, with the same
    interface as reader.ViewBatches: `position` (mixed rows consumed, what a checkpoint
    stores), `skipped` (images that did not decode). `drawn` counts the images of each set
    put in batches (name -> count; a dict the caller may share across streams). Each batch
    has `pos` (position in the mixed stream) and `set` (index into data.shards)."""

    def __init__(
        self,
        mix: Mixture,
        open_set,
        *,
        length: int,
        batch_size: int,
        start: int = 0,
        drawn: dict | None = None,
        prefetch_batches: int = 2,
    ):
        self.mix, self.open_set, self.length, self.batch_size = mix, open_set, length, batch_size
        self.position = start
        self.skipped = 0
        self.drawn = {} if drawn is None else drawn
        for s in mix.sets:
            self.drawn.setdefault(s.name, 0)
        self.prefetch_batches = prefetch_batches
        self._opened: list[StreamRows] | None = None

    def _streams(self) -> list[StreamRows]:
        return [
            StreamRows(lambda lo, s=s: self.open_set(s, lo), self.prefetch_batches, self.batch_size)
            for s in self.mix.sets
        ]

    def open(self) -> None:
        """Start every set's pipeline now, each at the rows of it the mixed stream has
        consumed (where its first take will ask); position, skipped and drawn change only
        as batches are taken."""
        if self._opened is None:
            self._opened = self._streams()
            for stream, lo in zip(self._opened, self.mix.consumed(self.position)):
                stream.open(int(lo))

    def __iter__(self):
        streams, self._opened = self._opened or self._streams(), None
        while True:
            parts, got = [], 0
            while got < self.batch_size:
                need = self.batch_size - got
                if self.position + need > self.length:
                    return  # the epoch's end for this rank (a last partial batch is dropped)
                span = self.mix.sources(self.position, need)
                first = self.mix.consumed(self.position)
                delivered = 0
                for i in np.unique(span):
                    where = np.flatnonzero(span == i)
                    rows = streams[i].take(int(first[i]), int(first[i]) + len(where))
                    if rows is not None:
                        mixed = self.position + where[rows["pos"] - first[i]]
                        parts.append(rows | {"pos": mixed, "set": np.full(len(mixed), i, np.int64)})
                        delivered += len(mixed)
                got += delivered
                self.skipped += need - delivered  # positions whose image did not decode
                self.position += need
            batch = {k: concat_rows([p[k] for p in parts]) for k in parts[0]}
            order = np.argsort(batch["pos"], kind="stable")
            batch = {k: v[order] for k, v in batch.items()}
            for i, n in zip(*np.unique(batch["set"], return_counts=True)):
                self.drawn[self.mix.sets[i].name] += int(n)
            yield batch
