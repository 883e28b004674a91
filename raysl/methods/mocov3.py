"""MoCo v3 (Chen, Xie, He 2021): momentum encoder, predictor, symmetric contrastive loss
against the keys of the global batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raysl.methods.base import Method, register
from raysl.methods.common import embedding_std, make_backbone
from raysl.methods.keys import EMAKeys, MethodConfig, PredictorKeys, ProjectorKeys, TemperatureKeys
from raysl.methods.losses import moco_v3_loss
from raysl.methods.teacher import add_teacher
from raysl.models.heads import mlp


@dataclass
class MoCoV3Config(TemperatureKeys, EMAKeys, PredictorKeys, ProjectorKeys, MethodConfig):
    """Only the shared keys."""


@register("mocov3")
class MoCoV3(Method):
    """MoCo v3: backbone + projector (`proj_layers`, default 3 as for ViTs; 2 for ResNets
    in the paper; BN-ReLU hidden layers, affine-free BN last) + predictor (2 layers,
    `pred_hidden_dim`); the momentum encoder is the EMA of backbone + projector (schedule
    `ema_momentum` -> `ema_momentum_end`, paper 0.99 -> 1). Loss: moco_v3_loss(q1, k2) +
    moco_v3_loss(q2, k1) with keys of all workers as negatives."""

    config_class = MoCoV3Config
    default_views = "mocov3"
    bench_overrides = (
        "data.views=mocov2",
        "method.temperature=0.2",
        "method.proj_layers=2",
        "method.ema_momentum=0.99",
        "method.ema_momentum_end=1.0",
    )
    legacy_teacher_prefixes = ("momentum_",)  # before raysl.methods.teacher

    teacher_backbone: nn.Module  # add_teacher's copies
    teacher_projector: nn.Module

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.temperature = m.temperature
        self.backbone = make_backbone(cfg)

        def projector():
            return mlp(
                self.backbone.num_features, m.proj_hidden_dim, m.proj_dim, layers=m.proj_layers or 3, last_bn=True
            )

        self.projector = projector()
        self.predictor = mlp(m.proj_dim, m.pred_hidden_dim, m.proj_dim, layers=2)
        add_teacher(self, "backbone", lambda: make_backbone(cfg))
        add_teacher(self, "projector", projector)
        self.embedding_dim = m.proj_dim

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        x1, x2 = views[:2]
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.teacher_projector(self.teacher_backbone(x1))
            k2 = self.teacher_projector(self.teacher_backbone(x2))
        loss = moco_v3_loss(q1, k2, self.temperature) + moco_v3_loss(q2, k1, self.temperature)
        return {"loss": loss, "embedding_std": embedding_std(z1)}
