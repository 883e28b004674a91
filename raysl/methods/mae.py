"""MAE (He et al. 2022): masked patch reconstruction with a ViT encoder on the visible
patches and a light decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raysl.checks import between
from raysl.methods.base import Method, register
from raysl.methods.common import embedding_std, make_backbone, meta_vit, register_external_params
from raysl.methods.keys import MethodConfig, key
from raysl.methods.losses import mae_loss
from raysl.models.mae import MAEDecoder, check_vit, encode_visible, grid_of, patch_size, patchify


@dataclass
class MAEConfig(MethodConfig):
    mask_ratio: float = key(0.75, "fraction of patches masked (medical recipe: 0.9)", **between(0.0, 0.99))
    norm_pix_loss: bool = key(True, "regress per-patch normalised pixels")
    decoder_dim: int = key(512, "decoder width", **between(1))
    decoder_depth: int = key(8, "decoder blocks", **between(1))
    decoder_heads: int = key(16, "decoder attention heads", **between(1))


@register("mae")
class MAE(Method):
    """MAE on a timm VisionTransformer (`model.backbone`, any ViT with an absolute position
    embedding; a convnet is a UserError). Per image, `mask_ratio` of the patches are
    hidden at random (torch's RNG, so checkpoints resume it); the ViT's own patch_embed,
    cls/register tokens, pos_embed, blocks and norm encode the visible ones; the decoder
    (`decoder_dim`, `decoder_depth`, `decoder_heads`) predicts every patch's pixels and
    `mae_loss` scores the masked ones (per-patch normalised targets with `norm_pix_loss`).
    Takes the first view only (views preset "mae", or "mae_medical": crop 0.5-1.0).
    "embedding_std" is taken on the mean of the encoder's visible patch tokens (MAE does
    not train the CLS token directly)."""

    config_class = MAEConfig
    default_views = "mae"
    # ViT-only: test_vit at 64 px (16 patches of 16 px), features = mean of patch tokens;
    # plain-pixel targets (per-patch normalisation blows up the near-constant background
    # patches of digits); with 16 patches, 75% masking leaves 4 and stays below random init
    # in 200 steps, 50% does.
    bench_overrides = (
        "model.backbone=test_vit",
        "model.global_pool=avg",
        "data.image_size=64",
        "data.views=mae",
        "method.mask_ratio=0.5",
        "method.norm_pix_loss=false",
        "method.decoder_dim=64",
        "method.decoder_depth=2",
        "method.decoder_heads=4",
        "optim.lr=0.008",
    )
    global_crops = (1, 1)

    @classmethod
    def check_config(cls, cfg) -> None:
        """The backbone must be a ViT: built on the meta device (no memory, no weights)."""
        meta_vit(cfg, cls.name)

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.backbone = make_backbone(cfg)
        check_vit(self.backbone, cfg.model.backbone)
        self.mask_ratio = m.mask_ratio
        self.norm_pix = m.norm_pix_loss
        self.patch = patch_size(self.backbone)
        self.num_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        self.decoder = MAEDecoder(
            self.backbone.num_features,
            grid_of(self.backbone, cfg.data.image_size),
            self.patch,
            dim=m.decoder_dim,
            depth=m.decoder_depth,
            heads=m.decoder_heads,
        )
        self.embedding_dim = self.backbone.num_features
        register_external_params(self, self.backbone)  # cls_token, pos_embed: read outside the ViT's forward

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        imgs = views[0]
        tokens, mask, ids_restore = encode_visible(self.backbone, imgs, self.mask_ratio)
        pred = self.decoder(tokens, ids_restore, self.num_prefix)
        loss = mae_loss(pred, patchify(imgs, self.patch), mask, norm_pix=self.norm_pix)
        pooled = tokens[:, self.num_prefix :].mean(1)  # visible patch tokens: the CLS token alone says little in MAE
        return {"loss": loss, "embedding_std": embedding_std(pooled), "mask_ratio": mask.float().mean()}
