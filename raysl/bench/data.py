"""`raysl bench data`: images/s of the raysl view pipeline vs plain torch DataLoaders.

All sides read the same shard rows, cycle over them until `images` images are made,
use the same number of parallel workers, produce the same views (per the ViewSpec)
and end with float32 ImageNet-normalised tensors, in the same process and run:

- raysl: `read_views` (Ray Data tasks, PIL uint8 views, JPEG draft decoding), batches
  from `iter_batches`, then `normalize` on the consumer, as a training worker does.
- baseline: `torch.utils.data.DataLoader(num_workers=workers)` over a map-style dataset
  of the rows, with the usual torchvision.transforms.v2 recipe per crop
  (RandomResizedCrop, flip, RandomApply(ColorJitter), RandomGrayscale, GaussianBlur,
  RandomSolarize, ToImage/ToDtype/Normalize).
- lightly: the same DataLoader with lightly's own transform for the preset
  (`DINOTransform(n_local_views=8)`, `SimCLRTransform()`, ...; the `bench` extra), when
  lightly is installed and has one.

Each turn of a side opens a fresh stream, takes `warmup` images untimed (process
start-up, imports, Ray's workers, the pipeline's fill: reported as `fill_s`), then times
the next `images` images of the same stream, as a training worker sees a long run: the
DataLoaders keep their workers (an iterator over a dataset of endless length), raysl
crosses its epochs as the trainer does (one Ray Data execution over many epochs,
data.epochs). A stream is timed right after its warm-up, never
after waiting for another side, so no side counts work buffered while another ran.
The DataLoader workers run at the niceness Ray gives its workers (15 by default), as
`raysl bench step` does: on a busy shared machine other processes then take CPU from
both sides' workers alike (at niceness 0 the baselines would win every contended core).
raysl's first turn runs before the timed ones and is reported on its own
(`raysl_cold`): it starts Ray's worker processes, each importing the views' dependencies
once (1-2 s of CPU; a run pays that once, in its first epoch), and on a small shard set
some start only inside the timed span, when the second epoch opens. The DataLoaders
start their workers afresh in every turn, inside its warm-up.
With `repeats` > 1 the sides take turns (torchvision, lightly, raysl, torchvision, ...),
so load from other jobs on a shared machine hits them alike; rates are medians over
the repeats and each ratio comes with the min and max of its per-repeat values.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from raysl.data.schema import read_manifest, read_shard, shard_files
from raysl.data.view_plans import Crop, ViewSpec, view_spec
from raysl.data.views import IMAGENET_MEAN, IMAGENET_STD, block_tensor, normalize
from raysl.errors import UserError


def _crop_transform(crop: Crop, eval_resize: bool):
    """The torchvision v2 recipe for one crop, written the usual way (DINO/BYOL style)."""
    import torchvision.transforms.v2 as T

    interp = T.InterpolationMode.BICUBIC if crop.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    tail = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if eval_resize:
        return T.Compose([T.Resize(round(crop.size / 0.875), interpolation=interp), T.CenterCrop(crop.size), *tail])
    ops = [
        T.RandomResizedCrop(crop.size, scale=crop.scale, ratio=crop.ratio, interpolation=interp),
        T.RandomHorizontalFlip(p=crop.flip_p),
    ]
    if crop.jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(*crop.jitter)], p=crop.jitter_p))
    if crop.gray_p > 0:
        ops.append(T.RandomGrayscale(p=crop.gray_p))
    if crop.blur_p > 0:
        kernel = crop.size // 10 // 2 * 2 + 1  # ~10% of the crop, odd: 23 for 224, 9 for 96
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=crop.blur_sigma)], p=crop.blur_p))
    if crop.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=crop.solarize_p))
    return T.Compose(ops + tail)


class _PerView:
    """One torchvision transform per view -> the tuple of views."""

    def __init__(self, spec: ViewSpec):
        self.transforms = [_crop_transform(c, spec.eval_resize) for c in spec.per_view()]

    def __call__(self, img):
        return tuple(t(img) for t in self.transforms)


# preset -> lightly 1.6 transform (class name, kwargs) with the same views
LIGHTLY = {
    "dino": ("DINOTransform", {"n_local_views": 8}),
    "simclr": ("SimCLRTransform", {}),
    "mocov2": ("MoCoV2Transform", {}),
    "byol": ("BYOLTransform", {}),
    "mocov3": ("BYOLTransform", {}),  # MoCo v3 uses BYOL's two asymmetric views
    "swav": ("SwaVTransform", {}),
    "mae": ("MAETransform", {}),
}


def lightly_transform(views: str):
    """lightly's transform for the preset, or None (lightly not installed, or no match)."""
    if views not in LIGHTLY:
        return None
    try:
        import lightly.transforms as LT
    except ImportError:
        return None
    name, kwargs = LIGHTLY[views]
    return getattr(LT, name)(**kwargs)


