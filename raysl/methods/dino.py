"""DINO (Caron et al. 2021): self-distillation with an EMA teacher, centering and
sharpening, multi-crop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raysl.checks import between
from raysl.methods.base import Method, register
from raysl.methods.common import (
    dino_head,
    embedding_std,
    make_backbone,
    multicrop,
    step_of,
    teacher_entropies,
    teacher_temp_schedule,
)
from raysl.methods.keys import EMAKeys, MethodConfig, ProjectorKeys, key
from raysl.methods.losses import dino_center_update, dino_loss
from raysl.methods.teacher import add_teacher


@dataclass
class DINOConfig(EMAKeys, ProjectorKeys, MethodConfig):
    num_prototypes: int = key(3000, "output size K of the DINO head (paper: 65536)", **between(1))
    student_temp: float = key(0.1, "student softmax temperature", **between(0.0, lo_open=True))
    teacher_temp: float = key(0.04, "teacher softmax temperature after its warmup", **between(0.0, lo_open=True))
    teacher_temp_warmup: float = key(0.04, "teacher temperature at step 0", **between(0.0, lo_open=True))
    teacher_temp_warmup_steps: int = key(0, "steps of the linear teacher temperature warmup", **between(0))
    center_momentum: float = key(0.9, "momentum of the teacher's running center", **between(0.0, 1.0))
    norm_last_layer: bool = key(True, "weight-normed last layer with its norm fixed to 1")
    freeze_last_layer_steps: int = key(0, "steps during which the last layer gets zero gradients", **between(0))


@register("dino")
class DINO(Method):
    """DINO: student = backbone + DINO head (MLP `proj_layers` (default 3) x
    `proj_hidden_dim` -> bottleneck `proj_dim` -> L2 norm -> weight-normed last layer to
    `num_prototypes`, norm fixed when `norm_last_layer`); teacher = EMA of both (momentum
    from the `ema_momentum` schedule, 0.996 -> 1), run on the global crops only (the
    leading views at the largest resolution); student on all crops. Teacher outputs are
    centred (`center_momentum`) and sharpened with the `teacher_temp` schedule value of
    the step (warmup `teacher_temp_warmup` -> `teacher_temp`); student at `student_temp`.
    The last layer gets zero gradients for the first `freeze_last_layer_steps` steps.

    Metrics besides the loss: "embedding_std" (student bottleneck, dim `proj_dim`),
    "teacher_entropy" (mean entropy of the teacher's softmax per image / log K; -> 1 means
    uniform collapse) and "teacher_mean_entropy" (entropy of the batch-mean teacher
    softmax / log K; -> 0 means one prototype for every image)."""

    config_class = DINOConfig
    default_views = "dino"
    bench_overrides = (
        "data.views=dino",
        "data.local_crops=0",
        "method.num_prototypes=1024",
        "method.teacher_temp=0.04",
        "method.teacher_temp_warmup=0.04",
        "method.student_temp=0.1",
        "method.freeze_last_layer_steps=20",
        "method.ema_momentum=0.99",
        "method.ema_momentum_end=1.0",
    )
    global_crops = (1, None)
    uses_local_crops = True
    min_crops = 2  # a teacher crop and another student crop
    local_smaller = True  # DINO tells global from local crops by their size

    teacher_backbone: nn.Module  # add_teacher's copies
    teacher_head: nn.Module
    center: torch.Tensor  # a buffer

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.student_temp = m.student_temp
        self.center_momentum = m.center_momentum
        self.freeze_last_layer_steps = m.freeze_last_layer_steps
        self.backbone = make_backbone(cfg, multi_crop=True)

        def head():
            return dino_head(self.backbone.num_features, m.num_prototypes, m)

        self.head = head()
        add_teacher(self, "backbone", lambda: make_backbone(cfg, multi_crop=True))
        add_teacher(self, "head", head)
        self.embedding_dim = m.proj_dim
        self.register_buffer("center", torch.zeros(1, m.num_prototypes))

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        step = step_of(values)
        teacher_temp = float(values.get("teacher_temp", 0.04))
        freeze = step < self.freeze_last_layer_steps
        n_global = 1
        while n_global < len(views) and views[n_global].shape == views[0].shape:
            n_global += 1
        student = multicrop(lambda x: self.head(self.backbone(x), freeze_last_layer=freeze), views)
        s_logits = [s for s, _ in student]
        with torch.no_grad():
            teacher = multicrop(lambda x: self.teacher_head(self.teacher_backbone(x))[0], views[:n_global])
        center = self.center.clone()
        loss = dino_loss(s_logits, teacher, center, self.student_temp, teacher_temp)
        with torch.no_grad():
            self.center.copy_(dino_center_update(center, teacher, self.center_momentum))
            p = torch.softmax((torch.cat(teacher).float() - center.float()) / teacher_temp, dim=-1)
            entropy, mean_entropy = teacher_entropies(p)
        return {
            "loss": loss,
            "embedding_std": embedding_std(student[0][1]),
            "teacher_entropy": entropy,
            "teacher_mean_entropy": mean_entropy,
            "teacher_temp": torch.tensor(teacher_temp),
        }

    @classmethod
    def schedules(cls, m: MethodConfig, total_steps: int) -> dict[str, np.ndarray]:
        return {**super().schedules(m, total_steps), "teacher_temp": teacher_temp_schedule(m, total_steps)}
