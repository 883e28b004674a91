"""Token-level forward passes of a timm VisionTransformer that its own `forward_features`
does not offer: patches replaced by a mask token (iBOT/DINOv2 students) and a subset of
patches per image, padded, with the padding hidden from attention (I-JEPA's context
encoder). Both reuse the ViT's own patch_embed, `_pos_embed` (prefix tokens, position
embedding, dynamic image size), blocks and norm."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

# A timm VisionTransformer, or any model with its attributes (raysl.models.mae.check_vit
# checks them): read by name, so typed as Any rather than as nn.Module, whose attributes
# mypy only knows as Tensor | Module.
ViT = Any


def num_prefix(vit: ViT) -> int:
    return int(getattr(vit, "num_prefix_tokens", 1 if getattr(vit, "cls_token", None) is not None else 0))


def _embed(vit: ViT, imgs: torch.Tensor, mask: torch.Tensor | None, mask_token: torch.Tensor | None):
    x = vit.patch_embed(imgs)  # (B, H, W, C) with dynamic_img_size, else (B, L, C)
    if mask is not None:
        if mask_token is None:
            raise ValueError("a mask needs a mask_token")
        m = mask.reshape(x.shape[:-1]).unsqueeze(-1)
        x = torch.where(m, mask_token.to(x.dtype).reshape(1, -1), x)
    return vit._pos_embed(x)


def _blocks(vit: ViT, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    checkpointed = getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled()
    for blk in vit.blocks:
        if checkpointed:  # model.grad_checkpointing, as the ViT's own forward does
            x = checkpoint(blk, x, attn_mask, use_reentrant=False)
        else:
            x = blk(x, attn_mask=attn_mask) if attn_mask is not None else blk(x)
    return x


def vit_tokens(
    vit: ViT,
    imgs: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """All tokens (B, prefix + L, D) after the final norm. `mask` (B, L) or (B, rows, cols)
    bool: those patch embeddings are replaced by `mask_token` (D,) before the position
    embedding is added, as iBOT and DINOv2 do."""
    x = _embed(vit, imgs, mask, mask_token)
    x = vit.norm_pre(vit.patch_drop(x))
    return vit.norm(_blocks(vit, x, None))


def vit_tokens_of(vit: ViT, imgs: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The prefix tokens and the patches `keep` (B, n) (indices into the L patches, padded;
    `valid` (B, n) marks the real ones) of each image, after the final norm: (B, prefix + n,
    D). Padded tokens are hidden from every real token's attention, so each image's output
    does not depend on how much the batch was padded."""
    x = _embed(vit, imgs, None, None)
    p = num_prefix(vit)
    patches = torch.gather(x[:, p:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = vit.norm_pre(torch.cat([x[:, :p], patches], dim=1))
    real = torch.cat([valid.new_ones(valid.shape[0], p), valid], dim=1)
    return vit.norm(_blocks(vit, x, padding_mask(real, x.dtype)))


def padding_mask(real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) bool of real tokens -> additive attention mask (B, 1, 1, N): 0 for real keys,
    -inf for padding (scaled_dot_product_attention and timm's own path both add it)."""
    out = torch.zeros(real.shape, dtype=dtype, device=real.device)
    return out.masked_fill(~real, float("-inf"))[:, None, None, :]


def indices_of(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool -> (indices (B, n) of the True positions, in order, padded with 0;
    valid (B, n)), n = the most True positions of any row (at least 1)."""
    counts = mask.sum(1)
    n = max(int(counts.max()) if mask.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.arange(n, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, order, torch.zeros_like(order)), valid
