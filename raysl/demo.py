"""`raysl demo`: the whole path on real bundled images, on a local Ray, in a few minutes."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import time

from raysl.data import demo_images


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_demo(out: str, *, address: str | None = None) -> dict:
    from raysl.data.build import build_shards, format_summary
    from raysl.data.inspect import contact_sheet, format_inspect, inspect_shards
    from raysl.data.reader import ViewBatches, read_views
    from raysl.data.view_plans import view_spec
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
    from raysl.pretrain import pretrain

    cfg = load_config(
        "quickstart",
        [
            f"data.shards={shards}",
            "data.batch_size=8",
            "train.epochs=12",
            "train.log_every=4",
            f"train.storage_path={os.path.join(out, 'runs')}",
            "train.name=demo",
        ],
    )
    shutil.rmtree(os.path.join(out, "runs", "demo"), ignore_errors=True)  # the demo always trains from scratch
    run = pretrain(cfg)
    print(f"run directory: {_shown(run['run_dir'])} (metrics.jsonl, loss.png, lr.png, checkpoints)")

    _step("kNN on the held-out labeled digits: the pretrained backbone against the same backbone at random init")
    from raysl.eval.report import build_report
    from raysl.eval.run import evaluate

    knn = evaluate("knn", run["run_dir"], digits["train"], digits["val"], baseline=True)
    print(knn_table(knn))
    report = build_report(run["run_dir"], digits["val"])
    print(f"report: {_shown(report)}")

    _step("Next, try these (paths relative to this folder work from it)")
    commands = next_commands(out, run["run_dir"], digits["train"], digits["val"])
    print("\n".join(commands))
    return {
        "images_written": manifest.written,
        "skipped": sum(manifest.skipped.values()),
        "shards": len(manifest.shards),
        "views_per_image": spec.n_views,
        "images_streamed": seen,
        "train_steps": run["steps"],
        "final_loss": round(run["final_loss"], 4),
        "knn": knn,
        "report": report,
        "next": commands,
    }


def _shown(path: str) -> str:
    """A path as the user would type it here: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return shlex.quote(path if rel.startswith("..") else rel)


def knn_table(result: dict) -> str:
    """The pretrained and the random-init rows of a `raysl eval knn --baseline` result."""
    ks = sorted(int(k.removeprefix("knn_top1_k")) for k in result if k.startswith("knn_top1_k"))
    header = ["backbone", *(f"kNN top-1 k={k}" for k in ks)]
    rows = [
        ["random init (same seed)", *(f"{result['random_init'][f'knn_top1_k{k}']:.1f}" for k in ks)],
        [f"pretrained, {result['step']} steps", *(f"{result[f'knn_top1_k{k}']:.1f}" for k in ks)],
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    )


def next_commands(out: str, run_dir: str, train: str, val: str) -> list[str]:
    run, train, val = _shown(run_dir), _shown(train), _shown(val)
    return [
        f"raysl eval linear --ckpt {run} --train {train} --val {val} --baseline   # linear probe, both backbones",
        f"raysl export --ckpt {run} --out {_shown(os.path.join(out, 'export'))}   # weights for timm.create_model",
        f"raysl pretrain quickstart data.shards={_shown(os.path.join(out, 'shards'))} "
        f"train.storage_path={_shown(os.path.join(out, 'runs'))} train.name=longer train.epochs=40   # train longer",
        "raysl doctor   # versions, GPUs, 8-bit kernels, free disk",
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument(
        "--out", type=resolve_path, default="demo_out", help="folder for the demo's images, shards and pictures"
    )


def run_from_args(args: argparse.Namespace) -> None:
    run_demo(args.out, address=args.address)
