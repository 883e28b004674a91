"""The `raysl` command. Thin: it parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys

from raysl.config import resolve_path
from raysl.errors import RunFailed, UserError


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_shards_build(args) -> None:
    from raysl.data.build import format_summary, plan_build, run_build
    from raysl.runtime import init_ray

    # SRC, --metadata and --out are checked before Ray starts: a mistake costs no cluster start-up
    plan = plan_build(
        args.src,
        args.out,
        shard_size=args.shard_size,
        metadata=args.metadata,
        licenses=args.license,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
        dedup=not args.no_dedup,
        overwrite=args.overwrite,
        append=args.append,
    )
    print(init_ray(args.address), file=sys.stderr)
    manifest = run_build(plan)
    print(format_summary(manifest, plan))


def cmd_shards_migrate(args) -> None:
    from raysl.data.legacy import migrate

    m = migrate(args.dir)
    print(f"migrated {args.dir}: {len(m.shards):,} shard(s), {m.rows:,} images; the shard list is now in its index")


def cmd_shards_inspect(args) -> None:
    from raysl.data.inspect import contact_sheet, format_inspect, inspect_shards

    print(format_inspect(inspect_shards(args.dir)))
    if args.grid:
        n = contact_sheet(args.dir, args.grid, samples=args.samples)
        print(f"contact sheet: {n} images -> {args.grid}")


def cmd_curate_embed(args) -> None:
    from raysl.curate.embed import plan_embed, run_embed
    from raysl.runtime import init_ray

    features = dict(stage=args.stage, input_norm=args.input_norm)
    plan = plan_embed(args.shards, args.model, args.out, image_size=args.image_size, seed=args.seed, **features)
    print(init_ray(args.address), file=sys.stderr)
    print(json.dumps(run_embed(plan, actors=args.actors, batch_size=args.batch_size)))


def cmd_curate_step(args) -> None:
    from raysl.curate import steps

    common = dict(model=args.model, sel=args.sel, overwrite=args.overwrite)
    if args.curate_cmd == "dedup":
        kw = dict(clusters=args.clusters, keep=args.keep, seed=args.seed)
        curation = steps.run_dedup(args.emb, args.out, threshold=args.threshold, **kw, **common)
    elif args.curate_cmd == "decontaminate":
        curation = steps.run_decontaminate(args.emb, args.eval, args.out, threshold=args.threshold, **common)
    else:
        levels = steps.parse_levels(args.levels)
        kw = dict(target=args.target, levels=levels, resample=args.resample, seed=args.seed)
        curation = steps.run_balance(args.emb, args.out, **kw, **common)
    print(json.dumps({"out": args.out, **curation["counts"], "step": curation["steps"][-1]}))


def cmd_bench_curate(args) -> None:
    from raysl.bench.curate import run_from_args

    print(json.dumps(run_from_args(args)))


def cmd_bench_data(args) -> None:
    from raysl.bench.data import run_from_args
    from raysl.runtime import init_ray

    print(init_ray(args.address), file=sys.stderr)
    result = run_from_args(args)
    print(json.dumps(result))


def cmd_bench_methods(args) -> None:
    from raysl.bench.methods import run_from_args

    result = run_from_args(args, address=args.address)
    print(result.pop("table"))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"} | {"json": f"{args.out}/bench_methods.json"}))


def cmd_bench_optim(args) -> None:
    from raysl.bench.optim import run_optim_bench

    print(json.dumps(run_optim_bench(args.model)))


def cmd_bench_memory(args) -> None:
    from raysl.bench.memory import run_from_args

    rows = run_from_args(args)
    return 1 if any("error" in r for r in rows) else 0


def cmd_bench_plan(args) -> None:
    from raysl.bench.plan import run_from_args

    print(json.dumps(run_from_args(args)))


def cmd_bench_step(args) -> None:
    from raysl.bench.step import run_from_args

    print(json.dumps(run_from_args(args, address=args.address)))


def cmd_bench_e2e(args) -> None:
    from raysl.bench.e2e import run_from_args

    print(json.dumps(run_from_args(args)))


def cmd_tune(args) -> None:
    from raysl.config import load_config
    from raysl.tune.search import tune_recipe
    from raysl.tune.space import load_space

    cfg = load_config(args.recipe, args.overrides)
    result = tune_recipe(
        cfg,
        load_space(args.space, cfg.method.name),
        scheduler=args.scheduler,
        samples=args.samples,
        metric=args.metric,
        mode=args.mode,
        search=args.search,
        name=args.name,
        storage=args.storage,
        resume=args.resume,
        max_concurrent=args.concurrent,
        grace_steps=args.grace_steps,
        address=args.address,
    )
    print(result["table"])
    print(
        json.dumps({k: result[k] for k in ("experiment_dir", "metric", "mode", "results_csv", "best_yaml", "errors")})
    )


def cmd_pretrain(args) -> None:
    from raysl.config import load_config
    from raysl.pretrain import pretrain

    cfg = load_config(args.recipe, args.overrides)
    print(json.dumps(pretrain(cfg, address=args.address, resume=args.resume)))


def _numbers(text: str, typ, flag: str) -> list:
    try:
        return [typ(t) for t in _csv_list(text)]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected a comma list of {typ.__name__}s, e.g. 20,200") from None


def cmd_eval(args) -> None:
    from raysl.eval.run import evaluate

    if args.kind == "finetune":
        options = {
            k: getattr(args, k)
            for k in ("lr", "layer_decay", "drop_path", "mixup", "cutmix", "smoothing", "batch_size", "seed")
        }
        options["epochs"] = args.epochs or 10
    elif args.kind == "linear":
        options = {"lrs": _numbers(args.lrs, float, "--lrs"), "epochs": args.epochs or 100, "seed": args.seed}
    elif args.kind == "fewshot":
        options = {"shots": _numbers(args.shots, int, "--shots"), "draws": args.draws, "seed": args.seed}
    else:
        options = {"ks": _numbers(args.k, int, "--k"), "temperature": args.temperature}
    result = evaluate(
        args.kind,
        args.ckpt,
        args.train,
        args.val,
        options=options,
        backbone=args.backbone,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        image_size=args.image_size,
        address=args.address,
        baseline=args.baseline,
    )
    print(json.dumps(result))


def cmd_export(args) -> None:
    from raysl.eval.export import export

    print(json.dumps(export(args.ckpt, args.out, shards=args.shards)))


def cmd_report(args) -> None:
    from raysl.eval.report import build_report

    print(build_report(args.run, args.eval))


def cmd_doctor(args) -> int:
    from raysl.doctor import run_checks

    checks = run_checks(args.address, args.storage)
    for check in checks:
        print(check.line(), flush=True)
    return 0 if all(c.ok for c in checks) else 1


def cmd_demo(args) -> None:
    from raysl.demo import run_demo

    run_demo(args.out, address=args.address)


_ADDRESS_HELP = "Ray cluster to join, e.g. auto or ray://host:10001 (default: $RAY_ADDRESS, else a local Ray)"


def _ray_command(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A subcommand that starts or joins Ray also takes --address after its name
    (`raysl pretrain R --address auto`). SUPPRESS keeps a top-level
    `raysl --address auto pretrain R` from being overwritten with None."""
    parser.add_argument("--address", default=argparse.SUPPRESS, help=_ADDRESS_HELP)
    return parser


