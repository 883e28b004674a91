"""Typed run configuration: a YAML recipe plus `section.key=value` overrides.

Every value is checked here, before any Ray work starts: an unknown key, a wrong type
or an out-of-range value is one UserError naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import yaml

from raysl.checks import between, one_of
from raysl.errors import UserError
from raysl.methods.keys import MethodConfig


def resolve_path(path: str) -> str:
    """A path the user gave, made absolute against their working directory before it goes to
    Ray (whose workers run elsewhere); URIs ("scheme://...") and "" (off) are left as they are."""
    return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))


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
    # a shard directory or URI (raysl shards build), or a list of them read as a mixture in
    # the proportions `weights` (one per set, >= 0, not all 0; raysl.data.mixture)
    shards: str | list[str] = field(
        default="",
        metadata={"help": "shard directory or URI (raysl shards build)", "path": True, "example": "[a/, b/]"},
    )
    weights: list[float] = field(
        default_factory=list, metadata={"each": between(0.0), "empty_ok": True, "example": "[0.3, 0.7]"}
    )
    views: str = ""  # a views preset; empty: the method's own (its default_views)
    image_size: int = field(default=0, metadata=between(0))  # 0: the preset's size
    # Crop overrides of the views preset; the defaults (-1, 0, []) keep the preset's own.
    # Global crops are the preset's largest (image_size sets their size); local crops the
    # smaller multi-crop ones (DINO, SwAV). For single-crop presets (mae, mae_medical)
    # global_scale is the crop-scale range.
    global_crops: int = field(default=-1, metadata=between(-1))  # -1: the preset's count
    global_scale: list[float] = field(default_factory=list, metadata=_scale_pair())  # [lo, hi]; []: the preset's
    local_crops: int = field(default=-1, metadata=between(-1))  # -1: the preset's count
    local_size: int = field(default=0, metadata=between(0))  # 0: the preset's size (96)
    local_scale: list[float] = field(default_factory=list, metadata=_scale_pair())  # [lo, hi]; []: the preset's
    batch_size: int = field(default=64, metadata=between(1))  # per worker, per micro-step
    shuffle_window: int = field(default=2, metadata=between(1))  # shards mixed per shuffle window
    augment_tasks: int = field(
        default=0, metadata=between(0)
    )  # parallel read/augment tasks per worker; 0: train.cpus_per_worker
    # Logical CPUs each read/augment task reserves. 0 shares the training workers' cores
    # (right on one machine, where the workers hold every CPU); 1 on a cluster with
    # CPU-only data nodes places the tasks there.
    task_cpus: float = field(default=0.0, metadata=between(0.0))
    # Custom Ray resources each read/augment task requests, e.g. {data_node: 0.01} to put
    # decoding and augmentation on the CPU-only nodes that advertise `data_node`.
    task_resources: dict[str, float] = field(default_factory=dict, metadata=between(0.0))
    # Where the views are made. tasks: the read/augment tasks make uint8 views (PIL/OpenCV, one
    # image at a time). worker: the tasks only decode; the training worker makes the views
    # from the decoded pixels on its own device, batched (raysl.data.gpu_views: a GPU's, or
    # the worker's CPU threads between its steps). Not for methods that draw patch masks.
    augment_on: str = field(default="tasks", metadata=one_of("tasks", "worker"))


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name; never downloaded
    drop_path_rate: float = field(default=0.0, metadata=between(0.0, 1.0))
    # pooled feature of the backbone (timm's global_pool); "": the model's default (CLS
    # token for ViTs). MAE recipes use "avg": MAE trains patch tokens, not the CLS token.
    global_pool: str = field(default="", metadata=one_of("", "avg", "token", "max", "avgmax"))
    compile: bool = False  # compile the backbone in place (nn.Module.compile): state-dict keys unchanged
    # torch.compile backend with model.compile=true. inductor generates fused kernels (on the
    # CPU it needs a C++ compiler and minutes of compiling); aot_eager traces forward and
    # backward graphs without generating code; eager only captures graphs (debugging).
    compile_backend: str = field(default="inductor", metadata=one_of("inductor", "aot_eager", "eager"))
    # Activation (gradient) checkpointing: timm's set_grad_checkpointing, so the backbone's
    # blocks keep only their inputs and recompute the rest in backward (less activation
    # memory for about one more forward). A timm model without it is a config error.
    grad_checkpointing: bool = False


@dataclass
class OptimConfig:
    name: str = field(
        default="adamw",
        metadata=one_of("adamw", "sgd", "lars", "lamb", "adamw8bit", "lion8bit", "paged_adamw8bit", "paged_lion8bit"),
    )
    lr: float = field(default=1e-3, metadata=between(0.0, lo_open=True))  # per 256 images (linear scaling)
    min_lr: float = field(default=1e-6, metadata=between(0.0))
    warmup_steps: int = field(default=0, metadata=between(0))
    weight_decay: float = field(default=0.05, metadata=between(0.0))
    weight_decay_end: float = field(default=-1.0)  # < 0: same as weight_decay
    momentum: float = field(default=0.9, metadata=between(0.0, 1.0))
    beta1: float = field(default=0.9, metadata=between(0.0, 1.0))
    beta2: float = field(default=0.999, metadata=between(0.0, 1.0))
    clip_grad: float = field(default=0.0, metadata=between(0.0))  # 0: no clipping


@dataclass
class DeepSpeedConfig:
    zero_stage: int = field(default=0, metadata=one_of(0, 1, 2, 3))
    precision: str = field(default="fp32", metadata=one_of("fp32", "bf16", "fp16"))
    grad_accum: int = field(default=1, metadata=between(1))
    # ZeRO-Offload / ZeRO-Infinity: where the optimizer state (ZeRO stage >= 1) and the
    # parameters (ZeRO-3 only) live: "none" (on the device), "cpu" (pinned host memory), or
    # "nvme" (files under deepspeed.nvme_path). Offloading the optimizer needs DeepSpeed's
    # own CPU Adam (optim.name=adamw runs as DeepSpeedCPUAdam, a C++ op built on first use);
    # bitsandbytes' 8-bit optimizers cannot be offloaded.
    offload_optimizer: str = field(default="none", metadata=one_of("none", "cpu", "nvme"))
    offload_param: str = field(default="none", metadata=one_of("none", "cpu", "nvme"))
    nvme_path: str = field(default="", metadata={"path": True})  # a local NVMe directory, for "nvme" offload
    # Gradient buckets (elements) ZeRO reduces at once; 0: DeepSpeed's default (5e8). On a
    # memory-tight host a bucket of 5e8 bf16 elements is 1 GB per worker; 5e7 is 100 MB.
    reduce_bucket_size: int = field(default=0, metadata=between(0))
    # dtype of ZeRO's gradient partitions (DeepSpeed's data_types.grad_accum_dtype); "": its
    # default (fp32 for bf16 training). bf16 halves them (less exact accumulation).
    grad_accum_dtype: str = field(default="", metadata=one_of("", "fp32", "bf16"))
    # ZeRO-3 steps the optimizer on sub-groups of this many elements of each worker's
    # partition; 0: DeepSpeed's default (1e9, one group). bitsandbytes' 8-bit optimizers
    # on the CPU dequantise a whole group's state to fp32 while they step, so a smaller
    # group (5e7) bounds that transient (ViT-g proof in the README).
    sub_group_size: int = field(default=0, metadata=between(0))
    # ZeRO-3 keeps gathered parameters alive (and prefetches) up to this many elements
    # (its stage3_max_live_parameters, stage3_max_reuse_distance and
    # stage3_prefetch_bucket_size); 0: DeepSpeed's 1e9, which for a 1 B-parameter model
    # can mean the whole model gathered on every worker.
    max_live_parameters: int = field(default=0, metadata=between(0))


@dataclass
class TrainConfig:
    name: str = "run"
    storage_path: str = field(default="runs", metadata={"path": True})  # local dir, NFS path or bucket URI
    epochs: int = field(default=1, metadata=between(1))
    max_steps: int = field(default=0, metadata=between(0))  # 0: run all epochs
    seed: int = 0
    num_workers: int = field(default=1, metadata=between(1))
    cpus_per_worker: int = field(default=1, metadata=between(1))
    gpus_per_worker: float = field(default=0.0, metadata=between(0.0))
    log_every: int = field(default=10, metadata=between(1))
    checkpoint_every: int = field(default=100, metadata=between(1))
    keep_checkpoints: int = field(default=2, metadata=between(1))
    max_failures: int = field(default=0, metadata=between(-1))  # Ray Train restarts; -1: unlimited
    # Custom Ray resources each training worker requests, e.g. {gpu_node: 1} (besides CPU/GPU).
    worker_resources: dict[str, float] = field(default_factory=dict, metadata=between(0.0))
    # How workers are placed on nodes (Ray placement groups): PACK fills nodes first; SPREAD
    # puts them on as many nodes as it can (a lost node then takes fewer workers with it).
    placement_strategy: str = field(default="PACK", metadata=one_of("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


@dataclass
class EvalConfig:
    """The online kNN monitor (raysl.eval.monitor): weighted cosine kNN on a small labeled
    shard set every `knn_every` steps, into metrics.jsonl as knn_top1_k20, knn_top5_k200, ..."""

    knn_shards: str = field(default="", metadata={"path": True})  # labeled shard set; empty: no monitor
    knn_val_shards: str = field(
        default="", metadata={"path": True}
    )  # its query set; empty: a seeded split of knn_shards
    knn_val_fraction: float = field(default=0.2, metadata=between(0.0, 0.9, lo_open=True))
    knn_every: int = field(default=100, metadata=between(1))  # steps (and at the last step)
    knn_k: list[int] = field(default_factory=lambda: [20, 200], metadata={"each": between(1)})
    knn_temperature: float = field(default=0.07, metadata=between(0.0, lo_open=True))
    knn_batch_size: int = field(default=256, metadata=between(1))
    # Held-out SSL loss (`val_loss` in metrics.jsonl; a Tune metric): the method's own loss
    # on `val_batches` batches of views of this shard set, every `val_every` steps.
    val_shards: str = field(default="", metadata={"path": True})  # empty: off
    val_every: int = field(default=100, metadata=between(1))
    val_batches: int = field(default=2, metadata=between(1))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=lambda: method_config("simclr"))  # the method's own keys
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

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
