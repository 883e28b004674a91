"""VICReg (Bardes, Ponce, LeCun 2022): variance-invariance-covariance regularisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raysl.checks import between
from raysl.methods.base import Method, register
from raysl.methods.common import embedding_std, make_backbone
from raysl.methods.keys import MethodConfig, ProjectorKeys, key
from raysl.methods.losses import vicreg_loss
from raysl.models.heads import mlp


@dataclass
class VICRegConfig(ProjectorKeys, MethodConfig):
    vicreg_sim: float = key(25.0, "weight of the invariance term", **between(0.0))
    vicreg_std: float = key(25.0, "weight of the variance term", **between(0.0))
    vicreg_cov: float = key(1.0, "weight of the covariance term", **between(0.0))


@register("vicreg")
class VICReg(Method):
    """VICReg: backbone + expander (`proj_layers`, default 3; paper 8192-8192-8192), loss
    `vicreg_loss` with coefficients `vicreg_sim`, `vicreg_std`, `vicreg_cov` (25, 25, 1).
    Logs the unweighted "invariance", "variance" and "covariance" terms."""

    config_class = VICRegConfig
    default_views = "byol"
    bench_overrides = (
        "data.views=mocov2",
        "method.proj_layers=3",
    )

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.coeffs = (m.vicreg_sim, m.vicreg_std, m.vicreg_cov)
        self.backbone = make_backbone(cfg)
        self.projector = mlp(self.backbone.num_features, m.proj_hidden_dim, m.proj_dim, layers=m.proj_layers or 3)
        self.embedding_dim = m.proj_dim

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        loss, terms = vicreg_loss(z1, z2, *self.coeffs)
        return {"loss": loss, "embedding_std": embedding_std(z1), **{k: v.detach() for k, v in terms.items()}}
