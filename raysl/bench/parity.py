"""`raysl bench parity`: does `raysl pretrain` learn as much as a plain PyTorch loop with
the same recipe? kNN top-1 of the backbone each side trains, over several seeds.

Sides, each trained for `steps` steps from the same seed, then evaluated by the same code
(`raysl.eval.knn`: weighted cosine kNN, k=20, T=0.07, eval views at `image_size`), the
kNN memory bank being the labeled pretraining set and the queries a held-out set:

- random: the backbone at initialisation (timm, the seed), no training.
- raysl: `raysl.pretrain.pretrain` (what `raysl pretrain` runs: Ray Data views, Ray
  Train, DeepSpeed ZeRO-0 fp32), one worker of 2 CPUs.
- plain: a PyTorch loop written from lightly's parts and the papers (SimCLR; BYOL and
  MoCo v3 as lightly's examples train a momentum method, MoCo v3 with the paper's loss;
  DINO with two global crops; Barlow Twins and VICReg on BYOL's views; MoCo v2 with a
  memory bank):
  lightly's transform, heads and loss, a timm backbone, bitsandbytes' AdamW8bit with weight decay on
  parameters of ndim > 1, linear warm-up from 0 then a cosine to `min_lr` on the last
  step, a `DataLoader(shuffle=True)` of 2 workers over the set's images.
- plain+X (`--sides`): the plain loop with an ingredient taken from raysl, to find which
  one makes a difference (plain+X+Y: two of them): `views` (raysl's view pipeline, `raysl.data.views`, per image a fresh
  seed), `order` (the images in the order of raysl's training stream: shards permuted
  per epoch, rows shuffled within windows of `data.shuffle_window` shards), `method`
  (raysl's method module: backbone, projector, loss), `optim` (raysl's optimizer and
  schedules, `raysl.train.build`).

The lightly side needs the `bench` extra (lightly). Data: a labeled shard set and a
held-out labeled one (`--shards`, `--test`), or by default digits as `raysl bench e2e`
writes them: scikit-learn's real 8 x 8 digits split into two disjoint groups, the
pretraining images drawn from one and the test images from the other. `--layout
by-label` writes the pretraining rows sorted by label, as a folder per class listed in
path order gave before `raysl shards build` mixed its inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

SWAPS = ("views", "order", "method", "optim")
METHODS = ("simclr", "byol", "mocov3", "dino", "barlowtwins", "vicreg", "mocov2")
METHOD_DEFAULTS: dict[str, dict] = {
    "simclr": {},
    "byol": {"proj_hidden_dim": 1024, "proj_dim": 256},
    "mocov3": {"proj_hidden_dim": 1024, "proj_dim": 256},
    "dino": {"proj_hidden_dim": 1024, "proj_dim": 256},
    "barlowtwins": {"proj_hidden_dim": 1024, "proj_dim": 1024},
    "vicreg": {"proj_hidden_dim": 1024, "proj_dim": 1024},
    "mocov2": {},
}
# raysl's view preset of each method; Barlow Twins and VICReg train on BYOL's views (lightly's
# Barlow Twins example uses its BYOLTransform)
VIEWS = {"barlowtwins": "byol", "vicreg": "byol"}


@dataclass(frozen=True)
class Recipe:
    """Every setting both sides share."""

    method: str = "simclr"
    steps: int = 300
    batch_size: int = 128
    model: str = "resnet18"
    image_size: int = 32
    lr: float = 0.002  # per 256 images, scaled linearly with the batch
    min_lr: float = 1e-6
    warmup_steps: int = 30
    weight_decay: float = 0.05
    temperature: float = 0.2  # SimCLR, MoCo v3
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    pred_hidden_dim: int = 1024  # BYOL, MoCo v3
    ema_momentum: float = 0.99  # BYOL, MoCo v3, DINO: cosine to 1 on the last step
    num_prototypes: int = 1024  # DINO (two global crops, no local ones)
    barlow_lambda: float = 0.0051  # Barlow Twins (the paper's)
    queue_size: int = 4096  # MoCo v2
    shuffle_window: int = 2  # raysl's data.shuffle_window (and the plain+order side's)

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 256

    @property
    def views(self) -> str:
        return VIEWS.get(self.method, self.method)


# --- data -------------------------------------------------------------------------------


def digit_sets(out: str, images: int, test_images: int, seed: int, layout: str) -> tuple[str, str]:
    """(pretraining set, held-out set) of digits drawn from disjoint halves of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    from raysl.bench.e2e import write_digit_shards

    n = len(load_digits().images)
    order = np.random.default_rng(seed).permutation(n)
    cut = n * 2 // 3
    train = write_digit_shards(
        os.path.join(out, f"digits_train_{images}_{layout}_{seed}"),
        images,
        seed,
        bases=np.sort(order[:cut]),
        by_label=layout == "by-label",
    )
    test = write_digit_shards(
        os.path.join(out, f"digits_test_{test_images}_{seed}"), test_images, seed + 1, bases=np.sort(order[cut:])
    )
    return train, test


