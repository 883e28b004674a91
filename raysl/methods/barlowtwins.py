"""Barlow Twins (Zbontar et al. 2021): redundancy reduction of the cross-correlation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raysl.checks import between
from raysl.methods.base import Method, register
from raysl.methods.common import embedding_std, make_backbone
from raysl.methods.keys import MethodConfig, ProjectorKeys, key
from raysl.methods.losses import barlow_twins_loss
from raysl.models.heads import mlp


@dataclass
class BarlowTwinsConfig(ProjectorKeys, MethodConfig):
    barlow_lambda: float = key(0.0051, "weight of the off-diagonal (redundancy) term", **between(0.0))


@register("barlowtwins")
class BarlowTwins(Method):
    """Barlow Twins: backbone + projector (`proj_layers`, default 3; paper 8192-8192-8192:
    proj_hidden_dim = proj_dim = 8192), loss `barlow_twins_loss` with `barlow_lambda`
    (BN over the global batch inside the loss)."""

    config_class = BarlowTwinsConfig
    default_views = "byol"
    bench_overrides = (
        "data.views=mocov2",
        "method.proj_layers=3",
        "method.barlow_lambda=0.005",
    )

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.lambd = m.barlow_lambda
        self.backbone = make_backbone(cfg)
        self.projector = mlp(self.backbone.num_features, m.proj_hidden_dim, m.proj_dim, layers=m.proj_layers or 3)
        self.embedding_dim = m.proj_dim

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        return {"loss": barlow_twins_loss(z1, z2, self.lambd), "embedding_std": embedding_std(z1)}
