"""BYOL (Grill et al. 2020): online network with predictor regresses an EMA target."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raysl.methods.base import Method, register
from raysl.methods.common import embedding_std, make_backbone
from raysl.methods.keys import EMAKeys, MethodConfig, PredictorKeys, ProjectorKeys
from raysl.methods.losses import byol_loss
from raysl.methods.teacher import add_teacher
from raysl.models.heads import mlp


@dataclass
class BYOLConfig(EMAKeys, PredictorKeys, ProjectorKeys, MethodConfig):
    """Only the shared keys."""


@register("byol")
class BYOL(Method):
    """BYOL: online backbone + projector (`proj_layers`, default 2; hidden `proj_hidden_dim`,
    paper 4096 -> 256) + predictor (2 layers, `pred_hidden_dim`); the target is the EMA of
    backbone + projector with momentum from the `ema_momentum` schedule (paper 0.996 -> 1,
    cosine). Loss: byol_loss(p1, z2') + byol_loss(p2, z1') (targets without gradient)."""

    config_class = BYOLConfig
    default_views = "byol"
    bench_overrides = (
        "data.views=mocov2",
        "method.ema_momentum=0.99",
        "method.ema_momentum_end=1.0",
        "optim.lr=0.016",
    )
    legacy_teacher_prefixes = ("target_",)  # before raysl.methods.teacher

    teacher_backbone: nn.Module  # add_teacher's copies
    teacher_projector: nn.Module

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.backbone = make_backbone(cfg)

        def projector():
            return mlp(self.backbone.num_features, m.proj_hidden_dim, m.proj_dim, layers=m.proj_layers or 2)

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
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.teacher_projector(self.teacher_backbone(x1))
            t2 = self.teacher_projector(self.teacher_backbone(x2))
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return {"loss": loss, "embedding_std": embedding_std(z1)}
