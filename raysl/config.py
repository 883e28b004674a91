"""Typed run configuration: a YAML recipe plus `section.key=value` overrides.

Every value is checked here, before any Ray work starts: an unknown key, a wrong type
or an out-of-range value is one UserError naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from raysl.checks import between, one_of
from raysl.errors import UserError
from raysl.methods.keys import MethodConfig
from raysl.paths import resolve_path


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers: PyYAML follows YAML 1.1, which reads 1e-6 and 1E3 (no dot,
    or no exponent sign) as strings; YAML 1.2 and Python read them as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(stream):
    """yaml.safe_load, but 1e-6, 5e-4 and 1E3 are numbers (see _Loader)."""
    return yaml.load(stream, Loader=_Loader)


def _key(default, help: str, **check) -> Any:
    """A config key: its default, its meaning (the help docs/configuration.md is written from,
    `raysl.config_docs`) and its checks (`raysl.checks.between` / `one_of`, "path", "each", ...).
    A list or dict default is copied for every Config."""
    metadata = {"help": help, **check}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.copy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _scale_pair():
    """A crop-scale range [lo, hi] as a fraction of the image area, 0 < lo <= hi <= 1;
    the empty list means "the views preset's own"."""
    return {
        "each": between(0.0, 1.0, lo_open=True),
        "length": 2,
        "ascending": True,
        "empty_ok": True,
        "example": "[0.4, 1.0]",
    }


@dataclass
class DataConfig:
    shards: str | list[str] = _key(
        "",
        "a shard set (directory or URI, `raysl shards build`), or a list of them read as a mixture in the "
        "proportions `data.weights`: `[curated/, s3://bucket/web]`",
        path=True,
        example="[a/, b/]",
    )
    weights: list[float] = _key(
        [],
        "with a list of sets: one weight >= 0 per set, not all 0 (`[0.3, 0.7]`); 0 lists a set without reading "
        "it. With one set: empty or one weight",
        each=between(0.0),
        empty_ok=True,
        example="[0.3, 0.7]",
    )
    views: str = _key("", "the views preset (`simclr`, `dino`, `mae`, ...; views.md); empty: the method's own")
    image_size: int = _key(0, "side of the global crops in pixels; 0: the preset's", **between(0))
    global_crops: int = _key(
        -1, "number of global crops; -1: the preset's. DINO cycles its blur/solarize pair", **between(-1)
    )
    global_scale: list[float] = _key(
        [],
        "`[lo, hi]`, the area fraction a global crop covers, 0 < lo <= hi <= 1; for `mae`/`mae_medical` the "
        "crop-scale range; []: the preset's",
        **_scale_pair(),
    )
    local_crops: int = _key(-1, "number of local (multi-crop) crops; -1: the preset's", **between(-1))
    local_size: int = _key(0, "side of the local crops in pixels; 0: the preset's (96)", **between(0))
    local_scale: list[float] = _key([], "`[lo, hi]` for local crops; []: the preset's", **_scale_pair())
    batch_size: int = _key(64, "images per worker and micro-step", **between(1))
    shuffle_window: int = _key(2, "shards whose rows are shuffled together in one window", **between(1))
    augment_tasks: int = _key(
        0, "read/augment tasks per training worker that run at once; 0: `train.cpus_per_worker`", **between(0)
    )
    task_cpus: float = _key(
        0.0,
        "logical CPUs each read/augment task reserves. 0 shares the training workers' cores (right on one "
        "machine); 1 on a cluster with CPU-only data nodes places the tasks there",
        **between(0.0),
    )
    task_resources: dict[str, float] = _key(
        {},
        "custom Ray resources each read/augment task requests, e.g. `{data_node: 1}` to put decoding and "
        "augmentation on the nodes that advertise `data_node`",
        **between(0.0),
    )
    cache_share: float = _key(
        0.05,
        "keep a shard set in Ray's object store for the whole run when its files take at most this share of "
        "the cluster's object store (read once, not every epoch); 0: always read from storage",
        **between(0.0, 1.0),
    )
    augment_on: str = _key(
        "tasks",
        "where the views are made. `tasks`: the read/augment tasks make uint8 views. `worker`: the tasks only "
        "decode and the training worker makes the views on its own device, batched (views.md); not for methods "
        "that draw patch masks",
        **one_of("tasks", "worker"),
    )


@dataclass
class ModelConfig:
    backbone: str = _key("resnet18", "any timm model name; weights are never downloaded (random init)")
    drop_path_rate: float = _key(
        0.0, "timm's stochastic depth: 0 at the first block, rising to this rate at the last", **between(0.0, 1.0)
    )
    global_pool: str = _key(
        "",
        "the backbone's pooled feature (timm's `global_pool`); empty: the model's default (the CLS token for "
        "ViTs). MAE recipes use `avg`: MAE trains the patch tokens, not the CLS token",
        **one_of("", "avg", "token", "max", "avgmax"),
    )
    compile: bool = _key(
        False, "compile the backbone in place (`nn.Module.compile`): state-dict keys and checkpoints unchanged"
    )
    compile_backend: str = _key(
        "inductor",
        "torch.compile backend with `model.compile=true`. `inductor` generates fused kernels (on the CPU it needs "
        "a C++ compiler and minutes of compiling); `aot_eager` traces forward and backward graphs without "
        "generating code; `eager` only captures graphs (debugging)",
        **one_of("inductor", "aot_eager", "eager"),
    )
    grad_checkpointing: bool = _key(
        False,
        "activation checkpointing (timm's `set_grad_checkpointing`): blocks keep only their inputs and recompute "
        "the rest in backward; a timm model without it is a config error",
    )


@dataclass
class OptimConfig:
    name: str = _key(
        "adamw",
        "the optimizer; the 8-bit ones are bitsandbytes', the paged ones need a GPU. LARS and LAMB need "
        "`deepspeed.zero_stage=0`",
        **one_of("adamw", "sgd", "lars", "lamb", "adamw8bit", "lion8bit", "paged_adamw8bit", "paged_lion8bit"),
    )
    lr: float = _key(
        1e-3, "peak learning rate per 256 images (scaled linearly with the global batch)", **between(0.0, lo_open=True)
    )
    min_lr: float = _key(1e-6, "learning rate at the end of the cosine decay", **between(0.0))
    warmup_steps: int = _key(0, "steps of linear warmup before the cosine decay", **between(0))
    weight_decay: float = _key(0.05, "weight decay at step 0", **between(0.0))
    weight_decay_end: float = _key(-1.0, "weight decay at the last step (cosine schedule); < 0: same as weight_decay")
    momentum: float = _key(0.9, "momentum of sgd and lars", **between(0.0, 1.0))
    beta1: float = _key(0.9, "first moment decay (beta1) of the Adam family, LAMB and Lion", **between(0.0, 1.0))
    beta2: float = _key(0.999, "second moment decay (beta2) of the Adam family, LAMB and Lion", **between(0.0, 1.0))
    clip_grad: float = _key(0.0, "clip the gradient norm to this; 0: no clipping", **between(0.0))


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _key(
        0, "DeepSpeed ZeRO stage (3: the method is built partitioned; pretraining.md)", **one_of(0, 1, 2, 3)
    )
    precision: str = _key("fp32", "training precision", **one_of("fp32", "bf16", "fp16"))
    grad_accum: int = _key(1, "micro-steps whose gradients are accumulated per optimizer step", **between(1))
    offload_optimizer: str = _key(
        "none",
        "where the optimizer state lives (ZeRO stage >= 1): `none` (on the device), `cpu` (pinned host memory) or "
        "`nvme` (files under `deepspeed.nvme_path`). Needs DeepSpeed's own CPU Adam: `optim.name=adamw` runs as "
        "DeepSpeedCPUAdam; bitsandbytes' 8-bit optimizers cannot be offloaded",
        **one_of("none", "cpu", "nvme"),
    )
    offload_param: str = _key(
        "none", "where the parameters live, as offload_optimizer; ZeRO-3 only", **one_of("none", "cpu", "nvme")
    )
    nvme_path: str = _key("", "a local NVMe directory, for `nvme` offload", path=True)
    reduce_bucket_size: int = _key(
        0,
        "gradient elements ZeRO reduces at once; 0: DeepSpeed's default (5e8, 1 GB per worker in bf16; 5e7 is 100 MB)",
        **between(0),
    )
    grad_accum_dtype: str = _key(
        "",
        "dtype of ZeRO's gradient partitions (DeepSpeed's `data_types.grad_accum_dtype`); empty: its default "
        "(fp32 for bf16 training). bf16 halves them (less exact accumulation)",
        **one_of("", "fp32", "bf16"),
    )
    sub_group_size: int = _key(
        0,
        "ZeRO-3 steps the optimizer on sub-groups of this many elements of each worker's partition; 0: "
        "DeepSpeed's default (1e9, one group). bitsandbytes' 8-bit optimizers on the CPU dequantise a whole "
        "group's state to fp32 while they step, so a smaller group (5e7) bounds that transient",
        **between(0),
    )
    max_live_parameters: int = _key(
        0,
        "ZeRO-3 keeps gathered parameters alive (and prefetches) up to this many elements (its "
        "`stage3_max_live_parameters`, `stage3_max_reuse_distance` and `stage3_prefetch_bucket_size`); 0: "
        "DeepSpeed's 1e9, which for a 1 B-parameter model can mean the whole model gathered on every worker",
        **between(0),
    )


@dataclass
class TrainConfig:
    name: str = _key("run", "the run's name: its directory under `train.storage_path`")
    storage_path: str = _key(
        "runs", "where runs are stored: a local or NFS directory, or a bucket URI (`s3://`, `gs://`)", path=True
    )
    epochs: int = _key(
        1, "epochs over the shard set (a mixture's epoch ends when its first set runs out)", **between(1)
    )
    max_steps: int = _key(0, "stop after this many optimizer steps; 0: run all epochs", **between(0))
    seed: int = _key(0, "seeds the initial weights, the shard order, the augmentations and the kNN monitor's split")
    num_workers: int | list[int] = _key(
        1,
        "Ray Train workers (data-parallel ranks): a number, or `[min, max]` for an elastic run that starts with "
        "as many as the cluster has room for (at least min), grows when nodes join and shrinks when they go, each "
        "time from its latest checkpoint (see `train.resize_check_s`). A run resumed at another count continues "
        "its epoch, schedules and random streams (see `train.on_resize`); an elastic run's global batch is the "
        "one of max workers (the nearest below that its first workers train in whole micro-batches)",
        **between(1),
        each=between(1),
        length=2,
        ascending=True,
        example="[2, 8]",
    )
    on_resize: str = _key(
        "keep_global_batch",
        "a run resumed on another number of workers: keep_global_batch trains the same images per step "
        "(each worker's share as micro-batches of data.batch_size with gradient accumulation; where it does not "
        "split evenly, the nearest smaller global batch that does); keep_worker_batch keeps each worker's batch, "
        "so the global batch changes and the lr is rescaled to it (linear rule)",
        **one_of("keep_global_batch", "keep_worker_batch"),
    )
    cpus_per_worker: int = _key(1, "logical CPUs each training worker reserves", **between(1))
    gpus_per_worker: float = _key(0.0, "GPUs each training worker reserves; 0: train on the CPU", **between(0.0))
    log_every: int = _key(
        10, "steps between progress lines (metrics.jsonl gets every step) and between Tune reports", **between(1)
    )
    checkpoint_every: int = _key(100, "steps between checkpoints (and one at the end)", **between(1))
    keep_checkpoints: int = _key(2, "newest checkpoints kept in the run's storage", **between(1))
    max_failures: int = _key(
        0, "times Ray Train restarts the worker group over the whole run; -1: no limit", **between(-1)
    )
    resize_check_s: float = _key(
        300.0,
        "an elastic run (`num_workers: [min, max]`): seconds between Ray Train's looks for room for more workers. "
        "A grow then waits for the run's next checkpoint (at most this long) and restarts the workers right after "
        "it, so it retrains at most the steps written after that checkpoint",
        **between(0.0, lo_open=True),
    )
    min_workers_timeout_s: float = _key(
        600.0,
        "an elastic run with room for fewer than its min workers for this long ends with one line (how to "
        "continue it with --resume) instead of waiting for nodes; 0: wait for ever",
        **between(0.0),
    )
    preemption_check_steps: int = _key(
        5,
        "steps between looks for a node drain notice (a spot reclaim that Ray was told of): on one, every worker "
        "writes a checkpoint and trains no further step; the run goes on from it on the nodes left, not counted "
        "against train.max_failures",
        **between(1),
    )
    checkpoint_upload: str = _key(
        "auto",
        "how a checkpoint reaches the run's storage: async (training goes on while it uploads, the next checkpoint "
        "waits for it), sync (each worker waits for its upload), auto: async for a bucket URI, sync for a local path",
        **one_of("auto", "async", "sync"),
    )
    worker_resources: dict[str, float] = _key(
        {}, "custom Ray resources each training worker requests besides CPU/GPU, e.g. `{gpu_node: 1}`", **between(0.0)
    )
    driver_resources: dict[str, float] = _key(
        {},
        "custom Ray resources the driver side of a run requests: each `raysl tune` trial (it drives its Train run, "
        "whose controller Ray puts on the same node) and its report queue. Name a resource only on-demand nodes "
        "advertise (the shipped cluster configs' head advertises `on_demand`), so a spot reclaim never takes a "
        "run's driver; one no node advertises is left out (a laptop)",
        **between(0.0),
    )
    placement_strategy: str = _key(
        "PACK",
        "how workers are placed on nodes (Ray placement groups): PACK fills nodes first; SPREAD puts them on as "
        "many nodes as it can, so a lost node takes fewer workers with it",
        **one_of("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    )

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)


@dataclass
class EvalConfig:
    """The online kNN monitor (raysl.eval.monitor): weighted cosine kNN on a small labeled
    shard set every `knn_every` steps, into metrics.jsonl as knn_top1_k20, knn_top5_k200, ...;
    and the held-out SSL loss (val_loss)."""

    knn_shards: str = _key("", "a labeled shard set for the online kNN monitor; empty: no monitor", path=True)
    knn_val_shards: str = _key("", "the monitor's query set; empty: a seeded split of `eval.knn_shards`", path=True)
    knn_val_fraction: float = _key(
        0.2,
        "fraction of `eval.knn_shards` held out as queries (without knn_val_shards)",
        **between(0.0, 0.9, lo_open=True),
    )
    knn_every: int = _key(100, "steps between kNN evaluations (and one at the last step)", **between(1))
    knn_k: list[int] = _key([20, 200], "neighbour counts, each logged as `knn_top1_k<k>`", each=between(1))
    knn_temperature: float = _key(
        0.07, "temperature of the weighted vote (DINO's protocol)", **between(0.0, lo_open=True)
    )
    knn_batch_size: int = _key(256, "images per feature-extraction batch", **between(1))
    val_shards: str = _key(
        "",
        "a shard set for the held-out SSL loss (`val_loss` in metrics.jsonl; a Tune metric); empty: off",
        path=True,
    )
    val_every: int = _key(100, "steps between val_loss evaluations", **between(1))
    val_batches: int = _key(2, "batches of views the val_loss is averaged over", **between(1))


@dataclass
class Config:
    data: DataConfig = field(
        default_factory=DataConfig, metadata={"help": "the shard sets, the views and how they are read"}
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the backbone"})
    method: MethodConfig = field(
        default_factory=lambda: method_config("simclr"),
        metadata={"help": "the SSL method (`method.name`) and its own keys (methods.md)"},
    )
    optim: OptimConfig = field(
        default_factory=OptimConfig, metadata={"help": "the optimizer and its schedules (warmup + cosine)"}
    )
    deepspeed: DeepSpeedConfig = field(
        default_factory=DeepSpeedConfig, metadata={"help": "the DeepSpeed engine: ZeRO, precision, offload"}
    )
    train: TrainConfig = field(
        default_factory=TrainConfig, metadata={"help": "the run: its storage, length, workers and checkpoints"}
    )
    eval: EvalConfig = field(
        default_factory=EvalConfig, metadata={"help": "what watches the run: the online kNN monitor, val_loss"}
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_value(key: str, f: dataclasses.Field, value):
    if isinstance(f.type, types.UnionType):  # data.shards: one value or a list of them
        arms = typing.get_args(f.type)
        item = dataclasses.field(metadata=f.metadata)
        item.type = next(a for a in arms if (typing.get_origin(a) is list) == isinstance(value, list))
        return check_value(key, item, value)
    if typing.get_origin(f.type) is list:  # a list of scalars, each checked like a scalar key
        meta, example = f.metadata, f.metadata.get("example", "[20, 200]")
        if isinstance(value, list) and not value and meta.get("empty_ok"):
            return value
        length = meta.get("length")
        if not isinstance(value, list) or not value or (length and len(value) != length):
            what = f"a list of {length} numbers" if length else "a non-empty list"
            raise UserError(f"config key {key}: expected {what}, e.g. {example}, got {value!r}")
        item = dataclasses.field(metadata=meta.get("each", {}))
        item.type = typing.get_args(f.type)[0]
        checked = [check_value(key, item, v) for v in value]
        if meta.get("ascending") and checked != sorted(checked):
            raise UserError(f"config key {key}: {value!r} must be [lo, hi] with lo <= hi, e.g. {example}")
        return checked
    if typing.get_origin(f.type) is dict:  # custom Ray resources: name -> amount
        if not isinstance(value, dict):
            raise UserError(
                f"config key {key}: expected a mapping of resource name to amount, e.g. {{data_node: 1}}, got {value!r}"
            )
        item = dataclasses.field(metadata=f.metadata)
        item.type = typing.get_args(f.type)[1]
        for name in value:
            if not isinstance(name, str) or not name or name in ("CPU", "GPU", "memory"):
                raise UserError(
                    f"config key {key}: {name!r} is not a custom resource name (CPU/GPU have their own keys)"
                )
        return {name: check_value(f"{key}.{name}", item, v) for name, v in value.items()}
    typ = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # 1E3 or 1e3 for an integer key
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"config key {key}: expected {_TYPE_NAMES[typ]}, got {value!r}")
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(f"config key {key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        raise UserError(
            f"config key {key}: {value!r} is out of range (must be {'>' if meta.get('lo_open') else '>='} {lo})"
        )
    if hi is not None and value > hi:
        raise UserError(f"config key {key}: {value!r} is out of range (must be <= {hi})")
    return value


def section_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def method_config(name: str) -> MethodConfig:
    """The defaults of method `name`'s own keys (its `config_class`)."""
    from raysl.methods.base import method_class

    return method_class(name).config_class(name=name)


