"""Per-step schedules (lr, weight decay, and each method's own: EMA momentum, teacher temperature) as numpy arrays.

Arrays are precomputed from the config with one value per optimizer step; a resumed run
rebuilds them from the same config, so only the step needs checkpointing.
Convention for ramps: the value starts at the ramp's start at step 0 and reaches its target
exactly at step `warmup_steps` (resp. `ramp_steps`); a cosine ends exactly at `final` on the
last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from raysl.errors import UserError


def _check_steps(total_steps: int, ramp: int, ramp_name: str) -> None:
    if int(total_steps) != total_steps or total_steps <= 0:
        raise UserError(f"total_steps must be a positive integer, got {total_steps}")
    if int(ramp) != ramp or ramp < 0 or ramp >= total_steps:
        raise UserError(f"{ramp_name} must be an integer in [0, total_steps={total_steps}), got {ramp}")


def _check_nonneg(**values: float) -> None:
    for k, v in values.items():
        if not math.isfinite(v) or v < 0:
            raise UserError(f"{k} must be a finite number >= 0, got {v}")


def cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warmup warmup_start -> base over `warmup_steps`, then half-cosine base -> final;
    len == total_steps, [warmup_steps] == base, [-1] == final."""
    _check_steps(total_steps, warmup_steps, "warmup_steps")
    _check_nonneg(base=base, final=final, warmup_start=warmup_start)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    n = total_steps - warmup_steps
    t = np.linspace(0.0, math.pi, n) if n > 1 else np.zeros(1)
    cos = final + 0.5 * (base - final) * (1.0 + np.cos(t))
    return np.concatenate([warm, cos]).astype(np.float64)


def linear_then_constant(start: float, end: float, ramp_steps: int, total_steps: int) -> np.ndarray:
    """Linear start -> end over `ramp_steps`, then end (e.g. DINO teacher temperature warmup)."""
    _check_steps(total_steps, ramp_steps, "ramp_steps")
    _check_nonneg(start=start, end=end)
    ramp = np.linspace(start, end, ramp_steps, endpoint=False)
    return np.concatenate([ramp, np.full(total_steps - ramp_steps, float(end))]).astype(np.float64)


@dataclass
class Schedules:
    """Named per-step arrays: lr and weight_decay for the optimizer, plus what the method
    declares (`Method.schedules`: EMA momentum, DINO's teacher temperature, ...)."""

    lr: np.ndarray
    weight_decay: np.ndarray
    method: dict[str, np.ndarray] = field(default_factory=dict)

    def at(self, step: int) -> dict[str, float]:
        """Values for optimizer step `step` (0-based); steps past the end keep the last values."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        i = min(int(step), len(self.lr) - 1)
        values = {"lr": float(self.lr[i]), "weight_decay": float(self.weight_decay[i])}
        return {**values, **{k: float(v[min(int(step), len(v) - 1)]) for k, v in self.method.items()}}

    @classmethod
    def build(
        cls,
        *,
        total_steps: int,
        warmup_steps: int,
        lr: float,
        min_lr: float,
        weight_decay: float,
        weight_decay_end: float,
        method: dict[str, np.ndarray] | None = None,
    ) -> Schedules:
        """lr: linear warmup, then cosine to min_lr; weight decay: cosine to weight_decay_end;
        `method`: the method's own arrays, each of length total_steps."""
        _check_nonneg(lr=lr, min_lr=min_lr, weight_decay=weight_decay, weight_decay_end=weight_decay_end)
        for k, v in (method or {}).items():
            if len(v) != total_steps:
                raise ValueError(f"schedule {k} has {len(v)} steps, not {total_steps}")
        return cls(
            lr=cosine(lr, min_lr, total_steps, warmup_steps),
            weight_decay=cosine(weight_decay, weight_decay_end, total_steps),
            method=dict(method or {}),
        )


def apply(optimizer, values: dict[str, float]) -> None:
    """Set lr on every param group (times its optional `lr_scale`) and
    weight_decay = group["wd_scale"] * values["weight_decay"] (wd_scale defaults to 1.0)."""
    for group in optimizer.param_groups:
        if "lr" in values:
            group["lr"] = group.get("lr_scale", 1.0) * values["lr"]
        if "weight_decay" in values:
            group["weight_decay"] = group.get("wd_scale", 1.0) * values["weight_decay"]


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: base_lr * global_batch / reference_batch."""
    _check_nonneg(base_lr=base_lr)
    if global_batch <= 0:
        raise UserError(f"global_batch must be > 0, got {global_batch}")
    if reference_batch <= 0:
        raise UserError(f"reference_batch must be > 0, got {reference_batch}")
    return base_lr * global_batch / reference_batch
