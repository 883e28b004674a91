"""I-JEPA's predictor (Assran et al. 2023, `VisionTransformerPredictor` of the ijepa repo):
a narrow Transformer that reads the context encoder's tokens and predicts the target
encoder's representation at each patch of a target block."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from raysl.models.mae import sincos_pos_embed
from raysl.models.tokens import padding_mask


class JEPAPredictor(nn.Module):
    """Context tokens (embedded to `dim`, plus the fixed 2-D sin-cos position of their patch)
    and one query per target patch (a learned mask token plus its position) go through
    `depth` Transformer blocks; the queries' outputs, normed and projected back to the
    encoder's width, are the predictions. Each target block is its own sequence (the
    context repeated), as in I-JEPA; padding is hidden from attention."""

    pos: torch.Tensor  # a buffer

    def __init__(self, embed_dim: int, grid: tuple[int, int], *, dim: int = 384, depth: int = 6, heads: int = 12):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sincos_pos_embed(dim, grid)[0], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, embed_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(
        self,
        context: torch.Tensor,
        context_at: torch.Tensor,
        context_valid: torch.Tensor,
        target_at: torch.Tensor,
        target_valid: torch.Tensor,
    ) -> torch.Tensor:
        """context (B, n, D) at patches context_at (B, n) (valid: context_valid); targets
        target_at / target_valid (B, T, m) -> predictions (B, T, m, D)."""
        b, t, m = target_at.shape
        x = self.embed(context) + self.pos[context_at].to(context.dtype)
        x = x.repeat_interleave(t, dim=0)
        queries = self.mask_token.to(x.dtype) + self.pos[target_at.flatten(0, 1)].to(x.dtype)
        x = torch.cat([x, queries], dim=1)
        real = torch.cat([context_valid.repeat_interleave(t, dim=0), target_valid.flatten(0, 1)], dim=1)
        attn_mask = padding_mask(real, x.dtype)
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask)
        return self.proj(self.norm(x[:, -m:])).unflatten(0, (b, t))