def stream_order(shards: str, *, seed: int, epoch: int, window: int) -> np.ndarray:
    """Indices (into the set's rows in manifest order) of raysl's one-worker training
    stream of `epoch`: the reader's shard permutation and window shuffles."""
    from raysl.data import reader
    from raysl.data.schema import read_manifest

    manifest = read_manifest(shards)
    rows = manifest.shards.rows
    first = np.concatenate([[0], np.cumsum(rows)[:-1]])
    mine = reader.worker_shards(manifest, seed=seed, epoch=epoch, rank=0, world_size=1)
    out = []
    for w in range(0, len(mine), window):
        idx = np.concatenate([np.arange(first[s], first[s] + rows[s]) for s in mine[w : w + window]])
        out.append(idx[reader.window_order(seed, epoch, w, len(idx))])
    return np.concatenate(out)


class StreamBatches(torch.utils.data.Sampler):
    """Batches of indices in raysl's stream order, epoch after epoch; an epoch's last
    partial batch is dropped, as the trainer's steps per epoch drop it."""

    def __init__(self, shards: str, batch_size: int, seed: int, window: int):
        self.shards, self.batch_size, self.seed, self.window = shards, batch_size, seed, window

    def __iter__(self):
        epoch = 0
        while True:
            order = stream_order(self.shards, seed=self.seed, epoch=epoch, window=self.window)
            for b in range(len(order) // self.batch_size):
                yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            epoch += 1


class Images(torch.utils.data.Dataset):
    """Image bytes -> the views of a transform (lightly's: on a PIL image; raysl's: on the bytes)."""

    def __init__(self, images: list[bytes], transform, raysl_views: bool):
        self.images, self.transform, self.raysl_views = images, transform, raysl_views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self.raysl_views:
            return self.transform(self.images[i])
        import io

        from PIL import Image

        return tuple(self.transform(Image.open(io.BytesIO(self.images[i])).convert("RGB")))


class RayslViews:
    """raysl's views of one image (`views.make_views`, ImageNet-normalised), a fresh
    augmentation seed per call drawn from numpy (seeded per DataLoader worker by torch)."""

    def __init__(self, preset: str, size: int, local_crops: int | None = None):
        from raysl.data.view_plans import view_spec

        self.spec = view_spec(preset, size=size, local_crops=local_crops)

    def __call__(self, data: bytes):
        from raysl.data.views import make_views, normalize

        seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64))
        views = make_views(data, seed, self.spec)
        return tuple(normalize(torch.from_numpy(np.ascontiguousarray(v))[None])[0] for v in views)


# --- the two sides ----------------------------------------------------------------------


