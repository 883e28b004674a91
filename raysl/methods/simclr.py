"""SimCLR (Chen et al. 2020): two views, MLP projector, NT-Xent over the global batch."""

from __future__ import annotations

import torch

from raysl.methods.base import Method, register
from raysl.methods.losses import nt_xent
from raysl.models.backbone import create_backbone
from raysl.models.heads import mlp


@register("simclr")
class SimCLR(Method):
    default_views = "simclr"

    def __init__(self, cfg):
        super().__init__()
        self.temperature = cfg.method.temperature
        self.backbone = create_backbone(
            cfg.model.backbone, drop_path_rate=cfg.model.drop_path_rate, img_size=cfg.data.image_size or None
        )
        self.projector = mlp(self.backbone.num_features, cfg.method.proj_hidden_dim, cfg.method.proj_dim)

    def forward(self, views: list[torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        loss = nt_xent(z1, z2, self.temperature)
        with torch.no_grad():
            std = torch.nn.functional.normalize(z1.float(), dim=1).std(dim=0).mean()
        return {"loss": loss, "embedding_std": std}