def read_images(shards: str) -> list[bytes]:
    images: list[bytes] = []
    for path, mask in shard_files(shards):
        images += read_shard(path, mask, ["image"]).column("image").to_pylist()
    if not images:
        raise UserError(f"{shards}: the shard set has no rows to benchmark")
    return images


class ShardRows(torch.utils.data.Dataset):
    """Map-style dataset over the image bytes of a shard set; index i is row i % rows."""

    def __init__(self, images: list[bytes], transform, length: int):
        self.images = images
        self.transform = transform
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        img = Image.open(io.BytesIO(self.images[i % len(self.images)])).convert("RGB")
        out = self.transform(img)
        return tuple(out) if isinstance(out, list) else out


def _take(stream, images: int) -> dict:
    """Time the next `images` images of a running stream (batches are lists of view tensors)."""
    t0 = time.perf_counter()
    n = 0
    for batch in stream:
        n += len(batch[0])
        if n >= images:
            break
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": round(seconds, 3), "img_s": n / seconds}


def _turn(make_stream, warmup: int, images: int) -> dict:
    """One side's turn: a fresh stream, `warmup` images untimed (its fill), then `images` timed."""
    stream = iter(make_stream())
    try:
        fill = _take(stream, warmup)["seconds"]
        timed = _take(stream, images)
    finally:
        close = getattr(stream, "close", None)
        if close:
            close()
        del stream  # a DataLoader iterator shuts its workers down here
    return {**timed, "fill_s": fill}


def _raysl_batches(shards: str, spec: ViewSpec, *, workers: int, batch_size: int, seed: int):
    """What a training worker gets, with the training defaults (data.task_cpus 0: the
    tasks share the cores; data.augment_tasks = workers; a small set kept in the object
    store, data.cache_share): each epoch's batches out of one Ray Data execution over many
    epochs (data.epochs.Streams), then normalize."""
    from raysl.config import DataConfig
    from raysl.data import cache
    from raysl.data.epochs import Streams, epochs_per_execution
    from raysl.data.reader import READ_COLUMNS, block_rows, read_views, steps_per_epoch, windows_per_epoch

    keys = [f"view_{i}" for i in range(spec.n_views)]
    manifest = read_manifest(shards)
    cached = cache.put_set(shards, manifest, READ_COLUMNS) if cache.fits(manifest, DataConfig().cache_share) else None
    windows = windows_per_epoch(manifest, world_size=1, window=2)
    streams = Streams(
        lambda epoch, start, epochs: read_views(
            shards,
            spec,
            seed=seed,
            epoch=epoch,
            start=start,
            epochs=epochs,
            concurrency=workers,
            batch_size=block_rows(spec, batch_size),
            num_cpus=0.0,
            cache=cached,
        ),
        lambda epoch: epochs_per_execution(windows, 10**9),  # the bench's stream has no end
        batch_size=batch_size,
    )
    epoch = 0
    while True:
        steps = steps_per_epoch(manifest, batch_size=batch_size, seed=seed, epoch=epoch, world_size=1)
        for _, batch in zip(range(steps), streams.batches(epoch, 0)):
            yield [normalize(block_tensor(batch[k])) for k in keys]
        epoch += 1