def method_keys(recipe: Recipe) -> dict:
    """The `method` section of the raysl side's config."""
    keys: dict[str, Any] = {
        "name": recipe.method,
        "proj_hidden_dim": recipe.proj_hidden_dim,
        "proj_dim": recipe.proj_dim,
    }
    if recipe.method in ("simclr", "mocov3", "mocov2"):
        keys["temperature"] = recipe.temperature
    if recipe.method in ("byol", "mocov3"):
        keys["pred_hidden_dim"] = recipe.pred_hidden_dim
    if recipe.method in ("byol", "mocov3", "mocov2", "dino"):
        keys.update(ema_momentum=recipe.ema_momentum, ema_momentum_end=1.0)
    if recipe.method == "barlowtwins":
        keys["barlow_lambda"] = recipe.barlow_lambda
    if recipe.method == "mocov2":  # one worker: no batch to shuffle across workers
        keys.update(queue_size=recipe.queue_size, shuffle_bn=False)
    if recipe.method == "dino":  # the paper's temperatures and centre, no last-layer freeze
        keys.update(
            num_prototypes=recipe.num_prototypes,
            teacher_temp=0.04,
            teacher_temp_warmup=0.04,
            student_temp=0.1,
            center_momentum=0.9,
            freeze_last_layer_steps=0,
        )
    return keys


def raysl_config(shards: str, storage: str, name: str, recipe: Recipe, seed: int):
    from raysl.config import from_dict

    return from_dict(
        {
            "data": {
                "shards": shards,
                "views": recipe.views,
                "image_size": recipe.image_size,
                "batch_size": recipe.batch_size,
                "shuffle_window": recipe.shuffle_window,
                **({"local_crops": 0} if recipe.method == "dino" else {}),
            },
            "model": {"backbone": recipe.model},
            "method": method_keys(recipe),
            "optim": {
                "name": "adamw8bit",
                "lr": recipe.lr,
                "min_lr": recipe.min_lr,
                "warmup_steps": recipe.warmup_steps,
                "weight_decay": recipe.weight_decay,
            },
            "deepspeed": {"zero_stage": 0, "precision": "fp32", "grad_accum": 1},
            "train": {
                "name": name,
                "storage_path": storage,
                "epochs": 100_000,
                "max_steps": recipe.steps,
                "num_workers": 1,
                "cpus_per_worker": 2,
                "seed": seed,
                "log_every": max(recipe.steps // 5, 1),
                "checkpoint_every": 10**9,
                "keep_checkpoints": 1,
            },
        },
        origin="bench parity",
    )


def run_raysl(shards: str, storage: str, recipe: Recipe, seed: int) -> tuple[torch.nn.Module, dict]:
    import ray

    from raysl.eval.weights import load_backbone
    from raysl.pretrain import pretrain

    cfg = raysl_config(shards, storage, f"raysl-s{seed}-{time.strftime('%H%M%S')}", recipe, seed)
    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    summary = pretrain(cfg)
    ray.shutdown()
    wall = time.perf_counter() - t0
    return load_backbone(summary["run_dir"])[0], {"wall_s": round(wall, 1), "final_loss": summary["final_loss"]}


def cosine_lr(step: int, recipe: Recipe) -> float:
    """Linear warm-up from 0 to the peak over `warmup_steps`, then a half cosine that
    reaches `min_lr` on the last step."""
    peak, warm, total = recipe.peak_lr, recipe.warmup_steps, recipe.steps
    if step < warm:
        return peak * step / warm
    t = (step - warm) / max(total - warm - 1, 1)
    return recipe.min_lr + 0.5 * (peak - recipe.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _lightly_two_views(recipe: Recipe):
    """(backbone, forward(views) -> loss, modules) of a method that scores one projector's
    outputs on both views, as lightly's examples train it on a timm backbone: SimCLR
    (SimCLRProjectionHead, NTXentLoss), Barlow Twins (a 3-layer BarlowTwinsProjectionHead,
    BarlowTwinsLoss with lambda `barlow_lambda`) or VICReg (a 3-layer VICRegProjectionHead,
    VICRegLoss(25, 25, 1))."""
    import timm
    from lightly.loss import BarlowTwinsLoss, NTXentLoss, VICRegLoss
    from lightly.models.modules.heads import BarlowTwinsProjectionHead, SimCLRProjectionHead, VICRegProjectionHead

    backbone = timm.create_model(recipe.model, pretrained=False, num_classes=0)
    dims = (backbone.num_features, recipe.proj_hidden_dim, recipe.proj_dim)
    head: torch.nn.Module
    criterion: torch.nn.Module
    if recipe.method == "simclr":
        head, criterion = SimCLRProjectionHead(*dims), NTXentLoss(temperature=recipe.temperature)
    elif recipe.method == "barlowtwins":
        head, criterion = BarlowTwinsProjectionHead(*dims), BarlowTwinsLoss(lambda_param=recipe.barlow_lambda)
    else:
        head, criterion = VICRegProjectionHead(*dims, num_layers=3), VICRegLoss()
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head})

    def loss(views, step):
        x0, x1 = views
        return criterion(head(backbone(x0)), head(backbone(x1)))

    return backbone, loss, model


