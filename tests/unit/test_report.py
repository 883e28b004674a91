"""`raysl report`'s pictures: attention, saliency, patch-feature PCA, kNN curve."""

import os

import pytest
import torch
from PIL import Image

from raysl.eval.pictures import (
    has_patch_tokens,
    knn_curve,
    patch_maps,
    patch_pca,
    patch_pca_images,
    patch_tokens,
    saliency,
    saliency_figure,
)


def test_vit_attention_is_the_last_blocks_cls_row():
    import timm

    from raysl.data.views import normalize

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=0, img_size=48).eval()
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    maps, kind = patch_maps(model, images)
    attn = model.blocks[-1].attn
    assert kind == "attention" and attn.fused_attn == timm.layers.use_fused_attn()  # restored
    seen = {}
    hook = model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: seen.update(x=o))
    with torch.no_grad():
        model(normalize(images))
        hook.remove()
        x = seen["x"]
        b, n, _ = x.shape
        q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        weights = ((attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)).softmax(-1)
    expected = weights[:, :, 0, model.num_prefix_tokens :].mean(1).reshape(3, 3, 3)
    torch.testing.assert_close(maps, expected)
    up, _ = saliency(model, images)
    assert up.shape == (3, 48, 48) and float(up.min()) == 0.0 and float(up.max()) == 1.0


def test_convnet_gets_feature_norm_saliency_and_says_so(tmp_path):
    import timm

    from raysl.data.views import normalize

    model = timm.create_model("test_resnet", num_classes=0)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    maps, kind = patch_maps(model, images)
    feats = model.forward_features(normalize(images))
    assert kind == "feature norm"
    torch.testing.assert_close(maps, feats.norm(dim=1))
    caption = saliency_figure(model, images, str(tmp_path / "s.png"))
    assert "convnet" in caption and "no attention" in caption
    assert not has_patch_tokens(model)
    with pytest.raises(ValueError, match="not a ViT"):
        patch_tokens(model, images)
    assert Image.open(tmp_path / "s.png").size[0] > 100


def test_patch_pca_thresholds_the_first_component_over_all_images():
    import timm

    from raysl.data.views import normalize

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=0, reg_tokens=2, img_size=64).eval()
    images = torch.randint(0, 256, (3, 3, 64, 48), dtype=torch.uint8)  # not square: a 4 x 3 patch grid
    tokens = patch_tokens(model, images)
    with torch.no_grad():
        all_tokens = model.forward_features(normalize(images))
    assert model.num_prefix_tokens == 3 and tokens.shape == (3, 4, 3, 64)
    torch.testing.assert_close(tokens, all_tokens[:, 3:].reshape(3, 4, 3, 64))

    pictures, foreground = patch_pca_images(model, images)
    assert pictures.shape == (3, 64, 48, 3) and foreground.shape == (3, 4, 3)
    colours, same = patch_pca(tokens)
    assert torch.equal(same, foreground)
    assert torch.equal(pictures, colours.repeat_interleave(16, 1).repeat_interleave(16, 2))  # nearest
    # PC1 computed another way (top eigenvector of the covariance); the foreground is its smaller side
    centred = tokens.reshape(-1, 64).double() - tokens.reshape(-1, 64).double().mean(0)
    top = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -1]
    first = (centred @ top).reshape(3, 4, 3)
    positive = first > 0
    expected = positive if positive.sum() <= positive.numel() / 2 else ~positive
    assert 0 < int(foreground.sum()) <= foreground.numel() / 2
    assert torch.equal(foreground, expected)
    background = ~foreground.repeat_interleave(16, 1).repeat_interleave(16, 2)
    assert torch.all(pictures[background] == 0) and torch.all(colours[~foreground] == 0)
    lit = colours[foreground]  # min-max per component over all images together
    assert torch.equal(lit.min(0).values, torch.zeros(3)) and torch.equal(lit.max(0).values, torch.ones(3))


def test_patch_pca_finds_a_planted_object():
    """A yellow square on blue in three images and a fourth of blue only: the foreground is
    exactly the square (the smaller side), and the plain image is all background, since the
    first PCA is fitted over all images together."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=0, img_size=64).eval()
    images = torch.empty(4, 3, 64, 64, dtype=torch.uint8)
    images[:] = torch.tensor([30, 60, 200], dtype=torch.uint8)[:, None, None]
    images[:3, :, 16:48, 16:48] = torch.tensor([230, 200, 20], dtype=torch.uint8)[:, None, None]
    images = (images.int() + torch.randint(-10, 11, images.shape)).clamp(0, 255).to(torch.uint8)
    pictures, foreground = patch_pca_images(model, images)
    square = torch.zeros(4, 4, dtype=torch.bool)
    square[1:3, 1:3] = True
    assert torch.equal(foreground, torch.stack([square, square, square, torch.zeros_like(square)]))
    assert torch.all(pictures[:, :16] == 0) and torch.all(pictures[3] == 0)
    assert all(pictures[i, 16:48, 16:48].sum() > 0 for i in range(3))  # the square is coloured


def test_patch_pca_foreground_is_the_smaller_population_whatever_the_svd_sign():
    """Two planted token populations, the smaller one scattered over two 4 x 4 grids: it is
    the foreground for eight draws and for their negations (an SVD's sign is arbitrary)."""
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        common, rare = torch.randn(2, 32, generator=g)
        planted = torch.rand(2, 4, 4, generator=g) < 0.3
        tokens = torch.where(planted[..., None], rare, common) + 0.1 * torch.randn(2, 4, 4, 32, generator=g)
        assert 0 < int(planted.sum()) < planted.numel() / 2
        for signed in (tokens, -tokens):
            colours, foreground = patch_pca(signed)
            assert torch.equal(foreground, planted), seed
            assert torch.all(colours[~planted] == 0) and colours[planted].sum() > 0


def test_knn_curve_only_when_knn_was_logged(tmp_path):
    out = str(tmp_path / "knn.png")
    assert knn_curve([{"step": 1, "loss": 2.0}], out) is None and not os.path.exists(out)
    assert knn_curve([{"step": 1, "knn_top1": 30.0}, {"step": 2, "loss": 1.0}, {"step": 3, "knn_top1": 50.0}], out)
    assert Image.open(out).format == "PNG"