def _nice_worker(nice: int, worker_id: int) -> None:
    """DataLoader worker_init_fn: run at niceness `nice` (raising it needs no privileges)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except (PermissionError, OSError):
        pass


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def run_data_bench(
    shards: str,
    views: str = "dino",
    *,
    workers: int = 2,
    images: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    warmup: int | None = None,
    repeats: int = 1,
) -> dict:
    """raysl's cold first turn (Ray's worker processes start; reported apart, out of the
    ratios), then `repeats` turns of each side, the sides taking turns; every turn opens a
    fresh stream and warms it up with `warmup` images before timing `images`."""
    import ray

    spec = view_spec(views)
    warmup = 8 * batch_size if warmup is None else warmup
    torch.manual_seed(seed)
    rows = read_images(shards)
    transforms: dict[str, Callable] = {"baseline": _PerView(spec)}
    lightly = lightly_transform(views)
    if lightly is not None:
        transforms["lightly"] = lightly
    started_ray = not ray.is_initialized()
    if started_ray:
        from raysl.runtime import worker_pool

        ray.init(include_dashboard=False, log_to_driver=False, _system_config=worker_pool(None))
    from raysl.bench.step import worker_niceness

    nice = worker_niceness()
    loaders = {
        side: torch.utils.data.DataLoader(
            ShardRows(rows, t, 10**9),
            batch_size=batch_size,
            num_workers=workers,
            worker_init_fn=functools.partial(_nice_worker, nice),
            # Forked from a process that runs Ray, a worker can inherit a Ray lock held by
            # another thread and hang in its first garbage collection; spawned ones start clean
            # (their start-up is in the untimed warm-up).
            multiprocessing_context="spawn" if workers else None,
        )
        for side, t in transforms.items()
    }  # each cycles over the rows; a pass stops early
    timed: dict[str, list[dict]] = {side: [] for side in [*loaders, "raysl"]}
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        make: dict[str, Callable[[], Iterator]] = {
            side: functools.partial(iter, loader) for side, loader in loaders.items()
        }
        make["raysl"] = lambda: _raysl_batches(shards, spec, workers=workers, batch_size=batch_size, seed=seed)
        cold = _turn(make["raysl"], warmup, images)
        for _ in range(repeats):
            for side in timed:
                timed[side].append(_turn(make[side], warmup, images))
    finally:
        if started_ray:
            ray.shutdown()
    rates = {side: [t.pop("img_s") for t in runs] for side, runs in timed.items()}
    out = {
        "bench": "data",
        "views": views,
        "n_views": spec.n_views,
        "workers": workers,
        "images": images,
        "batch_size": batch_size,
        "warmup": warmup,
        "repeats": repeats,
        "rows": len(rows),
        "cpus": os.cpu_count(),
        "worker_nice": nice,
        "lightly": LIGHTLY[views][0] if "lightly" in rates else None,
    }
    for side, r in rates.items():
        out[f"{side}_img_s"] = round(statistics.median(r), 2)
    for side in rates:
        if side != "raysl":
            ratios = [a / b for a, b in zip(rates["raysl"], rates[side])]
            key = "ratio" if side == "baseline" else f"ratio_{side}"
            out[key] = round(statistics.median(ratios), 3)
            out[f"{key}_spread"] = _spread(ratios)
    for side, runs in timed.items():
        out[f"{side}_timed"] = runs[0] if repeats == 1 else runs
    out["raysl_cold"] = {**cold, "img_s": round(cold["img_s"], 2)}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.data.view_plans import PRESETS
    from raysl.paths import resolve_path

    p.add_argument("--shards", type=resolve_path, required=True, help="the shard set every side reads")
    p.add_argument("--views", default="dino", help=f"view preset: {', '.join(PRESETS)} (default dino)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="parallel workers per side: Ray Data tasks, DataLoader workers (default 2)",
    )
    p.add_argument("--images", type=int, default=256, help="timed images per turn (default 256)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the views on every side (default 0)")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per side, the sides taking turns")
    p.add_argument("--warmup", type=int, default=None, help="untimed images per turn (default 8 batches)")


def run_from_args(a) -> dict:
    return run_data_bench(
        a.shards,
        a.views,
        workers=a.workers,
        images=a.images,
        batch_size=a.batch_size,
        seed=a.seed,
        warmup=a.warmup,
        repeats=a.repeats,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="raysl bench data", description=__doc__.splitlines()[0])
    add_arguments(p)
    print(json.dumps(run_from_args(p.parse_args(argv))), flush=True)


if __name__ == "__main__":
    main()
