"""The `raysl` command. Thin: it parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys

from raysl.errors import UserError


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_shards_build(args) -> None:
    from raysl.data.build import build_shards, format_summary
    from raysl.runtime import init_ray

    print(init_ray(args.address), file=sys.stderr)
    manifest = build_shards(
        args.src,
        args.out,
        shard_size=args.shard_size,
        metadata=args.metadata,
        licenses=args.license,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
        dedup=not args.no_dedup,
        overwrite=args.overwrite,
    )
    print(format_summary(manifest))


def cmd_shards_inspect(args) -> None:
    from raysl.data.inspect import contact_sheet, format_inspect, inspect_shards

    print(format_inspect(inspect_shards(args.dir)))
    if args.grid:
        n = contact_sheet(args.dir, args.grid, samples=args.samples)
        print(f"contact sheet: {n} images -> {args.grid}")


def cmd_bench_data(args) -> None:
    from raysl.bench.data import run_data_bench
    from raysl.runtime import init_ray

    print(init_ray(args.address), file=sys.stderr)
    result = run_data_bench(args.shards, args.views, workers=args.workers, images=args.images, batch_size=args.batch_size)
    print(json.dumps(result))


def cmd_bench_methods(args) -> None:
    from raysl.bench.methods import run_from_args

    result = run_from_args(args, address=args.address)
    print(result.pop("table"))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"} | {"json": f"{args.out}/bench_methods.json"}))


def cmd_bench_optim(args) -> None:
    from raysl.bench.optim import run_optim_bench

    print(json.dumps(run_optim_bench(args.model)))


def cmd_bench_step(args) -> None:
    from raysl.bench.step import run_from_args

    print(json.dumps(run_from_args(args, address=args.address)))


def cmd_pretrain(args) -> None:
    from raysl.config import load_config
    from raysl.train.run import pretrain

    cfg = load_config(args.recipe, args.overrides)
    print(json.dumps(pretrain(cfg, address=args.address, resume=args.resume)))


def cmd_demo(args) -> None:
    from raysl.demo import run_demo

    run_demo(args.out, address=args.address)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysl", description=__doc__)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build shards from real bundled images and stream views through Ray Data")
    demo.add_argument("--out", default="demo_out", help="folder for the demo's images, shards and pictures")
    demo.set_defaults(func=cmd_demo)

    pre = sub.add_parser("pretrain", help="self-supervised pretraining from a recipe on Ray Train + DeepSpeed")
    pre.add_argument("recipe", help="a shipped recipe name (e.g. quickstart) or a YAML path")
    pre.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.001 train.num_workers=2")
    pre.add_argument("--resume", action="store_true", help="continue the run (train.name) from its latest checkpoint")
    pre.set_defaults(func=cmd_pretrain)

    shards = sub.add_parser("shards", help="build and inspect image shard sets").add_subparsers(dest="shards_cmd", required=True)
    b = shards.add_parser("build", help="turn folders, WebDataset tars or img2dataset parquet into shards")
    b.add_argument("src", nargs="+", help="image folders, .tar files or .parquet files")
    b.add_argument("--out", required=True, help="output shard directory")
    b.add_argument("--shard-size", type=int, default=1000, help="rows per shard (default 1000)")
    b.add_argument("--metadata", help="CSV/JSONL with path or key plus license, attribution, source, label")
    b.add_argument("--license", type=_csv_list, help="keep only images whose license is in this comma list")
    b.add_argument("--min-side", type=int, default=0, help="skip images whose shorter side is smaller")
    b.add_argument("--max-pixels", type=int, default=89_478_485, help="skip images with more pixels (bomb guard)")
    b.add_argument("--no-dedup", action="store_true", help="keep exact duplicates (sha256)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    b.set_defaults(func=cmd_shards_build)
    i = shards.add_parser("inspect", help="counts, bytes, resolutions, licenses; optional contact sheet")
    i.add_argument("dir")
    i.add_argument("--grid", help="write a contact sheet PNG of sample images here")
    i.add_argument("--samples", type=int, default=64)
    i.set_defaults(func=cmd_shards_inspect)

    bench = sub.add_parser("bench", help="benchmarks, each against a baseline measured in the same run")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    bd = bsub.add_parser("data", help="raysl view pipeline vs a plain DataLoader + torchvision")
    bd.add_argument("--shards", required=True)
    bd.add_argument("--views", default="dino")
    bd.add_argument("--workers", type=int, default=2)
    bd.add_argument("--images", type=int, default=256)
    bd.add_argument("--batch-size", type=int, default=32)
    bd.set_defaults(func=cmd_bench_data)
    bo = bsub.add_parser("optim", help="optimizer state bytes/param: fp32 AdamW vs AdamW8bit")
    bo.add_argument("--model", default="vit_base_patch16_224")
    bo.set_defaults(func=cmd_bench_optim)
    bm = bsub.add_parser("methods", help="each SSL method: short CPU pretraining, kNN top-1 on real digits vs random init")
    from raysl.bench.methods import add_arguments as add_methods_arguments

    add_methods_arguments(bm)
    bm.set_defaults(func=cmd_bench_methods)
    bs = bsub.add_parser("step", help="seconds per training step: raysl (Ray Train + DeepSpeed) vs a bare PyTorch loop")
    from raysl.bench.step import add_arguments

    add_arguments(bs)
    bs.set_defaults(func=cmd_bench_step)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"raysl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raysl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
