"""SimSiam (Chen & He 2021): a Siamese network without negatives, momentum encoder or
large batches; a predictor and a stop-gradient are what keep it from collapsing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raysl.checks import between
from raysl.methods.base import Method, register
from raysl.methods.common import embedding_std, make_backbone
from raysl.methods.keys import MethodConfig, PredictorKeys, ProjectorKeys, key
from raysl.models.heads import mlp


@dataclass
class SimSiamConfig(PredictorKeys, ProjectorKeys, MethodConfig):
    # the paper's sizes: projector 2048-2048-2048, predictor bottleneck 512
    proj_dim: int = key(2048, "output size of the projector (and of the predictor)", **between(1))
    pred_hidden_dim: int = key(512, "bottleneck of the 2-layer predictor (SimSiam: proj_dim / 4)", **between(1))


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -cos(p, stopgrad(z)), averaged over the batch. The method symmetrises it:
    D(p1, z2) / 2 + D(p2, z1) / 2."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


@register("simsiam")
class SimSiam(Method):
    """SimSiam: backbone + projector (`proj_layers`, default 3, BN on every layer, the last
    without affine) + predictor (2 layers, bottleneck `pred_hidden_dim`). Loss: negative
    cosine between each view's prediction and the other view's projection, with the
    gradient stopped through the projection. The paper trains with SGD (lr 0.05 x
    batch/256, wd 1e-4) and the MoCo v2 augmentations."""

    config_class = SimSiamConfig
    default_views = "mocov2"
    bench_overrides = (
        "method.proj_hidden_dim=256",
        "method.proj_dim=256",
        "method.pred_hidden_dim=64",
        "data.views=mocov2",
    )

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.backbone = make_backbone(cfg)
        width = self.backbone.num_features
        self.projector = mlp(width, m.proj_hidden_dim, m.proj_dim, layers=m.proj_layers or 3, last_bn=True)
        self.predictor = mlp(m.proj_dim, m.pred_hidden_dim, m.proj_dim, layers=2)
        self.embedding_dim = m.proj_dim

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, z2) / 2 + simsiam_loss(p2, z1) / 2
        return {"loss": loss, "embedding_std": embedding_std(z1)}
