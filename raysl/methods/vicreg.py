"""VICReg (Bardes, Ponce, LeCun 2022): variance-invariance-covariance regularisation."""

from __future__ import annotations

import torch

from raysl.methods.base import Method, register
from raysl.methods.common import embedding_std, make_backbone
from raysl.methods.losses import vicreg_loss
from raysl.models.heads import mlp


@register("vicreg")
class VICReg(Method):
    """VICReg: backbone + expander (`proj_layers`, default 3; paper 8192-8192-8192), loss
    `vicreg_loss` with coefficients `vicreg_sim`, `vicreg_std`, `vicreg_cov` (25, 25, 1).
    Logs the unweighted "invariance", "variance" and "covariance" terms."""

    default_views = "byol"

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.coeffs = (m.vicreg_sim, m.vicreg_std, m.vicreg_cov)
        self.backbone = make_backbone(cfg)
        self.projector = mlp(self.backbone.num_features, m.proj_hidden_dim, m.proj_dim, layers=m.proj_layers or 3)
        self.embedding_dim = m.proj_dim

    def forward(self, views: list[torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        loss, terms = vicreg_loss(z1, z2, *self.coeffs)
        return {"loss": loss, "embedding_std": embedding_std(z1), **{k: v.detach() for k, v in terms.items()}}