def _unknown_method_key(name: str, key: str, fields) -> UserError:
    from raysl.methods.base import discover

    owners = sorted(m for m, cls in discover().items() if key in section_fields(cls.config_class))
    hint = f" (a key of {', '.join(owners)})" if owners else ""
    return UserError(f"config key method.{key}: method {name} has no such key{hint}; {name} has {', '.join(fields)}")


def from_dict(raw: dict, origin: str = "config") -> Config:
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: expected a mapping of sections ({', '.join(section_fields(Config))})")
    sections = section_fields(Config)
    kwargs = {}
    for name, values in raw.items():
        if name not in sections:
            raise UserError(f"{origin}: unknown section {name!r}; sections are {', '.join(sections)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section {name} must be a mapping of keys")
        cls = typing.get_type_hints(Config)[name]
        if name == "method":  # each method has its own keys
            method = values.get("name", "simclr")
            if not isinstance(method, str):
                raise UserError(f"config key method.name: expected a method name, got {method!r}")
            from raysl.methods.base import method_class

            cls = method_class(method).config_class
        fields = section_fields(cls)
        checked = {}
        for key, value in values.items():
            if key not in fields:
                if name == "method":
                    raise _unknown_method_key(values.get("name", "simclr"), key, fields)
                raise UserError(f"config key {name}.{key} is unknown; {name} has {', '.join(fields)}")
            fields[key].type = typing.get_type_hints(cls)[key]
            checked[key] = check_value(f"{name}.{key}", fields[key], value)
        kwargs[name] = cls(**checked)
    cfg = Config(**kwargs)
    for name in sections:  # validate defaults too
        section = getattr(cfg, name)
        fields, hints = section_fields(type(section)), typing.get_type_hints(type(section))
        for key, f in fields.items():
            f.type = hints[key]
            check_value(f"{name}.{key}", f, getattr(section, key))
    return cfg


