"""Pictures of a trained backbone (PNG, matplotlib Agg): kNN accuracy over steps, where it
looks (ViT: the last block's CLS attention; convnets: feature-norm saliency), a PCA of a
ViT's patch features drawn as colours (DINOv2, Fig. 1), and a 2-D PCA of its features
coloured by label. Each *_figure function writes one PNG and returns a caption."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from raysl.models.backbone import TimmModel


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def knn_curve(rows: list[dict], out_path: str) -> str | None:
    """kNN top-1/top-5 over steps from metrics.jsonl rows (keys knn_top1*, knn_top5*); None
    when the run logged none."""
    keys = sorted({k for r in rows for k in r if k.startswith(("knn_top1", "knn_top5"))})
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), marker="o", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("kNN accuracy (%)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return "Weighted cosine kNN accuracy of the backbone's features on the labeled monitor set, over training steps."


def sample_images(shards: str, n: int, size: int) -> torch.Tensor:
    """The first `n` decodable images of a shard set, eval-resized to uint8 (n, 3, size, size)."""
    from raysl.data.decode import DecodeError
    from raysl.data.schema import read_shard, shard_files
    from raysl.data.view_plans import view_spec
    from raysl.data.views import make_views

    spec = view_spec("eval", global_size=size)
    out = []
    for path, mask in shard_files(shards):
        for data in read_shard(path, mask, ["image"]).column("image").to_pylist():
            try:
                out.append(make_views(data, 0, spec)[0])
            except DecodeError:
                continue
            if len(out) == n:
                return torch.from_numpy(np.stack(out))
    return torch.from_numpy(np.stack(out)) if out else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def _last_attention(backbone) -> TimmModel | None:
    blocks = getattr(backbone, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    usable = attn is not None and hasattr(attn, "attn_drop") and hasattr(attn, "fused_attn")
    return attn if usable and getattr(backbone, "cls_token", None) is not None else None


@torch.no_grad()
def patch_maps(backbone: TimmModel, images_uint8: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(maps (N, h, w) on the backbone's own grid, kind): "attention" for a ViT (CLS row of
    the last block's attention over the patches, mean over heads), else "feature norm" (L2
    norm over channels of the last feature map)."""
    from timm.utils import AttentionExtract

    from raysl.data.views import normalize

    x = normalize(images_uint8)
    backbone.eval()
    attn = _last_attention(backbone)
    if attn is None:
        feats = backbone.forward_features(x)
        if feats.dim() != 4:
            raise ValueError(f"no saliency for a backbone whose features are {tuple(feats.shape)}")
        return feats.float().norm(dim=1), "feature norm"
    fused, attn.fused_attn = attn.fused_attn, False  # the attention matrix exists only unfused
    try:
        name = f"blocks.{len(backbone.blocks) - 1}.attn.attn_drop"
        weights = next(iter(AttentionExtract(backbone, names=[name], method="hook")(x).values()))
    finally:
        attn.fused_attn = fused
    h, w = backbone.patch_embed.grid_size
    return weights[:, :, 0, backbone.num_prefix_tokens :].mean(1).reshape(-1, h, w), "attention"


def saliency(backbone: torch.nn.Module, images_uint8: torch.Tensor) -> tuple[torch.Tensor, str]:
    """`patch_maps` upsampled to the images' size, each scaled to [0, 1]."""
    maps, kind = patch_maps(backbone, images_uint8)
    maps = F.interpolate(maps[:, None].float(), size=images_uint8.shape[-2:], mode="bilinear", align_corners=False)[
        :, 0
    ]
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-12), kind


def _image_rows(images_uint8: torch.Tensor, draw_below, out_path: str) -> None:
    """A figure of the images in the top row and `draw_below(ax, i, image)` under each."""
    plt = _pyplot()
    n = images_uint8.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        img = images_uint8[i].permute(1, 2, 0).numpy()
        axes[0, i].imshow(img)
        draw_below(axes[1, i], i, img)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def saliency_figure(backbone: torch.nn.Module, images_uint8: torch.Tensor, out_path: str) -> str:
    """Images (top row) and their saliency overlaid (bottom row)."""
    maps, kind = saliency(backbone, images_uint8)

    def overlay(ax, i, img):
        ax.imshow(img)
        ax.imshow(maps[i].numpy(), cmap="inferno", alpha=0.55)

    _image_rows(images_uint8, overlay, out_path)
    if kind == "attention":
        return (
            "ViT attention maps: the CLS token's attention over the patches in the last block "
            "(mean over heads), upsampled and overlaid on each image."
        )
    return (
        "Feature-norm saliency (this backbone is a convnet, it has no attention to show): the L2 norm "
        "over channels of the last feature map, upsampled and overlaid on each image."
    )


