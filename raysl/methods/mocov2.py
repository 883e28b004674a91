"""MoCo v2 (He et al. 2020; Chen et al. 2020): a momentum key encoder and a queue of
negatives, optionally with Feature Transformation (Zhu et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raysl.checks import between
from raysl.methods.base import Method, register
from raysl.methods.common import embedding_std, make_backbone, step_of
from raysl.methods.distributed import gather_no_grad, world
from raysl.methods.feature_transform_plots import draw_score_histograms
from raysl.methods.keys import EMAKeys, FeatureTransformKeys, MethodConfig, ProjectorKeys, TemperatureKeys, key
from raysl.methods.losses import feature_transform, info_nce_queue, pos_neg_scores
from raysl.methods.teacher import add_teacher
from raysl.models.heads import mlp

HIST_NEGATIVES = 4096  # negatives per histogram (a fixed stride through the queue)


@dataclass
class MoCoV2Config(FeatureTransformKeys, TemperatureKeys, EMAKeys, ProjectorKeys, MethodConfig):
    queue_size: int = key(65536, "negatives kept in the queue (keys of all workers)", **between(1))
    shuffle_bn: bool = key(True, "shuffle the key batch across workers (MoCo's Shuffling BN)")


@register("mocov2")
class MoCoV2(Method):
    """MoCo v2: query encoder (backbone + fc-relu-fc projector), its momentum copy as key
    encoder (momentum from the `ema_momentum` schedule, MoCo: 0.999), InfoNCE against a
    queue of `queue_size` negatives. The loss is symmetrised (both views are queries) and
    the keys of both views of every worker's batch are enqueued after the loss (gathered
    from all workers, so every worker holds the same queue). With `shuffle_bn` and more
    than one worker the key batch is shuffled across workers before the key encoder
    (MoCo's Shuffling BN), so BN statistics cannot leak which key is the positive.

    Feature Transformation (`ft_extrapolate` / `ft_interpolate` > 0, paper: 2.0 / 1.6):
    positive extrapolation of (q, k) and interpolation of the queue, scored with
    `info_nce_queue(..., normalize=False)`; the original keys are enqueued. Every
    `ft_every` steps the output carries "hist_pos"/"hist_neg" (as scored) and
    "hist_pos_raw"/"hist_neg_raw" (before FT), negatives subsampled to 4096 per query.
    """

    config_class = MoCoV2Config
    default_views = "mocov2"
    bench_overrides = (
        "data.views=mocov2",
        "method.temperature=0.2",
        "method.queue_size=2048",
        "method.ema_momentum=0.99",
        "method.ema_momentum_end=0.99",
    )
    legacy_teacher_prefixes = ("key_",)  # before raysl.methods.teacher

    teacher_backbone: nn.Module  # add_teacher's copies
    teacher_projector: nn.Module
    queue: torch.Tensor  # buffers
    queue_ptr: torch.Tensor

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.temperature = m.temperature
        self.backbone = make_backbone(cfg)

        def projector():
            return mlp(self.backbone.num_features, m.proj_hidden_dim, m.proj_dim, layers=m.proj_layers or 2, bn=False)

        self.projector = projector()
        add_teacher(self, "backbone", lambda: make_backbone(cfg))
        add_teacher(self, "projector", projector)
        self.embedding_dim = m.proj_dim
        self.shuffle_bn = m.shuffle_bn
        self.ft_extrapolate = m.ft_extrapolate or None
        self.ft_interpolate = m.ft_interpolate or None
        self.ft_every = m.ft_every
        self.register_buffer("queue", F.normalize(torch.randn(m.queue_size, m.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _key_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_projector(self.teacher_backbone(x))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        if not self.shuffle_bn or size == 1:
            return self._key_encoder(x)
        x_all = gather_no_grad(x)
        perm = (
            torch.randperm(x_all.shape[0], device=x.device)
            if rank == 0
            else torch.empty(x_all.shape[0], dtype=torch.long, device=x.device)
        )
        dist.broadcast(perm, 0)
        mine = perm.view(size, -1)[rank]
        k_all = gather_no_grad(self._key_encoder(x_all[mine]))  # row j is image perm[j]
        return k_all[torch.argsort(perm).view(size, -1)[rank]]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys of every worker (gathered here) at the queue pointer, wrapping around."""
        keys = F.normalize(gather_no_grad(keys).to(self.queue.dtype), dim=1)
        size = self.queue.shape[0]
        keys = keys[-size:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def _contrast(self, q, k, negatives, want_hist: bool):
        if self.ft_extrapolate is None and self.ft_interpolate is None:
            return info_nce_queue(q, k, negatives, self.temperature), {}
        q2, k2, n2 = feature_transform(
            q, k, negatives, extrapolate=self.ft_extrapolate, interpolate=self.ft_interpolate
        )
        loss = info_nce_queue(q2, k2, n2, self.temperature, normalize=False)
        if not want_hist:
            return loss, {}
        stride = max(1, negatives.shape[0] // HIST_NEGATIVES)
        pos, neg = pos_neg_scores(q2, k2, n2[::stride])
        pos_raw, neg_raw = pos_neg_scores(q, k, negatives[::stride])
        return loss, {"hist_pos": pos, "hist_neg": neg, "hist_pos_raw": pos_raw, "hist_neg_raw": neg_raw}

    def draw(self, out: dict, step: int, folder: str) -> None:
        draw_score_histograms(out, step, folder)

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        x1, x2 = views[:2]
        q1, q2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        k1, k2 = self.keys(x1), self.keys(x2)
        negatives = self.queue.clone()  # the queue changes in place below
        want_hist = self.ft_every > 0 and step_of(values) % self.ft_every == 0
        loss1, hist = self._contrast(q1, k2, negatives, want_hist)
        loss2, _ = self._contrast(q2, k1, negatives, False)
        self.enqueue(torch.cat([k1, k2]))
        return {"loss": (loss1 + loss2) / 2, "embedding_std": embedding_std(q1), **hist}
