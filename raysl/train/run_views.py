"""The views a run streams: the views preset a method asks for, with the recipe's crop
overrides (data.*), checked against the crops the method declares it can use."""

from __future__ import annotations

import dataclasses
from typing import Any

from raysl.config import Config
from raysl.data.view_plans import PRESETS, ViewSpec, view_spec
from raysl.errors import UserError


def spec_for(cfg: Config, method_cls) -> ViewSpec:
    """The views a run streams: the preset (data.views, else the method's default) with the
    data.* crop overrides, checked against what the method can use, with the patch masks
    the method asks for (`Method.mask_spec`). Every problem is a UserError naming the
    config key."""
    spec = _checked_views(cfg, method_cls)
    if spec.eval_resize and cfg.data.augment_on == "worker":
        raise UserError(
            f"config key data.augment_on: 'worker' makes training views, not the eval view "
            f"(data.views={spec.name}); use data.augment_on=tasks"
        )
    masks = method_cls.mask_spec(cfg, spec)
    if masks is not None:
        spec = dataclasses.replace(spec, masks=masks)
        if cfg.data.augment_on == "worker":
            raise UserError(
                f"config key data.augment_on: 'worker' makes views without patch masks, and "
                f"{cfg.method.name} trains on masks drawn with its views; use data.augment_on=tasks"
            )
    return spec


def _checked_views(cfg: Config, method_cls) -> ViewSpec:
    d = cfg.data
    name = d.views or method_cls.default_views
    if name not in PRESETS:
        raise UserError(f"config key data.views: {name!r} is not a views preset; choose one of: {', '.join(PRESETS)}")
    for key in ("image_size", "local_size"):
        if 0 < getattr(d, key) < 8:
            raise UserError(
                f"config key data.{key}: {getattr(d, key)} is too small (0 for the preset's size, else >= 8)"
            )
    if d.global_crops == 0:
        raise UserError(
            "config key data.global_crops: 0 leaves no global crop; every method needs at least one (-1: the preset's)"
        )
    kwargs: dict[str, Any] = {}
    if d.image_size:
        kwargs["global_size"] = d.image_size
    if d.global_crops >= 0:
        kwargs["global_crops"] = d.global_crops
    if d.global_scale:
        kwargs["global_scale"] = tuple(d.global_scale)
    if d.local_crops >= 0:
        kwargs["local_crops"] = d.local_crops
    if d.local_size:
        kwargs["local_size"] = d.local_size
    if d.local_scale:
        kwargs["local_scale"] = tuple(d.local_scale)
    spec = view_spec(name, **kwargs)

    n_global = spec.n_global
    n_local = spec.n_views - n_global
    method = method_cls.name
    least, most = method_cls.global_crops
    if n_global < least or (most is not None and n_global > most):
        words = f"exactly {least}" if least == most else f"at least {least}" if most is None else f"{least} to {most}"
        key = "data.global_crops" if d.global_crops >= 0 else "data.views"
        raise UserError(
            f"config key {key}: method {method} needs {words} global crop(s); "
            f"views {name!r} with these settings give {n_global}"
        )
    local_keys: tuple[tuple[str, Any, Any], ...] = (
        ("local_crops", d.local_crops, -1),
        ("local_size", d.local_size, 0),
        ("local_scale", d.local_scale, []),
    )
    if not method_cls.uses_local_crops:
        for key, value, default in local_keys:
            if value != default and (key != "local_crops" or value > 0):
                raise UserError(
                    f"config key data.{key}: method {method} uses only its global crop(s), "
                    f"so local crops would be decoded and never used; leave data.{key} unset"
                )
        return spec
    if not n_local:
        for key, value, default in local_keys[1:]:
            if value != default:
                raise UserError(
                    f"config key data.{key}: the views have no local crops to apply it to "
                    "(set data.local_crops >= 1, or leave it unset)"
                )
    if spec.n_views < method_cls.min_crops:
        raise UserError(
            f"config key data.local_crops: method {method} needs at least {method_cls.min_crops} crops; "
            f"with {n_global} global crop(s) it needs local crops (data.local_crops >= 1)"
        )
    global_size, crops = spec.crops[0].size, spec.per_view()
    if method_cls.local_smaller and n_local and crops[n_global].size == global_size:
        key = "data.local_size" if d.local_size else "data.image_size"
        raise UserError(
            f"config key {key}: {method} tells global from local crops by their size, so local crops "
            f"must not be {global_size} px like the global ones"
        )
    return spec


def data_task_warmup(cfg: Config) -> dict | None:
    """Arguments of `raysl.runtime.warm_workers` for a training worker's view pipeline:
    processes that have imported what its read and augment tasks run. As many as the
    worker's CPUs less the one its own imports keep busy meanwhile (more take CPU from
    them and delay the whole start), at most as many as its tasks run at once. None with
    one CPU, or when the tasks go to other nodes (data.task_cpus or data.task_resources),
    where processes started beside the worker would not serve them."""
    d = cfg.data
    if d.task_cpus or d.task_resources:
        return None
    tasks = d.augment_tasks or cfg.train.cpus_per_worker
    count = min(2 * tasks, cfg.train.cpus_per_worker - 1)
    views = "raysl.data.decode" if d.augment_on == "worker" else "raysl.data.views"
    return {"count": count, "modules": ["raysl.data.reader", views]} if count > 0 else None