def _lightly_momentum(recipe: Recipe):
    """BYOL, MoCo v3 or MoCo v2 as lightly's examples train a momentum method: momentum
    copies of backbone and projector updated before each step on lightly's cosine schedule,
    the loss symmetrised over the two views. BYOL: BYOLProjectionHead, BYOLPredictionHead,
    NegativeCosineSimilarity. MoCo v3: MoCoProjectionHead (3 layers, batch norm),
    BYOLPredictionHead, and the paper's loss (lightly has none of its own): cross entropy
    of q against the momentum keys of the batch, times 2T. MoCo v2: MoCoProjectionHead
    (fc-relu-fc), no predictor, NTXentLoss with a memory bank of `queue_size` keys, both
    views' queries scored in one call against the bank as it was before the step."""
    import copy

    import timm
    import torch.nn.functional as F
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    backbone = timm.create_model(recipe.model, pretrained=False, num_classes=0)
    if recipe.method == "mocov3":
        projector: torch.nn.Module = MoCoProjectionHead(
            backbone.num_features, recipe.proj_hidden_dim, recipe.proj_dim, num_layers=3, batch_norm=True
        )
    elif recipe.method == "mocov2":
        projector = MoCoProjectionHead(backbone.num_features, recipe.proj_hidden_dim, recipe.proj_dim)
    else:
        projector = BYOLProjectionHead(backbone.num_features, recipe.proj_hidden_dim, recipe.proj_dim)
    predictor: torch.nn.Module = (
        torch.nn.Identity()
        if recipe.method == "mocov2"
        else BYOLPredictionHead(recipe.proj_dim, recipe.pred_hidden_dim, recipe.proj_dim)
    )
    backbone_m, projector_m = copy.deepcopy(backbone), copy.deepcopy(projector)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(projector_m)
    cosine = NegativeCosineSimilarity()
    model = torch.nn.ModuleDict(
        {"backbone": backbone, "projector": projector, "predictor": predictor, "bm": backbone_m, "pm": projector_m}
    )
    if recipe.method == "mocov2":
        model["queue"] = queue = NTXentLoss(recipe.temperature, memory_bank_size=(recipe.queue_size, recipe.proj_dim))

    def pair_loss(q, k):
        if recipe.method == "byol":
            return cosine(q, k)
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / recipe.temperature
        return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * recipe.temperature

    def loss(views, step):
        m = cosine_schedule(step, recipe.steps, recipe.ema_momentum, 1.0)
        update_momentum(backbone, backbone_m, m=m)
        update_momentum(projector, projector_m, m=m)
        x0, x1 = views
        p0, p1 = predictor(projector(backbone(x0))), predictor(projector(backbone(x1)))
        with torch.no_grad():
            z0, z1 = projector_m(backbone_m(x0)), projector_m(backbone_m(x1))
        if recipe.method == "mocov2":
            return queue(torch.cat([p0, p1]), torch.cat([z1, z0]))
        total = pair_loss(p0, z1) + pair_loss(p1, z0)
        return 0.5 * total if recipe.method == "byol" else total

    return backbone, loss, model


