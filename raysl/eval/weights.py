"""A finished (or running) pretraining run, read back: its recipe, its latest checkpoint
and its trained backbone. Only YAML, JSON and safetensors are read; nothing is unpickled.

The run may be a local (or NFS) directory or a bucket URI. From a bucket only what is needed
is read: config.yaml, each checkpoint's rank-0 state and listing (to find the latest
complete one) and that checkpoint's weights.safetensors, copied into a temporary folder that
is removed after loading; never the optimizer and engine files, never other ranks' files."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from raysl.config import Config, from_dict, load_yaml
from raysl.errors import UserError
from raysl.train import checkpoint, storage

CONFIG = "config.yaml"


def _join(run_dir: str, name: str) -> str:
    return f"{run_dir.rstrip('/')}/{name}" if storage.is_uri(run_dir) else os.path.join(run_dir, name)


def run_config(run_dir: str) -> Config:
    """The recipe the run was started with (`config.yaml` in the run dir)."""
    path = _join(run_dir, CONFIG)
    if not storage.exists(path):
        raise UserError(
            f"--ckpt {run_dir}: no config.yaml there; point it at a run directory written by raysl pretrain"
        )
    return from_dict(load_yaml(io.StringIO(storage.read_text(path))) or {}, origin=path)


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, directory) of the run's complete checkpoints, oldest first."""
    found = []
    for name, complete in storage.checkpoint_dirs(run_dir, only=(checkpoint.WEIGHTS,)):
        if complete:
            d = _join(run_dir, name)
            found.append((storage.checkpoint_step(d), d))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> tuple[int, str]:
    found = checkpoints(run_dir)
    if not found:
        raise UserError(f"--ckpt {run_dir}: no complete checkpoint (checkpoint_*/{checkpoint.WEIGHTS}) in that run")
    return found[-1]


def method_state(run_dir: str) -> tuple[Config, int, dict[str, torch.Tensor]]:
    """(recipe, step, the whole method's fp32 state dict) of the run's latest checkpoint."""
    from safetensors.torch import load_file

    cfg = run_config(run_dir)
    step, directory = latest_checkpoint(run_dir)
    with local_files(directory, (checkpoint.WEIGHTS,)) as local:
        return cfg, step, load_file(os.path.join(local, checkpoint.WEIGHTS))


@contextmanager
def local_files(directory: str, names: tuple[str, ...]) -> Iterator[str]:
    """`directory` itself when it is local; for a URI a temporary folder holding just the
    files `names` matches (storage.fetch patterns), removed on exit."""
    if not storage.is_uri(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="raysl_fetch_") as local:
        storage.fetch(directory, local, names)
        yield local


@contextmanager
def local_run(run_dir: str, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """The run as a local directory: itself, or for a URI a temporary copy (removed on exit) of
    config.yaml, the latest complete checkpoint's weights and rank-0 state, and the files
    `extra` matches (e.g. "metrics.jsonl", "eval_*.json")."""
    if not storage.is_uri(run_dir):
        yield run_dir
        return
    run_config(run_dir)  # a clear error for a URI that is not a run
    _, directory = latest_checkpoint(run_dir)
    name = directory.rstrip("/").rsplit("/", 1)[1]
    with local_files(run_dir, (CONFIG, f"{name}/{checkpoint.WEIGHTS}", f"{name}/{checkpoint.RUN_STATE}", *extra)) as d:
        try:
            yield d
        except UserError as exc:  # an error about the copy names the run the user gave
            raise UserError(str(exc).replace(d, run_dir.rstrip("/"))) from exc


def backbone_state(state: dict[str, torch.Tensor], module: str = "backbone") -> dict[str, torch.Tensor]:
    """The evaluated backbone's entries of a method state dict (`Method.backbone_module`,
    whose prefix is dropped)."""
    prefix = f"{module}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def initial_backbone(cfg: Config) -> torch.nn.Module:
    """The backbone exactly as the training run starts it (same seed, same construction):
    the random-init baseline of an evaluation."""
    from raysl.methods.base import build_method

    torch.manual_seed(cfg.train.seed)
    return build_method(cfg).evaluated_backbone()


def load_backbone(
    run_dir: str,
    *,
    expect_backbone: str | None = None,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    random_init: bool = False,
) -> tuple[torch.nn.Module, Config, int]:
    """(trained backbone with no classifier, the run's recipe, its step). With
    `expect_backbone`, a run of another architecture is refused with a clear error; a
    state that does not fit the backbone the recipe names is refused too. `random_init`:
    the same backbone with the weights the run started from (`initial_backbone`)."""
    from raysl.methods.base import method_class
    from raysl.models.backbone import create_backbone

    cfg, step, state = method_state(run_dir)
    module = method_class(cfg.method.name).backbone_module
    if random_init:
        state = {f"{module}.{k}": v for k, v in initial_backbone(cfg).state_dict().items()}
    name = cfg.model.backbone
    if expect_backbone and expect_backbone != name:
        raise UserError(
            f"--ckpt {run_dir}: that run trained {name!r}, not {expect_backbone!r}; "
            f"use a run of {expect_backbone!r} or ask for {name!r}"
        )
    backbone = create_backbone(
        name,
        drop_path_rate=drop_path_rate,
        img_size=img_size or cfg.data.image_size or None,
        global_pool=cfg.model.global_pool,
    )
    weights = backbone_state(state, module)
    if not weights:
        raise UserError(f"--ckpt {run_dir}: its checkpoint holds no {module}.* weights")
    if any(k.startswith("pos_embed") for k in weights) and hasattr(backbone, "pos_embed"):
        weights = _resize_pos_embed(weights, backbone)
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k, v in weights.items() if k in expected and expected[k].shape != v.shape]
    if missing or unexpected or wrong:  # checked first: load_state_dict raises a bare RuntimeError on shapes
        raise UserError(
            f"--ckpt {run_dir}: the weights do not fit a {name!r} backbone "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); was config.yaml edited?"
        )
    backbone.load_state_dict(weights)
    return backbone, cfg, step


def _resize_pos_embed(weights: dict, backbone) -> dict:
    """A ViT trained at one image size, evaluated at another: resample its position grid."""
    from timm.layers import resample_abs_pos_embed

    pe = weights["pos_embed"]
    target = backbone.pos_embed
    if pe.shape == target.shape:
        return weights
    prefix = 0 if getattr(backbone, "no_embed_class", False) else getattr(backbone, "num_prefix_tokens", 1)
    grid = backbone.patch_embed.grid_size
    return {**weights, "pos_embed": resample_abs_pos_embed(pe, new_size=list(grid), num_prefix_tokens=prefix)}