def recipe_path(recipe: str) -> str:
    """A path to a YAML file, or the name of a recipe shipped in raysl/recipes."""
    if os.path.exists(recipe):
        return resolve_path(recipe)
    shipped = resources.files("raysl") / "recipes" / f"{recipe.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return str(shipped)
    names = sorted(
        p.name.removesuffix(".yaml")
        for p in (resources.files("raysl") / "recipes").iterdir()
        if p.name.endswith(".yaml")
    )
    raise UserError(f"recipe {recipe!r}: no such file, and not a shipped recipe ({', '.join(names)})")


def parse_override(text: str) -> tuple[str, str, object]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"override {text!r}: expected section.key=value, e.g. optim.lr=0.001")
    key, value = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    return section, name, load_yaml(value) if value.strip() else ""


def _keys_of_method(recipe_keys: dict, name) -> dict:
    """A recipe's method section when an override switches the method to `name`: the keys
    the new method has too (e.g. proj_dim) stay, those only the recipe's method reads (e.g.
    a SimCLR recipe's temperature under method.name=byol) are left behind."""
    from raysl.methods.base import discover

    cls = discover().get(name) if isinstance(name, str) else None
    if cls is None:
        return recipe_keys  # from_dict names the unknown method
    return {k: v for k, v in recipe_keys.items() if k in section_fields(cls.config_class)}


def load_config(recipe: str, overrides: Sequence[str] = ()) -> Config:
    path = recipe_path(recipe)
    try:
        with open(path) as f:
            raw = load_yaml(f) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections")
    parsed = [parse_override(text) for text in overrides]
    renamed = [v for section, key, v in parsed if (section, key) == ("method", "name")]
    if renamed and isinstance(raw.get("method"), dict):
        raw["method"] = _keys_of_method(raw["method"], renamed[-1])
    for section, key, value in parsed:
        if not isinstance(raw.get(section, {}), dict):
            raise UserError(f"{path}: section {section} must be a mapping")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    return resolve_paths(from_dict(raw, origin=path))


def resolve_paths(cfg: Config) -> Config:
    """The config with every path key (data.shards, eval.*_shards, train.storage_path)
    absolute against the working directory (`resolve_path`)."""
    for name in section_fields(Config):
        section = getattr(cfg, name)
        for key, f in section_fields(type(section)).items():
            if f.metadata.get("path"):
                value = getattr(section, key)
                setattr(
                    section, key, [resolve_path(v) for v in value] if isinstance(value, list) else resolve_path(value)
                )
    return cfg