def _lightly_dino(recipe: Recipe):
    """DINO as lightly's example trains it: DINOProjectionHead, a momentum teacher updated
    before each step on lightly's cosine schedule, DINOLoss (teacher on the global crops)."""
    import copy

    import timm
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    backbone = timm.create_model(recipe.model, pretrained=False, num_classes=0)

    def dino_head():
        return DINOProjectionHead(backbone.num_features, recipe.proj_hidden_dim, recipe.proj_dim, recipe.num_prototypes)

    head, head_t = dino_head(), dino_head()  # weight norm cannot be deep-copied
    head_t.load_state_dict(head.state_dict())  # the teacher starts as the student (the paper)
    backbone_t = copy.deepcopy(backbone)
    deactivate_requires_grad(backbone_t)
    deactivate_requires_grad(head_t)
    criterion = DINOLoss(
        output_dim=recipe.num_prototypes,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        student_temp=0.1,
        center_momentum=0.9,
    )
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head, "bt": backbone_t, "ht": head_t})

    def loss(views, step):
        m = cosine_schedule(step, recipe.steps, recipe.ema_momentum, 1.0)
        update_momentum(backbone, backbone_t, m=m)
        update_momentum(head, head_t, m=m)
        with torch.no_grad():
            teacher = [head_t(backbone_t(v)) for v in views[:2]]
        return criterion(teacher, [head(backbone(v)) for v in views], epoch=step)

    return backbone, loss, model


def lightly_method(recipe: Recipe):
    """(backbone, loss(views, step), module holding every part) of the plain side."""
    make = {
        "simclr": _lightly_two_views,
        "dino": _lightly_dino,
        "barlowtwins": _lightly_two_views,
        "vicreg": _lightly_two_views,
    }.get(recipe.method, _lightly_momentum)
    return make(recipe)


def lightly_transform(recipe: Recipe):
    """lightly's transform of the method at `image_size`."""
    if recipe.views in ("byol", "mocov3"):  # MoCo v3, Barlow Twins and VICReg train on BYOL's views
        from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

        size = recipe.image_size
        return BYOLTransform(BYOLView1Transform(input_size=size), BYOLView2Transform(input_size=size))
    if recipe.method == "dino":
        from lightly.transforms import DINOTransform

        return DINOTransform(global_crop_size=recipe.image_size, n_local_views=0)
    if recipe.method == "mocov2":
        from lightly.transforms import MoCoV2Transform

        return MoCoV2Transform(input_size=recipe.image_size)
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(input_size=recipe.image_size)


def _raysl_method(recipe: Recipe, seed: int):
    from raysl.methods.base import method_class

    cls = method_class(recipe.method)
    cfg = raysl_config("unused", "unused", "unused", recipe, seed)
    method = cls(cfg)
    schedules = cls.schedules(cfg.method, recipe.steps)  # the EMA momentum of BYOL

    def values(step):
        return {"step": step, **{k: float(v[min(step, len(v) - 1)]) for k, v in schedules.items()}}

    def loss(views, step):
        if step > 0:  # the trainer's after_step of the previous step (BYOL: the teacher's EMA update)
            method.after_step(values(step - 1))
        return method(list(views), values(step))["loss"]

    return method.evaluated_backbone(), loss, method


def raysl_schedules(recipe: Recipe):
    """raysl's lr and weight-decay schedules for `recipe` (what `raysl pretrain` runs)."""
    from raysl.optim.schedules import Schedules

    return Schedules.build(
        total_steps=recipe.steps,
        warmup_steps=recipe.warmup_steps,
        lr=recipe.peak_lr,
        min_lr=recipe.min_lr,
        weight_decay=recipe.weight_decay,
        weight_decay_end=recipe.weight_decay,
    )