class _Parser(argparse.ArgumentParser):
    """Every command and subcommand takes --verbose, before or after its name (SUPPRESS:
    a later parser does not overwrite an earlier --verbose with False)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show every library's log lines (Ray, Ray Data, DeepSpeed, bitsandbytes); "
            "default: raysl's own progress, results and warnings",
        )


def build_parser() -> argparse.ArgumentParser:
    from raysl import __version__

    p = _Parser(prog="raysl", description=__doc__)
    p.add_argument("--version", action="version", version=f"raysl {__version__}")
    p.add_argument("--address", default=None, help=_ADDRESS_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    demo = _ray_command(
        sub.add_parser("demo", help="build shards from real bundled images and stream views through Ray Data")
    )
    demo.add_argument(
        "--out", type=resolve_path, default="demo_out", help="folder for the demo's images, shards and pictures"
    )
    demo.set_defaults(func=cmd_demo)

    doc = _ray_command(
        sub.add_parser("doctor", help="check this machine: versions, GPUs, 8-bit kernels, Ray cluster, free disk")
    )
    doc.add_argument(
        "--storage", type=resolve_path, default="runs", help="where runs will be stored (train.storage_path)"
    )
    doc.set_defaults(func=cmd_doctor)

    pre = _ray_command(
        sub.add_parser("pretrain", help="self-supervised pretraining from a recipe on Ray Train + DeepSpeed")
    )
    pre.add_argument("recipe", help="a shipped recipe name (e.g. quickstart) or a YAML path")
    pre.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.001 train.num_workers=2")
    pre.add_argument("--resume", action="store_true", help="continue the run (train.name) from its latest checkpoint")
    pre.set_defaults(func=cmd_pretrain)

    tu = _ray_command(
        sub.add_parser("tune", help="Ray Tune over any config key of a recipe (ASHA or PBT, optional Optuna)")
    )
    tu.add_argument("recipe", help="a shipped recipe name or a YAML path")
    tu.add_argument("overrides", nargs="*", help="section.key=value, applied before the search space")
    tu.add_argument(
        "--space",
        type=resolve_path,
        required=True,
        help="SPACE.yaml: section.key -> {loguniform|uniform: [a, b]} | {choice: [...]} | {randint: [a, b]}",
    )
    tu.add_argument("--scheduler", choices=["asha", "pbt"], default="asha")
    tu.add_argument("--samples", type=int, default=4, help="trials (PBT: the population)")
    tu.add_argument(
        "--metric", default="loss", help="loss, val_loss (needs eval.val_shards) or knn_top1 (needs eval.knn_shards)"
    )
    tu.add_argument("--mode", choices=["min", "max"], default=None, help="default: min for loss, max for knn_*")
    tu.add_argument(
        "--search", choices=["optuna"], default=None, help="Optuna TPE instead of random search (needs optuna)"
    )
    tu.add_argument("--concurrent", type=int, default=1, help="trials at once (each takes train.num_workers workers)")
    tu.add_argument(
        "--grace-steps", type=int, default=None, help="ASHA: steps before a trial can be stopped (default: a quarter)"
    )
    tu.add_argument("--name", default="tune", help="experiment name (a folder under --storage)")
    tu.add_argument("--storage", type=resolve_path, default="runs", help="local dir, NFS path or bucket URI")
    tu.add_argument("--resume", action="store_true", help="continue the experiment --storage/--name")
    tu.set_defaults(func=cmd_tune)

    ev = _ray_command(
        sub.add_parser(
            "eval", help="evaluate a run's backbone on labeled shards: knn, linear probe, few-shot, fine-tune"
        )
    )
    ev.add_argument("kind", choices=("knn", "linear", "fewshot", "finetune"))
    ev.add_argument(
        "--ckpt", type=resolve_path, required=True, help="a pretraining run directory (its latest checkpoint is used)"
    )
    ev.add_argument(
        "--train", type=resolve_path, required=True, help="labeled shard set to fit on (memory bank for knn)"
    )
    ev.add_argument("--val", type=resolve_path, required=True, help="labeled shard set to score on")
    ev.add_argument("--backbone", help="refuse the run unless it trained this timm backbone")
    ev.add_argument(
        "--baseline",
        action="store_true",
        help="knn/linear/fewshot: also score the same backbone at random init (the run's seed), as random_init",
    )
    ev.add_argument(
        "--image-size", type=int, default=0, help="eval resolution (default: the run's data.image_size, else 224)"
    )
    ev.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    ev.add_argument("--cpus-per-worker", type=int, default=1)
    ev.add_argument("--gpus-per-worker", type=float, default=0.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--k", default="20,200", help="knn: neighbour counts (comma list)")
    ev.add_argument("--temperature", type=float, default=0.07, help="knn: vote temperature")
    ev.add_argument(
        "--lrs", default="0.01,0.1,1.0", help="linear: the lr sweep (comma list), best on --val is reported"
    )
    ev.add_argument("--shots", default="1,5,10", help="fewshot: labeled images per class (comma list)")
    ev.add_argument("--draws", type=int, default=5, help="fewshot: seeded draws per shot count")
    ev.add_argument("--epochs", type=int, default=0, help="linear (default 100) and finetune (default 10) epochs")
    ev.add_argument("--lr", type=float, default=1e-3, help="finetune: AdamW lr per 256 images")
    ev.add_argument("--layer-decay", type=float, default=0.75, help="finetune: layer-wise lr decay (1: none)")
    ev.add_argument("--drop-path", type=float, default=0.1, help="finetune: DropPath rate")
    ev.add_argument("--mixup", type=float, default=0.8, help="finetune: mixup alpha (0: off)")
    ev.add_argument("--cutmix", type=float, default=1.0, help="finetune: cutmix alpha (0: off)")
    ev.add_argument("--smoothing", type=float, default=0.1, help="finetune: label smoothing")
    ev.add_argument("--batch-size", type=int, default=64, help="finetune: images per worker and step")
    ev.set_defaults(func=cmd_eval)

    exp = sub.add_parser("export", help="a run's backbone for timm.create_model, with a model card and attributions")
    exp.add_argument(
        "--ckpt", type=resolve_path, required=True, help="the run directory (its latest checkpoint is exported)"
    )
    exp.add_argument(
        "--out",
        type=resolve_path,
        required=True,
        help="folder for model.safetensors, config.json, README.md, ATTRIBUTIONS.csv",
    )
    exp.add_argument(
        "--shards", type=resolve_path, help="where the training shard set lives now, if it moved since training"
    )
    exp.set_defaults(func=cmd_export)

    rep = sub.add_parser(
        "report", help="one self-contained HTML page of a run's numbers and pictures (RUN/report.html)"
    )
    rep.add_argument("run", type=resolve_path, help="the run directory")
    rep.add_argument(
        "--eval", type=resolve_path, help="a labeled shard set for the embedding plot and the attention samples"
    )
    rep.set_defaults(func=cmd_report)

    shards = sub.add_parser("shards", help="build and inspect image shard sets").add_subparsers(
        dest="shards_cmd", required=True
    )
    b = _ray_command(
        shards.add_parser("build", help="turn folders, WebDataset tars or img2dataset parquet into shards")
    )
    b.add_argument("src", nargs="+", type=resolve_path, help="image folders, .tar files or .parquet files")
    b.add_argument("--out", type=resolve_path, required=True, help="output shard directory")
    b.add_argument("--shard-size", type=int, default=1000, help="rows per shard (default 1000)")
    b.add_argument(
        "--metadata", type=resolve_path, help="CSV/JSONL with path or key plus license, attribution, source, label"
    )
    b.add_argument("--license", type=_csv_list, help="keep only images whose license is in this comma list")
    b.add_argument("--min-side", type=int, default=0, help="skip images whose shorter side is smaller")
    b.add_argument("--max-pixels", type=int, default=89_478_485, help="skip images with more pixels (bomb guard)")
    b.add_argument("--no-dedup", action="store_true", help="keep exact duplicates (sha256)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    b.add_argument(
        "--append",
        action="store_true",
        help="add shards to the set in --out (dedup against it by hash); runs reading it keep their version",
    )
    b.set_defaults(func=cmd_shards_build)
    i = shards.add_parser("inspect", help="counts, bytes, resolutions, licenses; optional contact sheet")
    i.add_argument("dir", type=resolve_path)
    i.add_argument("--grid", type=resolve_path, help="write a contact sheet PNG of sample images here")
    i.add_argument("--samples", type=int, default=64)
    i.set_defaults(func=cmd_shards_inspect)
    mg = shards.add_parser(
        "migrate", help="rewrite an old shard set (every shard listed in manifest.json) in the current format"
    )
    mg.add_argument("dir", type=resolve_path)
    mg.set_defaults(func=cmd_shards_migrate)

    _add_curate(sub)

    bench = sub.add_parser("bench", help="benchmarks, each against a baseline measured in the same run")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    bd = _ray_command(bsub.add_parser("data", help="raysl view pipeline vs plain DataLoaders (torchvision, lightly)"))
    from raysl.bench.data import add_arguments as add_data_arguments

    add_data_arguments(bd)
    bd.set_defaults(func=cmd_bench_data)
    bo = bsub.add_parser("optim", help="optimizer state bytes/param: fp32 AdamW vs AdamW8bit")
    bo.add_argument("--model", default="vit_base_patch16_224")
    bo.set_defaults(func=cmd_bench_optim)
    bm = _ray_command(
        bsub.add_parser(
            "methods", help="each SSL method: short CPU pretraining, kNN top-1 on real digits vs random init"
        )
    )
    from raysl.bench.methods import add_arguments as add_methods_arguments

    add_methods_arguments(bm)
    bm.set_defaults(func=cmd_bench_methods)
    bs = _ray_command(
        bsub.add_parser("step", help="seconds per training step: raysl (Ray Train + DeepSpeed) vs a bare PyTorch loop")
    )
    from raysl.bench.step import add_arguments

    add_arguments(bs)
    bs.set_defaults(func=cmd_bench_step)
    bmem = bsub.add_parser(
        "memory", help="peak memory per worker (2 workers): ZeRO 0/2/3 x adamw/adamw8bit (x offload)"
    )
    from raysl.bench.memory import add_arguments as add_memory_arguments

    add_memory_arguments(bmem)
    bmem.set_defaults(func=cmd_bench_memory)
    bp = bsub.add_parser(
        "plan", help="manifest bytes, write, read and planning seconds at N shards: index vs the old JSON list"
    )
    from raysl.bench.plan import add_arguments as add_plan_arguments

    add_plan_arguments(bp)
    bp.set_defaults(func=cmd_bench_plan)
    bc = _ray_command(
        bsub.add_parser(
            "curate",
            help="dedup recall/precision on planted near-duplicates, balance entropy, k-means + dedup at scale",
        )
    )
    from raysl.bench.curate import add_arguments as add_curate_arguments

    add_curate_arguments(bc)
    bc.set_defaults(func=cmd_bench_curate)
    be = bsub.add_parser(
        "e2e", help="wall time of a SimCLR run: raysl pretrain (Ray start included) vs a plain DataLoader loop"
    )
    from raysl.bench.e2e import add_arguments as add_e2e_arguments

    add_e2e_arguments(be)
    be.set_defaults(func=cmd_bench_e2e)
    return p


def _add_curate(sub) -> None:
    from raysl.curate.dedup import DEFAULT_THRESHOLD, KEEP

    cur = sub.add_parser("curate", help="embed, dedup, decontaminate and balance a shard set into a selection")
    csub = cur.add_subparsers(dest="curate_cmd", required=True)
    em = _ray_command(csub.add_parser("embed", help="embed every image (eval views) as a Ray Data job; resumable"))
    em.add_argument("--shards", type=resolve_path, required=True, help="the shard set to embed")
    em.add_argument("--model", required=True, help="a raysl run directory, or a timm model name (random init)")
    em.add_argument("--out", type=resolve_path, required=True, help="embedding folder (EMB); rerun to resume")
    em.add_argument("--image-size", type=int, default=0, help="eval crop size (default: the run's, else 224)")
    em.add_argument("--seed", type=int, default=0, help="timm random init seed")
    em.add_argument(
        "--stage", type=int, default=-1, help="-1: the pooled output; k: stage k's feature map on a 2x2 grid"
    )
    em.add_argument(
        "--input-norm",
        choices=("imagenet", "per-image"),
        default="imagenet",
        help="per-image: standardise each image's channels (random-init features then see structure, not colour)",
    )
    em.add_argument("--actors", type=int, default=0, help="actor pool size (default: GPUs, else CPUs / 2)")
    em.add_argument("--batch-size", type=int, default=32)
    em.set_defaults(func=cmd_curate_embed)

    def step(name: str, help_: str):
        c = csub.add_parser(name, help=help_)
        c.add_argument("--emb", type=resolve_path, required=True, help="embeddings of the set (raysl curate embed)")
        c.add_argument("--out", type=resolve_path, required=True, help="folder for the selection (a shard set)")
        c.add_argument("--from", dest="sel", type=resolve_path, help="start from an earlier selection of the same EMB")
        c.add_argument("--model", help="refuse EMB unless it was embedded with this model (run dir or timm name)")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--overwrite", action="store_true", help="replace a selection already in --out")
        c.set_defaults(func=cmd_curate_step)
        return c

    d = step("dedup", "SemDeDup: k-means, then drop all but one of each group above a cosine threshold")
    d.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help=f"cosine (default {DEFAULT_THRESHOLD})")
    d.add_argument("--clusters", type=int, default=0, help="k-means clusters (default N / 1000)")
    d.add_argument("--keep", choices=KEEP, default="closest", help="which image of a group stays")
    dc = step("decontaminate", "drop images whose nearest eval image is above a cosine threshold")
    dc.add_argument("--eval", nargs="+", type=resolve_path, required=True, help="embedding sets of eval shard sets")
    dc.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ba = step("balance", "hierarchical k-means, then a balanced top-down sample of --target images")
    ba.add_argument("--target", type=int, required=True, help="images to keep")
    ba.add_argument("--levels", default="100,10", help="clusters per level, bottom first (default 100,10)")
    ba.add_argument("--resample", type=int, default=0, help="resampling steps per level (Vo et al. 2024)")


def main(argv: list[str] | None = None) -> int:
    from raysl.runtime import set_verbose

    args = build_parser().parse_args(argv)
    set_verbose(getattr(args, "verbose", False))
    try:
        code = args.func(args)
    except UserError as exc:
        print(f"raysl: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"raysl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raysl: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
