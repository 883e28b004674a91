"""SwAV (Caron et al. 2020): online clustering with Sinkhorn codes, swapped prediction,
multi-crop, optional queue."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raysl.checks import between
from raysl.methods.base import Method, register
from raysl.methods.common import embedding_std, make_backbone, multicrop, step_of
from raysl.methods.keys import MethodConfig, ProjectorKeys, TemperatureKeys, key
from raysl.methods.losses import swav_loss
from raysl.models.heads import Prototypes, mlp

CROPS_FOR_ASSIGN = (0, 1)


@dataclass
class SwAVConfig(TemperatureKeys, ProjectorKeys, MethodConfig):
    num_prototypes: int = key(3000, "prototypes (clusters) the codes are assigned to", **between(1))
    freeze_prototypes_steps: int = key(0, "steps during which the prototypes get zero gradients", **between(0))
    sinkhorn_eps: float = key(0.05, "Sinkhorn-Knopp entropy regularisation", **between(0.0, lo_open=True))
    sinkhorn_iters: int = key(3, "Sinkhorn-Knopp iterations", **between(1))
    swav_queue_size: int = key(0, "embeddings queued for the codes; 0: no queue", **between(0))
    swav_queue_start: int = key(0, "step from which a full queue is used", **between(0))


@register("swav")
class SwAV(Method):
    """SwAV: backbone + projector (`proj_layers`, default 2) -> L2-normalised embedding ->
    `num_prototypes` prototypes (L2-normalised in every forward). Codes come from Sinkhorn
    (`sinkhorn_eps`, `sinkhorn_iters`) on the two global crops and are predicted from
    every other crop at `temperature` (multi-crop: the views preset's local crops).

    `freeze_prototypes_steps`: for the first N steps the prototypes get zero gradients
    (SwAV freezes them during the first epoch). `swav_queue_size` > 0 keeps a per-worker
    queue of the last embeddings of each assign crop; once it is full and the step is at
    least `swav_queue_start`, its scores are prepended before Sinkhorn (small batches)."""

    config_class = SwAVConfig
    default_views = "swav"
    # Short runs sit at the uniform-code fixed point (loss = log K) with a queue of stale
    # embeddings or with eps 0.05; sharper Sinkhorn codes (eps 0.02) over more prototypes
    # than embedding dimensions, prototypes frozen for the first 50 steps, learn.
    bench_overrides = (
        "data.views=swav",
        "data.local_crops=0",
        "method.temperature=0.1",
        "method.num_prototypes=300",
        "method.sinkhorn_eps=0.02",
        "method.freeze_prototypes_steps=50",
        "method.swav_queue_size=0",
    )
    global_crops = (2, None)  # codes come from the first two crops
    uses_local_crops = True

    queue: torch.Tensor  # buffers
    queue_count: torch.Tensor

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.temperature = m.temperature
        self.eps, self.iters = m.sinkhorn_eps, m.sinkhorn_iters
        self.freeze_steps = m.freeze_prototypes_steps
        self.queue_start = m.swav_queue_start
        self.backbone = make_backbone(cfg, multi_crop=True)
        self.projector = mlp(self.backbone.num_features, m.proj_hidden_dim, m.proj_dim, layers=m.proj_layers or 2)
        self.prototypes = Prototypes(m.proj_dim, m.num_prototypes)
        self.embedding_dim = m.proj_dim
        self.register_buffer("queue", torch.zeros(len(CROPS_FOR_ASSIGN), m.swav_queue_size, m.proj_dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def queue_ready(self, step: int) -> bool:
        size = self.queue.shape[1]
        return size > 0 and step >= self.queue_start and int(self.queue_count) >= size

    @torch.no_grad()
    def enqueue(self, z: list[torch.Tensor]) -> None:
        size = self.queue.shape[1]
        if size == 0:
            return
        for i, crop in enumerate(CROPS_FOR_ASSIGN):
            new = z[crop].detach().to(self.queue.dtype)[:size]
            b = new.shape[0]
            self.queue[i, b:] = self.queue[i, :-b].clone()
            self.queue[i, :b] = new
        self.queue_count.copy_(torch.clamp(self.queue_count + new.shape[0], max=size))

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        step = step_of(values)
        z = multicrop(self._embed, views)
        b = z[0].shape[0]
        frozen = step < self.freeze_steps
        use_queue = self.queue_ready(step)
        extra = self.queue.flatten(0, 1).clone() if use_queue else None
        scores_all = self.prototypes(torch.cat(z), frozen=frozen, extra=extra)
        queue_scores = None
        if use_queue:
            scores_all, qs = scores_all
            queue_scores = list(qs.chunk(len(CROPS_FOR_ASSIGN)))
        scores = list(scores_all.split(b))
        loss = swav_loss(scores, CROPS_FOR_ASSIGN, self.temperature, self.eps, self.iters, queue_scores)
        self.enqueue(z)
        return {
            "loss": loss,
            "embedding_std": embedding_std(z[0]),
            "prototypes_frozen": torch.tensor(float(frozen)),
            "queue_used": torch.tensor(float(use_queue)),
        }
