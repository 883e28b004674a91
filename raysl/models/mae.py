"""MAE (He et al. 2022) on a timm VisionTransformer: random patch masking, the ViT's own
patch_embed / cls_token / pos_embed / blocks / norm as encoder on the visible patches, and
a light Transformer decoder that predicts the pixels of the masked ones."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from raysl.errors import UserError
from raysl.models.tokens import ViT


def check_vit(backbone: nn.Module, name: str = "", method: str = "mae") -> None:
    """UserError unless `backbone` is a timm ViT with an absolute position embedding."""
    missing = [a for a in ("patch_embed", "blocks", "norm") if not hasattr(backbone, a)]
    if missing or getattr(backbone, "pos_embed", None) is None or not hasattr(backbone.patch_embed, "patch_size"):
        what = f"model.backbone={name!r}" if name else type(backbone).__name__
        raise UserError(
            f"method {method} needs a Vision Transformer backbone (a timm VisionTransformer with patch_embed, "
            f"pos_embed, blocks and norm, e.g. vit_base_patch16_224); {what} is a {type(backbone).__name__}"
        )


def patch_size(vit: ViT) -> int:
    p = vit.patch_embed.patch_size
    p = p if isinstance(p, int) else tuple(p)
    if not isinstance(p, int):
        if p[0] != p[1]:
            raise UserError(f"method mae needs square patches, got {p}")
        p = p[0]
    return int(p)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, pixels (p, p, C) as in MAE."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int, c: int = 3) -> torch.Tensor:
    """Inverse of `patchify` for an (h, w) image."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, h, w)


def random_masking(b: int, length: int, mask_ratio: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (torch's global RNG):
    (ids_keep (B, n_keep), mask (B, L) with 1 = masked, ids_restore (B, L)).
    n_keep = int(L * (1 - mask_ratio)), at least 1."""
    n_keep = max(1, int(length * (1 - mask_ratio)))
    noise = torch.rand(b, length, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(b, length, device=device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (1, gh*gw, dim), as MAE's decoder."""
    if dim % 4:
        raise UserError(f"method.decoder_dim must be a multiple of 4 for the 2-D sin-cos position embedding, got {dim}")
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def emb(pos):
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([emb(xs), emb(ys)], dim=1).float().unsqueeze(0)


def encode_visible(vit: ViT, imgs: torch.Tensor, mask_ratio: float):
    """Run the ViT on a random subset of its patches.
    Returns (tokens (B, prefix + n_keep, D) after the final norm, mask (B, L), ids_restore (B, L))."""
    x = vit.patch_embed(imgs)
    if x.dim() == 4:  # NHWC (or NCHW) patch grid
        fmt = str(getattr(vit.patch_embed, "output_fmt", "NHWC"))
        x = x.flatten(2).transpose(1, 2) if fmt.endswith("NCHW") else x.flatten(1, 2)
    b, length, _ = x.shape
    pos = vit.pos_embed
    npt = getattr(vit, "num_prefix_tokens", 1 if getattr(vit, "cls_token", None) is not None else 0)
    no_embed_class = getattr(vit, "no_embed_class", False)
    if pos.shape[1] != (length if no_embed_class else length + npt):
        raise UserError(
            f"method mae: the ViT's position embedding has {pos.shape[1]} entries for {length} patches; "
            "set data.image_size to the size the backbone was built for"
        )
    x = x + (pos if no_embed_class else pos[:, npt:])
    ids_keep, mask, ids_restore = random_masking(b, length, mask_ratio, x.device)
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    prefixes = []
    if getattr(vit, "cls_token", None) is not None:
        prefixes.append(vit.cls_token.expand(b, -1, -1))
    if getattr(vit, "reg_token", None) is not None:
        prefixes.append(vit.reg_token.expand(b, -1, -1))
    if prefixes:
        prefix = torch.cat(prefixes, dim=1)
        if not no_embed_class:
            prefix = prefix + pos[:, :npt]
        x = torch.cat([prefix, x], dim=1)
    if hasattr(vit, "norm_pre"):
        x = vit.norm_pre(x)
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
        from timm.models import checkpoint_seq  # model.grad_checkpointing: as the ViT's own forward does

        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x), mask, ids_restore


class MAEDecoder(nn.Module):
    """MAE decoder: embed to `dim`, fill masked positions with a learned mask token,
    unshuffle, add fixed sin-cos positions, `depth` Transformer blocks, predict p*p*3 pixels
    per patch. Prefix tokens (CLS, registers) pass through and are dropped at the end."""

    pos_embed: torch.Tensor  # a buffer

    def __init__(
        self,
        enc_dim: int,
        grid: tuple[int, int],
        patch: int,
        *,
        dim: int = 512,
        depth: int = 8,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
    ):
        super().__init__()
        from timm.models.vision_transformer import Block

        if dim % heads:
            raise UserError(f"method.decoder_dim ({dim}) must be a multiple of method.decoder_heads ({heads})")
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid), persistent=False)
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim,
                    heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    # timm types norm_layer as a class; its own models pass a partial like this one
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),  # type: ignore[arg-type]
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch * patch * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor, num_prefix: int) -> torch.Tensor:
        x = self.embed(tokens)
        b, length = ids_restore.shape
        visible = x[:, num_prefix:]
        fill = self.mask_token.to(x.dtype).expand(b, length - visible.shape[1], -1)
        full = torch.cat([visible, fill], dim=1)
        full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        full = full + self.pos_embed.to(x.dtype)
        x = torch.cat([x[:, :num_prefix], full], dim=1)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, num_prefix:])


def grid_of(vit: ViT, image_size: int) -> tuple[int, int]:
    p = patch_size(vit)
    grid = getattr(vit.patch_embed, "grid_size", None)
    if grid is not None:
        gh, gw = grid
        return int(gh), int(gw)
    side = image_size // p
    return side, side


__all__ = [
    "MAEDecoder",
    "check_vit",
    "encode_visible",
    "grid_of",
    "patch_size",
    "patchify",
    "random_masking",
    "sincos_pos_embed",
    "unpatchify",
]
