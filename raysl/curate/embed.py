"""`raysl curate embed`: every image of a shard set -> one embedding, as a Ray Data job.

One input shard is one unit of work: an actor of the pool (`map_batches` with a class,
`concurrency` actors, a GPU each when the cluster has GPUs) reads the shard, decodes its
images with the "eval" views (short side to size/0.875, centre crop), embeds them in
mini-batches and writes EMB/part-NNNNN.parquet under a temporary name, then renames it.
A killed job therefore leaves only whole parts, and a rerun skips the shards whose part
exists (`embed.json`, written first, must name the same shards and model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysl.curate.embeddings import META, emb_schema, part_name
from raysl.errors import UserError

PAUSE_ENV = "RAYSL_EMBED_PAUSE_S"  # tests: each actor sleeps this long after writing a part


@dataclass(frozen=True)
class ModelSpec:
    """What embeds: a raysl run's backbone, or a timm architecture at random init (seeded)."""

    kind: str  # "run" or "timm"
    name: str  # run directory (absolute) or timm model name
    image_size: int
    seed: int = 0
    step: int = 0
    stage: int = -1  # -1: the pooled output (what eval uses); k: stage k's feature map, pooled to a 2x2 grid
    input_norm: str = "imagenet"  # or "per-image": each image's channels standardised (drops global colour)

    @property
    def identity(self) -> str:
        features = f",stage={self.stage},grid=2" if self.stage >= 0 else ""
        norm = f",input={self.input_norm}" if self.input_norm != "imagenet" else ""
        if self.kind == "run":
            return f"run:{self.name}@step={self.step},size={self.image_size}{features}{norm}"
        return f"timm:{self.name}@random-init,seed={self.seed},size={self.image_size}{features}{norm}"

    def features(self, model, views):
        """uint8 (N, 3, S, S) tensor -> float32 (N, D) features."""
        import torch

        from raysl.data.views import normalize

        if self.input_norm == "per-image":
            x = views.float()
            x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)
        else:
            x = normalize(views)
        with torch.inference_mode():
            if self.stage < 0:
                return model(x).float()
            fmap = model.forward_intermediates(x, indices=[self.stage], intermediates_only=True)[0]
            return torch.nn.functional.adaptive_avg_pool2d(fmap.float(), 2).flatten(1)

    def build(self):
        import torch

        if self.kind == "run":
            from raysl.eval.weights import load_backbone

            backbone, _, _ = load_backbone(self.name, img_size=self.image_size)
        else:
            from raysl.models.backbone import create_backbone

            torch.manual_seed(self.seed)
            backbone = create_backbone(self.name, img_size=self.image_size)
        return backbone.eval()


INPUT_NORMS = ("imagenet", "per-image")


def resolve_model(
    model: str, image_size: int = 0, seed: int = 0, stage: int = -1, input_norm: str = "imagenet"
) -> ModelSpec:
    """A run directory (it has config.yaml) or a timm model name; checked on the driver."""
    if input_norm not in INPUT_NORMS:
        raise UserError(f"--input-norm {input_norm}: one of {', '.join(INPUT_NORMS)}")
    if "://" in model or os.path.isdir(
        model
    ):  # a run in a bucket: each actor fetches its weights (weights.local_files)
        from raysl.data.buckets import check_bucket
        from raysl.eval.weights import latest_checkpoint, run_config
        from raysl.paths import resolve_path

        check_bucket(model, "--model")
        cfg = run_config(model)
        step, _ = latest_checkpoint(model)
        return ModelSpec(
            "run",
            resolve_path(model).rstrip("/"),
            image_size or cfg.data.image_size or 224,
            step=step,
            stage=stage,
            input_norm=input_norm,
        )
    import timm

    if not timm.list_models(model):
        raise UserError(f"--model {model}: neither a run directory nor a timm model name (see timm.list_models())")
    return ModelSpec("timm", model, image_size or 224, seed=seed, stage=stage, input_norm=input_norm)


class EmbedShard:
    """Ray Data actor: one input shard per call -> its part file, written atomically."""

    def __init__(self, spec: ModelSpec, out: str, batch_size: int):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = spec.build().to(self.device)
        probe = torch.zeros(1, 3, spec.image_size, spec.image_size, dtype=torch.uint8, device=self.device)
        self.dim = int(spec.features(self.model, probe).shape[1])
        self.spec, self.out, self.batch_size = spec, out, batch_size
        self.pause = float(os.environ.get(PAUSE_ENV, "0") or 0)

    def __call__(self, batch: dict) -> dict:
        from raysl.data.schema import filesystem_and_path
        from raysl.data.shard_index import mask_rows
        from raysl.data.view_plans import view_spec
        from raysl.data.views import make_views

        spec = view_spec("eval", global_size=self.spec.image_size)
        shards, rows_done, seconds = [], [], []
        for shard, path, mask in zip(batch["shard"], batch["path"], batch["mask"]):
            start = time.perf_counter()
            fs, local = filesystem_and_path(str(path))
            table = pq.read_table(local, columns=["key", "image"], filesystem=fs)
            rows = mask_rows(mask if mask else None)
            rows = np.arange(table.num_rows) if rows is None else rows
            keys, images = table.column("key").to_pylist(), table.column("image")
            feats, kept_rows, kept_keys = [], [], []
            for lo in range(0, len(rows), self.batch_size):
                views, chunk = [], rows[lo : lo + self.batch_size]
                for r in chunk:
                    try:
                        views.append(make_views(images[int(r)].as_py(), 0, spec)[0])
                    except Exception:  # DecodeError: an image that does not decode gets no embedding
                        continue
                    kept_rows.append(int(r))
                    kept_keys.append(keys[int(r)])
                if views:
                    imgs = self.torch.from_numpy(np.stack(views)).to(self.device)
                    feats.append(self.spec.features(self.model, imgs).cpu().numpy())
            x = np.concatenate(feats) if feats else np.zeros((0, self.dim), np.float32)
            dim = x.shape[1]
            part = pa.table(
                {
                    "key": pa.array(kept_keys, pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), dim),
                    "shard": pa.array([int(shard)] * len(kept_rows), pa.int32()),
                    "row": pa.array(kept_rows, pa.int64()),
                },
                schema=emb_schema(dim, self.spec.identity),
            )
            final = os.path.join(self.out, part_name(int(shard)))
            tmp = os.path.join(self.out, f".{part_name(int(shard))}.{os.getpid()}.tmp")
            pq.write_table(part, tmp)
            os.replace(tmp, final)  # atomic: a part exists whole or not at all
            if self.pause:
                time.sleep(self.pause)
            shards.append(int(shard))
            rows_done.append(len(rows))
            seconds.append(time.perf_counter() - start)
        return {"shard": np.array(shards), "rows": np.array(rows_done), "seconds": np.array(seconds)}