def run_plain(shards: str, recipe: Recipe, seed: int, swaps: frozenset[str] = frozenset()) -> tuple[Any, dict]:
    """The plain loop (with raysl's ingredients `swaps`); (trained backbone, {wall_s, final_loss})."""
    import bitsandbytes as bnb

    from raysl.bench.data import read_images

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        np.random.seed(seed)
        if "method" in swaps:
            backbone, loss_fn, model = _raysl_method(recipe, seed)
        else:
            backbone, loss_fn, model = lightly_method(recipe)
        if "optim" in swaps:
            from raysl.optim.optimizers import build_optimizer, param_groups
            from raysl.optim.schedules import apply

            optimizer = build_optimizer("adamw8bit", param_groups(model, recipe.weight_decay), lr=0.0)
            schedules = raysl_schedules(recipe)

            def set_lr(step):
                apply(optimizer, schedules.at(step))
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = bnb.optim.AdamW8bit(
                [
                    {"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
                    {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
                ],
                lr=recipe.peak_lr,
            )

            def set_lr(step):
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, recipe)

        raysl_views = "views" in swaps
        if raysl_views:
            transform = RayslViews(recipe.views, recipe.image_size, 0 if recipe.method == "dino" else None)
        else:
            transform = lightly_transform(recipe)
        dataset = Images(read_images(shards), transform, raysl_views)
        if "order" in swaps:
            sampler = StreamBatches(shards, recipe.batch_size, seed, recipe.shuffle_window)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2)
        else:
            generator = torch.Generator().manual_seed(seed)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=recipe.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=2,
                persistent_workers=True,
                generator=generator,
            )
        model.train()
        step, loss = 0, float("nan")
        while step < recipe.steps:
            for views in loader:
                set_lr(step)
                out = loss_fn(views, step)
                out.backward()
                optimizer.step()
                optimizer.zero_grad()
                loss, step = float(out.detach()), step + 1
                if step >= recipe.steps:
                    break
        del loader
    finally:
        torch.set_num_threads(threads)
    return backbone, {"wall_s": round(time.perf_counter() - t0, 1), "final_loss": loss}


def random_backbone(recipe: Recipe, seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(recipe.model, pretrained=False, num_classes=0)


# --- the bench --------------------------------------------------------------------------


def knn(backbone, bank, test) -> float:
    from raysl.eval.knn import extract_features, knn_top1

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_f = extract_features(backbone, bank[0], 256)
        test_f = extract_features(backbone, test[0], 256)
    finally:
        torch.set_num_threads(threads)
    return round(knn_top1(train_f, bank[1], test_f, test[1], k=20, temperature=0.07)[0], 2)


def _spread(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 2),
        "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def check_sides(text: str) -> list[str]:
    """--sides as a list, each side checked."""
    from raysl.errors import UserError

    sides = [s.strip() for s in text.split(",") if s.strip()]
    for side in sides:
        base, *swaps = side.split("+")
        if side != "raysl" and (base != "plain" or not set(swaps) <= set(SWAPS)):
            raise UserError(
                f"bench parity: --sides {side}: a side is raysl, plain or plain+X[+Y] with X, Y in {', '.join(SWAPS)}"
            )
    if not sides:
        raise UserError("bench parity: --sides names no side")
    return sides


def run_parity_bench(
    out: str,
    *,
    recipe: Recipe,
    seeds: list[int],
    sides: list[str],
    shards: str | None = None,
    test: str | None = None,
    images: int = 10000,
    test_images: int = 2000,
    layout: str = "mixed",
) -> dict:
    from raysl.errors import UserError
    from raysl.eval.labeled import load_labeled

    if recipe.method not in METHODS:
        raise UserError(f"bench parity: --method {recipe.method}: the plain loop exists for {', '.join(METHODS)}")
    if not seeds:
        raise UserError("bench parity: --seeds names no seed")
    if (shards is None) != (test is None):
        raise UserError("bench parity: give both --shards (labeled pretraining set) and --test (held-out set), or none")
    generated = shards is None or test is None
    if shards is None or test is None:
        shards, test = digit_sets(out, images, test_images, 0, layout)
    bank, held_out = load_labeled(shards, recipe.image_size), load_labeled(test, recipe.image_size, "--test")
    storage = os.path.join(out, "runs")
    head: dict[str, Any] = {
        "bench": "parity",
        "recipe": asdict(recipe),
        "shards": shards,
        "test": test,
        "layout": layout if generated else None,
        "bank_images": int(bank[1].shape[0]),
        "test_images": int(held_out[1].shape[0]),
        "knn": "weighted cosine kNN, k=20, T=0.07, eval views",
    }
    rows: list[dict] = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed, "random": knn(random_backbone(recipe, seed), bank, held_out)}
        for side in sides:
            if side == "raysl":
                backbone, info = run_raysl(shards, storage, recipe, seed)
            else:
                swaps = frozenset(side.split("+")[1:])
                backbone, info = run_plain(shards, recipe, seed, swaps)
            row[side] = knn(backbone, bank, held_out)
            row[f"{side}_wall_s"] = info["wall_s"]
            row[f"{side}_final_loss"] = round(info["final_loss"], 4)
            print(json.dumps({"seed": seed, "side": side, "knn_top1": row[side], **info}), file=sys.stderr, flush=True)
        rows.append(row)
        result = {**head, **summary(rows, sides)}
        with open(os.path.join(out, "bench_parity.json"), "w") as f:  # after every seed: a cut run keeps its seeds
            json.dump(result, f, indent=2)
    return result


