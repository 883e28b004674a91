"""`raysl eval knn|linear|fewshot|finetune`: a pretraining run's backbone evaluated on a
labeled train/val shard pair, on Ray Train workers. Inputs are checked on the driver
before Ray starts; the result is one JSON object, also written to RUN/eval_<kind>.json."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import uuid

from raysl.errors import UserError

KINDS = ("knn", "linear", "fewshot", "finetune")


# option: (smallest allowed, largest allowed or None); lists are checked item by item
LIMITS = {
    "ks": (1, None),
    "temperature": (1e-9, None),
    "lrs": (1e-12, None),
    "epochs": (1, None),
    "shots": (1, None),
    "draws": (1, None),
    "lr": (1e-12, None),
    "layer_decay": (1e-6, 1.0),
    "drop_path": (0.0, 0.99),
    "mixup": (0.0, None),
    "cutmix": (0.0, None),
    "smoothing": (0.0, 0.99),
    "batch_size": (1, None),
}


def check_options(options: dict) -> None:
    for key, value in options.items():
        lo, hi = LIMITS.get(key, (None, None))
        for v in value if isinstance(value, list) else [value]:
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                flag = "--" + key.replace("_", "-")
                raise UserError(
                    f"{flag} {v}: out of range (must be >= {lo}{f' and <= {hi}' if hi is not None else ''})"
                )
        if isinstance(value, list) and not value:
            raise UserError(f"--{key.replace('_', '-')}: give at least one value")


def validate(
    kind: str,
    ckpt: str,
    train: str,
    val: str,
    backbone: str | None = None,
    options: dict | None = None,
    baseline: bool = False,
) -> tuple[int, int, int]:
    """(train images, val images, checkpoint step); a UserError for a wrong run, backbone,
    set or option."""
    from raysl.data.buckets import check_buckets
    from raysl.eval.labeled import check_labeled
    from raysl.eval.weights import load_backbone

    if kind not in KINDS:
        raise UserError(f"eval kind {kind!r}: choose one of {', '.join(KINDS)}")
    if baseline and kind == "finetune":
        raise UserError(
            "--baseline: scores frozen features (knn, linear, fewshot); fine-tune a random init as its own run"
        )
    check_options(options or {})
    check_buckets({"--ckpt": ckpt, "--train": train, "--val": val})  # before anything else reads them
    _, _, step = load_backbone(ckpt, expect_backbone=backbone)  # refuses another backbone, or weights that do not fit
    return check_labeled(train, "--train"), check_labeled(val, "--val"), step


def eval_loop_per_worker(raw: dict) -> None:
    import ray.train
    import torch

    from raysl.eval.labeled import load_labeled
    from raysl.eval.supervised import world
    from raysl.eval.weights import load_backbone

    torch.set_num_threads(raw["cpus_per_worker"])
    kind, opts = raw["kind"], raw["options"]
    drop_path = opts.get("drop_path", 0.0) if kind == "finetune" else 0.0

    def backbone_of(random_init: bool = False):
        backbone, _, _ = load_backbone(
            raw["ckpt"], img_size=raw["image_size"], drop_path_rate=drop_path, random_init=random_init
        )
        if torch.cuda.is_available() and raw["gpus_per_worker"]:
            backbone = backbone.to(torch.device("cuda", ray.train.get_context().get_local_rank()))
        return backbone

    train_x, train_y = load_labeled(raw["train"], raw["image_size"], "--train")
    val_x, val_y = load_labeled(raw["val"], raw["image_size"], "--val")
    if kind == "finetune":
        from raysl.eval.finetune import FinetuneOptions, finetune

        result = finetune(backbone_of(), train_x, train_y, val_x, val_y, FinetuneOptions(**opts))
    else:
        result = _score_features(kind, backbone_of(), train_x, train_y, val_x, val_y, opts, "")
        if raw.get("baseline"):
            result["random_init"] = _score_features(
                kind, backbone_of(random_init=True), train_x, train_y, val_x, val_y, opts, " (random init)"
            )
    # Ray Train keeps a run's reported metrics with its checkpoints: rank 0 hands its result back as one
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if world()[0] == 0:
            with open(os.path.join(d, "result.json"), "w") as f:
                json.dump(result, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"done": 1}, checkpoint=checkpoint)


def _score_features(kind: str, backbone, train_x, train_y, val_x, val_y, opts: dict, label: str) -> dict:
    """knn, linear or fewshot metrics of the backbone's frozen features (on rank 0; {} on the others
    for knn and fewshot)."""
    from raysl.eval.monitor import gathered_features
    from raysl.eval.supervised import world

    train_f = gathered_features(backbone, train_x, progress=f"features: --train{label}")
    val_f = gathered_features(backbone, val_x, progress=f"features: --val{label}")
    if kind == "linear":
        from raysl.eval.linear import linear_probe

        return linear_probe(train_f, train_y, val_f, val_y, **opts)
    if world()[0] != 0:
        return {}  # kNN and few-shot are cheap: rank 0 alone scores the gathered features
    if kind == "knn":
        from raysl.eval.monitor import knn_metrics

        return knn_metrics(train_f, train_y, val_f, val_y, opts.get("ks", [20, 200]), opts.get("temperature", 0.07))
    from raysl.eval.fewshot import fewshot

    return fewshot(train_f, train_y, val_f, val_y, **opts)


def evaluate(
    kind: str,
    ckpt: str,
    train: str,
    val: str,
    *,
    options: dict | None = None,
    backbone: str | None = None,
    workers: int = 1,
    cpus_per_worker: int = 1,
    gpus_per_worker: float = 0.0,
    image_size: int = 0,
    address: str | None = None,
    baseline: bool = False,
) -> dict:
    """`baseline`: also score the same backbone at random init (the weights the run started
    from), under "random_init" in the result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysl.eval.weights import run_config
    from raysl.paths import resolve_path
    from raysl.runtime import init_ray, train_logging
    from raysl.train import storage as run_storage

    ckpt, train, val = resolve_path(ckpt), resolve_path(train), resolve_path(val)  # the workers run elsewhere
    n_train, n_val, step = validate(kind, ckpt, train, val, backbone, options, baseline)
    cfg = run_config(ckpt)
    size = image_size or cfg.data.image_size or 224
    print(init_ray(address, quiet=False), flush=True)  # the workers' progress lines
    # Ray Train's storage inside the run dir, which every worker reads anyway (shared FS on a
    # cluster, or the bucket; there each worker fetches the weights for itself, weights.method_state)
    if run_storage.is_uri(ckpt):
        storage = f"{ckpt.rstrip('/')}/.eval_{uuid.uuid4().hex[:8]}"
    else:
        storage = tempfile.mkdtemp(prefix=".eval_", dir=ckpt)
    try:
        trainer = TorchTrainer(
            eval_loop_per_worker,
            train_loop_config={
                "kind": kind,
                "ckpt": ckpt,
                "train": train,
                "val": val,
                "baseline": baseline,
                "image_size": size,
                "options": options or {},
                "cpus_per_worker": cpus_per_worker,
                "gpus_per_worker": gpus_per_worker,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers,
                use_gpu=gpus_per_worker > 0,
                resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
            ),
            run_config=ray.train.RunConfig(
                name=f"eval_{kind}",
                storage_path=storage,
                logging_config=train_logging(),  # type: ignore[call-arg]  # Ray 2.60 has it; its stubs lag
            ),
        )
        checkpoint = trainer.fit().checkpoint
        assert checkpoint is not None  # the eval worker reports its result in one
        with checkpoint.as_directory() as d, open(os.path.join(d, "result.json")) as f:
            metrics = json.load(f)
    finally:
        if run_storage.is_uri(storage):
            run_storage.delete_dir(storage)
        else:
            shutil.rmtree(storage, ignore_errors=True)
    result = {
        "eval": kind,
        "ckpt": ckpt,
        "step": step,
        "backbone": cfg.model.backbone,
        "image_size": size,
        "train_images": n_train,
        "val_images": n_val,
        "workers": workers,
        **metrics,
    }
    run_storage.write_text(f"{ckpt.rstrip('/')}/eval_{kind}.json", json.dumps(result, indent=2))
    return result