@dataclass
class EmbedPlan:
    shards: str
    out: str
    spec: ModelSpec
    paths: list[str]
    masks: list
    rows: list[int]
    todo: list[int]  # shard positions without a part yet


def plan_embed(shards: str, model: str, out: str, *, image_size: int = 0, seed: int = 0, **features) -> EmbedPlan:
    """Everything checked on the driver before Ray starts; writes EMB/embed.json (first)."""
    from raysl.data.buckets import check_buckets
    from raysl.data.schema import read_manifest, shard_paths

    check_buckets({"--shards": shards})
    manifest = read_manifest(shards)
    spec = resolve_model(model, image_size, seed, **features)
    meta = {"shards": len(manifest.shards), "source": os.path.abspath(shards), "model": spec.identity}
    path = os.path.join(out, META)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in meta} != meta:
            raise UserError(
                f"{out}: holds embeddings of {old.get('source')} by {old.get('model')}, not of {meta['source']} by "
                f"{meta['model']}; use another --out"
            )
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(meta | {"image_size": spec.image_size}, f, indent=2)
    os.replace(path + ".tmp", path)
    todo = [i for i in range(len(manifest.shards)) if not os.path.exists(os.path.join(out, part_name(i)))]
    return EmbedPlan(
        os.path.abspath(shards),
        os.path.abspath(out),
        spec,
        shard_paths(os.path.abspath(shards), manifest),
        manifest.shards.masks(),
        manifest.shards.rows.tolist(),
        todo,
    )


def run_embed(plan: EmbedPlan, *, actors: int = 0, batch_size: int = 32) -> dict:
    """The Ray Data job: returns counts and images/s. GPU actors when the cluster has GPUs."""
    import ray

    from raysl.progress import bar

    total = len(plan.paths)
    done_before = total - len(plan.todo)
    images = 0
    start = time.perf_counter()
    if plan.todo:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = actors or max(1, gpus or int(ray.cluster_resources().get("CPU", 1)) // 2)
        items = [{"shard": i, "path": plan.paths[i], "mask": plan.masks[i] or b""} for i in plan.todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            EmbedShard,
            fn_constructor_args=(plan.spec, plan.out, batch_size),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
        )
        todo_rows = sum(plan.rows[i] for i in plan.todo)
        with bar(todo_rows, "curate embed") as progress:
            progress.set_postfix(done_before=done_before, refresh=False)
            for r in ds.iter_rows():
                images += int(r["rows"])
                progress.update(int(r["rows"]))
    seconds = time.perf_counter() - start
    return {
        "emb": plan.out,
        "model": plan.spec.identity,
        "shards": total,
        "shards_skipped_done": done_before,
        "shards_embedded": len(plan.todo),
        "images_embedded": images,
        "images_per_s": round(images / seconds, 1) if images else 0.0,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument("--shards", type=resolve_path, required=True, help="the shard set to embed")
    p.add_argument("--model", required=True, help="a raysl run directory, or a timm model name (random init)")
    p.add_argument("--out", type=resolve_path, required=True, help="embedding folder (EMB); rerun to resume")
    p.add_argument("--image-size", type=int, default=0, help="eval crop size (default: the run's, else 224)")
    p.add_argument("--seed", type=int, default=0, help="timm random init seed")
    p.add_argument(
        "--stage", type=int, default=-1, help="-1: the pooled output; k: stage k's feature map on a 2x2 grid"
    )
    p.add_argument(
        "--input-norm",
        choices=("imagenet", "per-image"),
        default="imagenet",
        help="per-image: standardise each image's channels (random-init features then see structure, not colour)",
    )
    p.add_argument("--actors", type=int, default=0, help="actor pool size (default: GPUs, else CPUs / 2)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass in an actor (default 32)")


def run_from_args(args: argparse.Namespace) -> None:
    from raysl.runtime import init_ray

    features = dict(stage=args.stage, input_norm=args.input_norm)
    plan = plan_embed(args.shards, args.model, args.out, image_size=args.image_size, seed=args.seed, **features)
    print(init_ray(args.address), file=sys.stderr)
    print(json.dumps(run_embed(plan, actors=args.actors, batch_size=args.batch_size)))
