"""`raysl demo`: the whole path on real bundled images, on a local Ray, in a few minutes."""

from __future__ import annotations

import os
import shutil
import time

from raysl.data import demo_images


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_demo(out: str, *, address: str | None = None) -> dict:
    from raysl.data.build import build_shards, format_summary
    from raysl.data.inspect import contact_sheet, format_inspect, inspect_shards
    from raysl.data.reader import ViewBatches, read_views
    from raysl.data.views import view_spec
    from raysl.runtime import init_ray

    out = os.path.abspath(out)
    _step("Real images bundled in scikit-image and scikit-learn (no download)")
    images = demo_images.copy_pool(os.path.join(out, "pool"))
    print(f"{len(os.listdir(images))} images, licences in {os.path.join(out, 'pool', 'metadata.csv')}")
    print(init_ray(address, quiet=False))  # training progress prints on the workers

    _step("raysl shards build (Ray Data job), keeping only openly licensed images as PASS does")
    shards = os.path.join(out, "shards")
    manifest = build_shards(
        [images],
        shards,
        shard_size=4,
        metadata=os.path.join(out, "pool", "metadata.csv"),
        licenses=demo_images.OPEN_LICENSES,
        overwrite=True,
    )
    print(format_summary(manifest))

    _step("raysl shards inspect")
    print(format_inspect(inspect_shards(shards)))
    grid = os.path.join(out, "contact_sheet.png")
    contact_sheet(shards, grid, samples=32)
    print(f"contact sheet -> {grid}")

    _step("A real labeled set for evaluation: scikit-learn's handwritten digits -> labeled shards")
    digits = {}
    for split, (folder, labels) in demo_images.write_digits(os.path.join(out, "digits")).items():
        digits[split] = os.path.join(out, f"digits_{split}_shards")
        m = build_shards([folder], digits[split], shard_size=1000, metadata=labels, overwrite=True)
        print(f"{split}: {m.written:,} labeled images in {len(m.shards)} shard(s) -> {digits[split]}")

    _step("Streaming DINO multi-crop views (2x224 + 8x96) through Ray Data")
    spec = view_spec("dino")
    t0 = time.perf_counter()
    batches = ViewBatches(read_views(shards, spec, seed=0, epoch=0), batch_size=4)
    seen = 0
    for batch in batches:
        if seen == 0:
            shapes = {k: tuple(v.shape) for k, v in batch.items() if k.startswith("view_")}
            print("batch:", ", ".join(f"{k} {s}" for k, s in list(shapes.items())[:3]), f"... ({len(shapes)} views)")
        seen += len(batch["pos"])
    rate = seen / (time.perf_counter() - t0)
    print(f"{seen} images -> {seen * spec.n_views} views, {rate:.1f} images/s, {batches.skipped} skipped as corrupt")

    _step("raysl pretrain quickstart: SimCLR, ResNet-18, DeepSpeed ZeRO-2 + AdamW8bit on a Ray Train worker")
    from raysl.config import load_config
    from raysl.train.run import pretrain

    cfg = load_config(
        "quickstart",
        [f"data.shards={shards}", "data.batch_size=8", "train.epochs=12", "train.log_every=4",
         f"train.storage_path={os.path.join(out, 'runs')}", "train.name=demo"],
    )
    shutil.rmtree(os.path.join(out, "runs", "demo"), ignore_errors=True)  # the demo always trains from scratch
    run = pretrain(cfg)
    print(f"run directory: {run['run_dir']} (metrics.jsonl, loss.png, lr.png, checkpoints)")
    print(f"evaluate it on the labeled digits: raysl eval knn --ckpt {run['run_dir']} "
          f"--train {digits['train']} --val {digits['val']}")

    result = {"images_written": manifest.written, "skipped": sum(manifest.skipped.values()), "shards": len(manifest.shards),
              "views_per_image": spec.n_views, "images_streamed": seen, "train_steps": run["steps"],
              "final_loss": round(run["final_loss"], 4)}
    _step(f"Result: {result}")
    return result
