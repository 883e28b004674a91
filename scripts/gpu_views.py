"""How many DINO views per second a GPU makes, against raysl's CPU view pipeline on the same machine.

DINO views (2 x 224 + 8 x 96) per second: `raysl.data.gpu_views.GPUViews` on one GPU
(nvJPEG batched decode, crops and colour on the device) against raysl's CPU path on all
the machine's cores (`read_views` Ray Data tasks, PIL uint8 views, then `normalize` on
the consumer, as `raysl bench data` times it). Both end with float32 ImageNet-normalised
views, the GPU's on the device. The same JPEGs on both sides: `--images` real photographs
from the pool bundled with scikit-image/scikit-learn (`raysl.data.demo_images`), cut at
random and re-encoded as 500 x 375 JPEGs (q 90), as `raysl bench data` uses (docs/views.md).

GPU: one untimed pass over all images (nvJPEG and kernel start-up), then `--passes` timed
passes in batches of `--batch-size`, synchronised; the rate is the median pass. Bytes are
in host memory on both sides (the CPU side reads them from a local shard set).
CPU: one untimed warm-up pass (Ray start, worker imports), then `--passes` timed passes of
`--cpu-images` images, each from the dataset's creation (pipeline fill included, as every
epoch pays it); the rate after the first batch is printed too.

Prints one JSON line: both rates, their ratio, the peak CUDA memory.

    python scripts/gpu_views.py                          # one GPU and its host's cores: a few minutes
    python scripts/gpu_views.py --device cpu --images 64 --cpu-workers 1  # smoke test without a GPU

Most of the time goes to the CPU side: the JPEGs are made and Ray starts first, then
`--passes` + 1 passes of `--cpu-images` images at a few ms of one core per DINO image; the
GPU side takes under a minute.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time


def make_jpegs(n: int, seed: int = 0, size: tuple[int, int] | None = (500, 375)) -> list[bytes]:
    """n JPEGs of `size` (None: each crop's own size) cut at random (area 30-100%) from the
    demo pool's photographs."""
    import numpy as np
    from PIL import Image

    from raysl.data.demo_images import SKIMAGE, SKLEARN, data_dirs

    dirs = data_dirs()
    photos = []
    for pkg, table in (("skimage", SKIMAGE), ("sklearn", SKLEARN)):
        for name in table:
            path = os.path.join(dirs[pkg], name)
            if os.path.exists(path):
                photos.append(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        side = np.sqrt(rng.uniform(0.3, 1.0))
        cw, ch = max(8, int(w * side)), max(8, int(h * side))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        crop = img.crop((left, top, left + cw, top + ch))
        (crop.resize(size, Image.Resampling.BICUBIC) if size else crop).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def time_gpu_views(images: list[bytes], device: str, batch_size: int, passes: int) -> dict:
    import torch

    from raysl.data.gpu_views import GPUViews
    from raysl.data.view_plans import view_spec

    cuda = torch.device(device).type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # the smoke test: one thread, as a CPU worker (and no contention)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    views = GPUViews(view_spec("dino"), device, chunk=batch_size)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def one_pass(seed: int) -> float:
        sync()
        t0 = time.perf_counter()
        n = 0
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            out = views(batch, [seed * len(images) + start + i for i in range(len(batch))])
            n += len(out.kept)
        sync()
        assert n == len(images), f"{len(images) - n} images did not decode"
        return n / (time.perf_counter() - t0)

    one_pass(0)  # warm-up: nvJPEG handles, kernels, the caching allocator
    rates = [one_pass(p + 1) for p in range(passes)]
    return {
        "gpu_img_s": round(statistics.median(rates), 1),
        "gpu_img_s_passes": [round(r, 1) for r in rates],
        "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def time_cpu_path(images: list[bytes], workers: int, n_images: int, batch_size: int, passes: int) -> dict:
    import ray

    from raysl.bench.data import _raysl_batches, _timed
    from raysl.data.schema import write_shard_set
    from raysl.data.view_plans import view_spec

    spec = view_spec("dino")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            dict(
                key=f"bench/{i:06d}.jpg",
                image=data,
                width=500,
                height=375,
                format="jpeg",
                source="bench",
                license="cc0-1.0",
                attribution="",
                label=None,
            )
            for i, data in enumerate(images)
        ]
        shards = os.path.join(tmp, "shards")
        write_shard_set(shards, rows, shard_size=max(1, len(rows) // max(workers, 1)), sources=["bench"])
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            make = lambda: _raysl_batches(shards, spec, workers=workers, batch_size=batch_size, seed=0)  # noqa: E731
            _timed(make, min(n_images, batch_size * workers))  # warm-up: Ray workers, imports
            runs = [_timed(make, n_images) for _ in range(passes)]
        finally:
            ray.shutdown()
    after_first = [
        (r["images"] - batch_size) / (r["seconds"] - r["first_batch_s"]) for r in runs if r["images"] > batch_size
    ]
    return {
        "cpu_img_s": round(statistics.median(r["img_s"] for r in runs), 1),
        "cpu_img_s_after_first_batch": round(statistics.median(after_first), 1) if after_first else None,
        "cpu_first_batch_s": [r["first_batch_s"] for r in runs],
        "cpu_workers": workers,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=2000, help="distinct JPEGs made")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cpu-images", type=int, default=None, help="images per timed CPU pass (cycling); 4 x --images")
    p.add_argument("--cpu-batch-size", type=int, default=64)
    a = p.parse_args()
    t0 = time.perf_counter()
    images = make_jpegs(a.images)
    made_s = time.perf_counter() - t0
    out = {"bench": "gpu_views", "views": "dino", "images": a.images, "batch_size": a.batch_size}
    out.update(time_gpu_views(images, a.device, a.batch_size, a.passes))
    cpu_images = a.cpu_images if a.cpu_images is not None else 4 * a.images
    out.update(time_cpu_path(images, a.cpu_workers, cpu_images, a.cpu_batch_size, a.passes))
    out["ratio_gpu_to_cpu"] = round(out["gpu_img_s"] / out["cpu_img_s"], 2)
    if out["cpu_img_s_after_first_batch"]:
        out["ratio_gpu_to_cpu_after_first_batch"] = round(out["gpu_img_s"] / out["cpu_img_s_after_first_batch"], 2)
    out["cpus"] = os.cpu_count()
    out["make_jpegs_s"] = round(made_s, 1)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
