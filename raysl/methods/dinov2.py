"""DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without
Supervision"): iBOT's image- and patch-level self-distillation with the teacher centred
by Sinkhorn-Knopp instead of running means, and the KoLeo regulariser on the student's
[CLS] features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raysl.checks import between
from raysl.methods.base import register
from raysl.methods.ibot import IBOT, VIT_BENCH, MaskedDistillationKeys
from raysl.methods.keys import MethodConfig, key
from raysl.methods.losses import koleo_loss, sinkhorn


@dataclass
class DINOv2Config(MaskedDistillationKeys, MethodConfig):
    koleo_weight: float = key(0.1, "weight of the KoLeo loss on the student's [CLS] features", **between(0.0))
    sinkhorn_iters: int = key(3, "Sinkhorn-Knopp iterations of the teacher centering", **between(1))


@register("dinov2")
class DINOv2(IBOT):
    """DINOv2 on a timm ViT: iBOT (raysl.methods.ibot: masked global crops, [CLS] loss on
    every crop pair, masked patch loss), except that
    - the teacher's [CLS] and masked-patch logits are centred by Sinkhorn-Knopp
      (`sinkhorn_iters`, eps = the `teacher_temp` schedule value) over the global batch
      (patches: over every worker's masked patches, however many each has), not by
      running means;
    - `koleo_weight` x KoLeo (raysl.methods.losses.koleo_loss, over the global batch) of
      the student's pooled features, summed over the global crops, joins the loss;
    - the teacher's head scores only the masked patches.
    `separate_head` gives the patch loss its own head (the paper's ViT-L/g setting).

    Metrics: iBOT's, and "koleo" (the weighted KoLeo term)."""

    config_class = DINOv2Config
    default_views = "dinov2"
    bench_overrides = (*VIT_BENCH, "method.koleo_weight=0.1")

    def setup_centering(self, cfg) -> None:
        self.sinkhorn_iters = cfg.method.sinkhorn_iters
        self.koleo_weight = cfg.method.koleo_weight

    def teacher_cls_probs(self, logits: list[torch.Tensor], temp: float) -> list[torch.Tensor]:
        return list(sinkhorn(torch.cat(logits), temp, self.sinkhorn_iters).chunk(len(logits)))

    def teacher_patch_probs(self, head: nn.Module, patches: torch.Tensor, mask: torch.Tensor, temp: float):
        logits = head(patches[mask])[0]
        return sinkhorn(logits, temp, self.sinkhorn_iters, equal_rows=False)

    def regularisers(self, student_cls: torch.Tensor, n_global: int) -> dict[str, torch.Tensor]:
        if not self.koleo_weight:
            return {}
        koleo = sum(koleo_loss(x) for x in student_cls.chunk(n_global))
        return {"koleo": self.koleo_weight * koleo}
