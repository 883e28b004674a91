"""iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer"): DINO's
self-distillation on the [CLS] token plus masked image modelling against an online
tokenizer, the EMA teacher's patch-token distributions. DINOv2 (raysl.methods.dinov2)
is this method with Sinkhorn-Knopp centering and the KoLeo regulariser."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raysl.checks import between
from raysl.data.masks import BlockMasks, patch_grid
from raysl.errors import UserError
from raysl.methods.base import Method, register
from raysl.methods.common import (
    dino_head,
    embedding_std,
    make_backbone,
    meta_vit,
    multicrop,
    register_external_params,
    step_of,
    teacher_entropies,
    teacher_temp_schedule,
)
from raysl.methods.keys import EMAKeys, MethodConfig, ProjectorKeys, key
from raysl.methods.losses import dino_center_update, masked_patch_loss, self_distillation_loss
from raysl.methods.teacher import add_teacher
from raysl.models.mae import check_vit, patch_size
from raysl.models.tokens import ViT, num_prefix, vit_tokens

# `raysl bench methods` settings of iBOT and DINOv2: 64 px, 16 patches of 16 px, room for block masks
VIT_BENCH = (
    "model.backbone=test_vit",
    "data.views=dino",
    "data.image_size=64",
    "data.local_crops=0",
    "method.num_prototypes=1024",
    "method.patch_prototypes=1024",
    "method.freeze_last_layer_steps=20",
    "method.ema_momentum=0.99",
    "method.ema_momentum_end=1.0",
    "method.teacher_temp=0.04",
    "method.teacher_temp_warmup=0.04",
)


@dataclass
class MaskedDistillationKeys(EMAKeys, ProjectorKeys):
    """Keys of iBOT and DINOv2."""

    num_prototypes: int = key(8192, "output size K of the [CLS] head", **between(1))
    separate_head: bool = key(False, "patch tokens get their own head (DINOv2 ViT-L/g), else the [CLS] head's")
    patch_prototypes: int = key(8192, "output size of the separate patch head (with separate_head)", **between(1))
    student_temp: float = key(0.1, "student softmax temperature", **between(0.0, lo_open=True))
    teacher_temp: float = key(
        0.07, "teacher temperature after its warmup ([CLS] and patches)", **between(0.0, lo_open=True)
    )
    teacher_temp_warmup: float = key(0.04, "teacher temperature at step 0", **between(0.0, lo_open=True))
    teacher_temp_warmup_steps: int = key(0, "steps of the linear teacher temperature warmup", **between(0))
    norm_last_layer: bool = key(True, "weight-normed last layers with their norm fixed to 1")
    freeze_last_layer_steps: int = key(0, "steps during which the last layers get zero gradients", **between(0))
    mask_probability: float = key(0.5, "chance that a global crop is masked", **between(0.0, 1.0))
    mask_ratio_min: float = key(0.1, "fewest patches of a masked crop that are masked (fraction)", **between(0.0, 0.99))
    mask_ratio_max: float = key(0.5, "most patches of a masked crop that are masked (fraction)", **between(0.0, 0.99))
    patch_loss_weight: float = key(1.0, "weight of the masked patch loss (iBOT lambda2)", **between(0.0))


@dataclass
class IBOTConfig(MaskedDistillationKeys, MethodConfig):
    center_momentum: float = key(
        0.9, "momentum of the teacher's running centres ([CLS] and patch)", **between(0.0, 1.0)
    )


@register("ibot")
class IBOT(Method):
    """iBOT on a timm ViT. Student = backbone + DINO head (`proj_layers` (default 3) x
    `proj_hidden_dim` -> `proj_dim` -> weight-normed `num_prototypes`); its global crops
    have block-wise masks (BEiT; drawn per row from the row's augmentation seed, see
    raysl.data.masks): a crop is masked with `mask_probability`, then `mask_ratio_min` to
    `mask_ratio_max` of its patches are replaced by a learned mask token. The EMA teacher
    sees the crops unmasked.
    - [CLS] loss: DINO's, teacher global crops vs every other student crop (local crops
      unmasked).
    - Patch loss (x `patch_loss_weight`): each masked patch's student distribution predicts
      the teacher's for the same patch (raysl.methods.losses.masked_patch_loss); patch
      logits from the [CLS] head, or a head of their own with `separate_head`.
    Teacher outputs are centred by running means (`center_momentum`; one for [CLS], one
    for patches) and sharpened with the `teacher_temp` schedule value.

    Metrics: "cls_loss", "patch_loss", "masked" (fraction of global-crop patches masked),
    "embedding_std", "teacher_entropy" and "teacher_mean_entropy" (as DINO's)."""

    config_class: type[MethodConfig] = IBOTConfig
    default_views = "ibot"
    bench_overrides: tuple[str, ...] = (
        *VIT_BENCH,
        # On test_vit the running centres drift to the uniform output (DINO does too: its
        # teacher_entropy reaches 1 and kNN ends below random init); a low lr, clipping and a
        # sharper teacher slow that enough for 200 steps to learn. DINOv2 needs none of it.
        "optim.lr=0.0005",
        "optim.clip_grad=3.0",
        "method.teacher_temp=0.02",
        "method.teacher_temp_warmup=0.02",
    )
    global_crops = (2, 2)  # masks are drawn for the first two views
    uses_local_crops = True
    min_crops = 2
    local_smaller = True

    @classmethod
    def check_config(cls, cfg) -> None:
        m = cfg.method
        meta_vit(cfg, cls.name)
        if m.mask_ratio_min > m.mask_ratio_max:
            raise UserError(
                f"config key method.mask_ratio_min: {m.mask_ratio_min} is above method.mask_ratio_max "
                f"(method {cls.name})"
            )

    @classmethod
    def mask_spec(cls, cfg, spec) -> BlockMasks:
        m = cfg.method
        patch = patch_size(meta_vit(cfg, cls.name))
        grid = patch_grid(spec.crops[0].size, patch, cfg.model.backbone)
        misfits = sorted({c.size for c in spec.per_view()[spec.n_global :] if c.size % patch})
        if misfits:
            size = misfits[0]
            raise UserError(
                f"config key data.local_size: local crops of {size} px are not a multiple of the {patch} px "
                f"patches of {cfg.model.backbone}; use a multiple of {patch} (e.g. {size // patch * patch})"
            )
        return BlockMasks(
            grid, views=spec.n_global, probability=m.mask_probability, ratio=(m.mask_ratio_min, m.mask_ratio_max)
        )

    teacher_backbone: ViT  # add_teacher's copies
    teacher_head: nn.Module
    teacher_patch_head: nn.Module
    center: torch.Tensor  # buffers
    patch_center: torch.Tensor

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.student_temp = m.student_temp
        self.freeze_last_layer_steps = m.freeze_last_layer_steps
        self.patch_loss_weight = m.patch_loss_weight
        self.backbone = make_backbone(cfg, multi_crop=True)
        check_vit(self.backbone, cfg.model.backbone, self.name)

        def head(out_dim: int) -> nn.Module:
            return dino_head(self.backbone.num_features, out_dim, m)

        self.head = head(m.num_prototypes)
        self.mask_token = nn.Parameter(torch.zeros(self.backbone.num_features))
        add_teacher(self, "backbone", lambda: make_backbone(cfg, multi_crop=True))
        add_teacher(self, "head", lambda: head(m.num_prototypes))
        if m.separate_head:
            self.patch_head = head(m.patch_prototypes)
            add_teacher(self, "patch_head", lambda: head(m.patch_prototypes))
        self.embedding_dim = m.proj_dim
        self.prefix = num_prefix(self.backbone)
        register_external_params(self, self.backbone)  # cls_token, pos_embed: read by vit_tokens
        register_external_params(self, self.teacher_backbone)
        self.setup_centering(cfg)

    # --- centering: running means here, Sinkhorn-Knopp in DINOv2 -------------------------

    def setup_centering(self, cfg) -> None:
        m = cfg.method
        self.center_momentum = m.center_momentum
        self.register_buffer("center", torch.zeros(1, m.num_prototypes))
        self.register_buffer(
            "patch_center", torch.zeros(1, m.patch_prototypes if m.separate_head else m.num_prototypes)
        )

    def teacher_cls_probs(self, logits: list[torch.Tensor], temp: float) -> list[torch.Tensor]:
        """Teacher [CLS] probabilities per global crop, centred and sharpened; the centre moves."""
        center = self.center.clone()
        self.center.copy_(dino_center_update(center, logits, self.center_momentum))
        return [torch.softmax((t.float() - center) / temp, dim=-1) for t in logits]

    def teacher_patch_probs(self, head: nn.Module, patches: torch.Tensor, mask: torch.Tensor, temp: float):
        """Teacher probabilities of the masked patches (M, K), from patch tokens (crops, L, D).
        As iBOT, the head scores every patch, whose mean moves the running patch centre."""
        logits = head(patches.flatten(0, 1))[0].unflatten(0, patches.shape[:2])
        center = self.patch_center.clone()
        self.patch_center.copy_(dino_center_update(center, [logits.flatten(0, 1)], self.center_momentum))
        return torch.softmax((logits[mask].float() - center) / temp, dim=-1)

    def regularisers(self, student_cls: torch.Tensor, n_global: int) -> dict[str, torch.Tensor]:
        """Extra loss terms on the student's pooled global-crop features (DINOv2: KoLeo)."""
        return {}

    # --- forward -------------------------------------------------------------------------

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if masks is None:
            raise ValueError(f"method {self.name} needs the views' patch masks (raysl.data.masks)")
        step = step_of(values)
        temp = float(values.get("teacher_temp", 0.04))
        freeze = step < self.freeze_last_layer_steps
        n_global = masks.shape[1]
        images = torch.cat(views[:n_global])
        mask = torch.cat(masks.unbind(1)).flatten(1).bool()  # (crops, L), crop-major like `images`
        patch_head = getattr(self, "patch_head", self.head)
        t_patch_head = getattr(self, "teacher_patch_head", self.teacher_head)

        tokens = vit_tokens(self.backbone, images, mask=mask, mask_token=self.mask_token)
        pooled = self.backbone.forward_head(tokens, pre_logits=True)
        s_global = self.head(pooled, freeze_last_layer=freeze)
        s_local = multicrop(lambda x: self.head(self.backbone(x), freeze_last_layer=freeze), views[n_global:])
        student = list(s_global[0].chunk(n_global)) + [s for s, _ in s_local]
        s_patch = patch_head(tokens[:, self.prefix :][mask], freeze_last_layer=freeze)[0]

        with torch.no_grad():
            t_tokens = vit_tokens(self.teacher_backbone, images)
            t_cls = self.teacher_head(self.teacher_backbone.forward_head(t_tokens, pre_logits=True))[0]
            cls_probs = self.teacher_cls_probs(list(t_cls.chunk(n_global)), temp)
            patch_probs = self.teacher_patch_probs(t_patch_head, t_tokens[:, self.prefix :], mask, temp)

        cls_loss = self_distillation_loss(student, cls_probs, self.student_temp)
        patch_loss = masked_patch_loss(s_patch, patch_probs, mask, self.student_temp)
        extra = self.regularisers(pooled, n_global)
        loss = cls_loss + self.patch_loss_weight * patch_loss + sum(extra.values())
        entropy, mean_entropy = teacher_entropies(torch.cat(cls_probs))
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "patch_loss": patch_loss.detach(),
            **{k: v.detach() for k, v in extra.items()},
            "masked": mask.float().mean(),
            "embedding_std": embedding_std(s_global[1]),
            "teacher_entropy": entropy,
            "teacher_mean_entropy": mean_entropy,
            "teacher_temp": torch.tensor(temp),
        }

    @classmethod
    def schedules(cls, m, total_steps: int) -> dict[str, np.ndarray]:
        return {**super().schedules(m, total_steps), "teacher_temp": teacher_temp_schedule(m, total_steps)}