def _numbers(text: str, typ, flag: str) -> list:
    try:
        return [typ(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected a comma list of {typ.__name__}s, e.g. 20,200") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument(
        "kind",
        choices=KINDS,
        help="knn: k-nearest-neighbour vote; linear: a linear probe on frozen features; "
        "fewshot: a probe on a few labeled images per class; finetune: train the whole backbone",
    )
    p.add_argument(
        "--ckpt", type=resolve_path, required=True, help="a pretraining run directory (its latest checkpoint is used)"
    )
    p.add_argument(
        "--train", type=resolve_path, required=True, help="labeled shard set to fit on (memory bank for knn)"
    )
    p.add_argument("--val", type=resolve_path, required=True, help="labeled shard set to score on")
    p.add_argument("--backbone", help="refuse the run unless it trained this timm backbone")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="knn/linear/fewshot: also score the same backbone at random init (the run's seed), as random_init",
    )
    p.add_argument(
        "--image-size", type=int, default=0, help="eval resolution (default: the run's data.image_size, else 224)"
    )
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs each worker reserves (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each worker reserves (default 0: CPU only)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="linear, finetune: head init and batch order; fewshot: the draws (default 0)",
    )
    p.add_argument("--k", default="20,200", help="knn: neighbour counts (comma list)")
    p.add_argument("--temperature", type=float, default=0.07, help="knn: vote temperature")
    p.add_argument("--lrs", default="0.01,0.1,1.0", help="linear: the lr sweep (comma list), best on --val is reported")
    p.add_argument("--shots", default="1,5,10", help="fewshot: labeled images per class (comma list)")
    p.add_argument("--draws", type=int, default=5, help="fewshot: seeded draws per shot count")
    p.add_argument("--epochs", type=int, default=0, help="linear (default 100) and finetune (default 10) epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="finetune: AdamW lr per 256 images")
    p.add_argument("--layer-decay", type=float, default=0.75, help="finetune: layer-wise lr decay (1: none)")
    p.add_argument("--drop-path", type=float, default=0.1, help="finetune: DropPath rate")
    p.add_argument("--mixup", type=float, default=0.8, help="finetune: mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="finetune: cutmix alpha (0: off)")
    p.add_argument("--smoothing", type=float, default=0.1, help="finetune: label smoothing")
    p.add_argument("--batch-size", type=int, default=64, help="finetune: images per worker and step")


def run_from_args(args: argparse.Namespace) -> None:
    if args.kind == "finetune":
        names = ("lr", "layer_decay", "drop_path", "mixup", "cutmix", "smoothing", "batch_size", "seed")
        options = {k: getattr(args, k) for k in names} | {"epochs": args.epochs or 10}
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