def summary(rows: list[dict], sides: list[str]) -> dict:
    """Seeds, rows, and per side the spread of kNN top-1, wall time and the difference to plain."""
    out: dict[str, Any] = {
        "seeds": [r["seed"] for r in rows],
        "rows": rows,
        "knn_top1": {s: _spread([r[s] for r in rows]) for s in ["random", *sides]},
        "wall_s": {s: _spread([r[f"{s}_wall_s"] for r in rows]) for s in sides},
    }
    if "plain" in sides:
        out["minus_plain"] = {s: _spread([r[s] - r["plain"] for r in rows]) for s in sides if s != "plain"}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument("--out", type=resolve_path, default="bench_parity", help="folder for data and runs")
    p.add_argument("--method", default="simclr", choices=METHODS, help="the method both sides train")
    p.add_argument("--shards", type=resolve_path, help="labeled pretraining shard set (also the kNN memory bank)")
    p.add_argument("--test", type=resolve_path, help="held-out labeled shard set (the kNN queries)")
    p.add_argument("--images", type=int, default=10000, help="digits to pretrain on without --shards")
    p.add_argument("--test-images", type=int, default=2000, help="held-out digits without --test")
    p.add_argument(
        "--layout",
        choices=("mixed", "by-label"),
        default="mixed",
        help="digits without --shards: rows in mixed order, or sorted by label (a folder per class in path order)",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per side each (default 0,1,2)")
    p.add_argument(
        "--sides",
        default="plain,raysl",
        help="comma-separated sides: plain, raysl, and plain+X[+Y] with X, Y raysl ingredients the plain loop "
        f"takes ({', '.join(SWAPS)}); default plain,raysl",
    )
    for name, default in (("steps", 300), ("batch-size", 128), ("warmup-steps", 30)):
        p.add_argument(f"--{name}", type=int, default=default, help=f"(default {default})")
    p.add_argument("--model", default="resnet18", help="timm backbone (default resnet18)")
    p.add_argument("--lr", type=float, default=0.002, help="peak lr per 256 images (default 0.002)")
    p.add_argument("--temperature", type=float, default=0.2, help="(default 0.2)")
    p.add_argument("--shuffle-window", type=int, default=2, help="raysl's data.shuffle_window (default 2)")


def run_from_args(args) -> dict:
    sides = check_sides(args.sides)
    recipe = Recipe(
        **METHOD_DEFAULTS[args.method],
        method=args.method,
        steps=args.steps,
        batch_size=args.batch_size,
        model=args.model,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        temperature=args.temperature,
        shuffle_window=args.shuffle_window,
    )
    os.makedirs(args.out, exist_ok=True)
    return run_parity_bench(
        os.path.abspath(args.out),
        recipe=recipe,
        seeds=[int(s) for s in args.seeds.split(",") if s.strip()],
        sides=sides,
        shards=args.shards,
        test=args.test,
        images=args.images,
        test_images=args.test_images,
        layout=args.layout,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="raysl bench parity", description=__doc__.splitlines()[0])
    add_arguments(p)
    print(json.dumps(run_from_args(p.parse_args(argv))), flush=True)


if __name__ == "__main__":
    main()