def has_patch_tokens(backbone: torch.nn.Module) -> bool:
    """A timm ViT: `forward_features` gives prefix tokens, then one token per patch."""
    return hasattr(backbone, "num_prefix_tokens") and hasattr(
        getattr(backbone, "patch_embed", None), "dynamic_feat_size"
    )


@torch.no_grad()
def patch_tokens(backbone: TimmModel, images_uint8: torch.Tensor) -> torch.Tensor:
    """A ViT's last-layer patch tokens (after its final norm, prefix tokens dropped) as
    float32 (N, h, w, C) on the patch grid."""
    from raysl.data.views import normalize

    if not has_patch_tokens(backbone):
        raise ValueError(f"{type(backbone).__name__} is not a ViT: it has no patch tokens")
    backbone.eval()
    tokens = backbone.forward_features(normalize(images_uint8))
    h, w = backbone.patch_embed.dynamic_feat_size(tuple(images_uint8.shape[-2:]))
    return tokens[:, backbone.num_prefix_tokens :].float().reshape(len(images_uint8), h, w, -1)


def _principal_scores(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of `x` (M, C) projected on their first `k` principal components (M, k); exact
    SVD, zero columns where x has fewer than k components."""
    centred = x - x.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    scores = centred @ vh[:k].T
    return F.pad(scores, (0, k - scores.shape[1]))


def patch_pca(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2's patch PCA over all images together: (colours (N, h, w, 3) in [0, 1],
    foreground (N, h, w) bool) from tokens (N, h, w, C). Foreground: PC1 > 0, PC1's sign
    chosen so that the foreground is the smaller side (an SVD's sign is arbitrary; objects
    usually cover less of an image than their background). The colours are the first three
    components of a second PCA of the foreground patches only, each min-max scaled over all
    images; background is 0 (black)."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    first = _principal_scores(flat, 1)[:, 0]
    if 2 * int((first > 0).sum()) > len(first):
        first = -first
    foreground = first > 0
    colours = torch.zeros(len(flat), 3)
    if foreground.any():
        scores = _principal_scores(flat[foreground], 3)
        lo, hi = scores.min(0).values, scores.max(0).values
        colours[foreground] = (scores - lo) / (hi - lo).clamp_min(1e-12)
    return colours.reshape(*tokens.shape[:-1], 3), foreground.reshape(tokens.shape[:-1])


def patch_pca_images(backbone: torch.nn.Module, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`patch_pca` of the backbone's patch tokens, each patch grid upsampled (nearest) to
    the images' size: (pictures (N, H, W, 3) in [0, 1], foreground (N, h, w))."""
    colours, foreground = patch_pca(patch_tokens(backbone, images_uint8))
    pictures = F.interpolate(colours.permute(0, 3, 1, 2), size=images_uint8.shape[-2:], mode="nearest")
    return pictures.permute(0, 2, 3, 1), foreground


def patch_pca_figure(backbone: torch.nn.Module, images_uint8: torch.Tensor, out_path: str) -> str:
    """Images (top row) and their patch-feature PCA (bottom row)."""
    pictures, foreground = patch_pca_images(backbone, images_uint8)
    n = images_uint8.shape[0]
    _image_rows(images_uint8, lambda ax, i, img: ax.imshow(pictures[i].numpy(), interpolation="nearest"), out_path)
    return (
        f"PCA of the ViT's last-layer patch features (after the final norm, without prefix tokens) over "
        f"the patches of all {n} images together, as in DINOv2: patches with first component > 0 are "
        f"foreground ({int(foreground.sum())} of {foreground.numel()}; the component's sign is chosen so that "
        "the foreground is the smaller side), the rest is black. The foreground's colours are the first three "
        "components of a second PCA of the foreground patches only, as RGB, each scaled to [0, 1] over all images."
    )


def embedding_figure(backbone: torch.nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, out_path: str) -> str:
    """The backbone's L2-normalised features projected to 2-D with PCA, coloured by label."""
    from sklearn.decomposition import PCA

    from raysl.eval.knn import extract_features

    feats = extract_features(backbone, images_uint8).numpy()
    pca = PCA(n_components=2, random_state=0)
    xy = pca.fit_transform(feats)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap="tab10" if int(labels.max()) < 10 else "tab20", s=14)
    ax.legend(*points.legend_elements(), title="label", fontsize="small", loc="best")
    ev = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC 1 ({100 * ev[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ev[1]:.0f}% of variance)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return (
        f"PCA of the backbone's L2-normalised features of {len(labels)} labeled evaluation images, "
        "coloured by label (labels were never used in training)."
    )
