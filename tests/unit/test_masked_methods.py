"""iBOT, DINOv2 and I-JEPA: the token-level ViT passes they add (raysl.models.tokens), what
each method does with its masks, and their config errors. Their losses are checked against
reference formulas in test_losses.py (2 processes: test_losses_distributed.py), their
engine runs in test_engine.py and test_zero3.py."""

import numpy as np
import pytest
import torch

from raysl.config import load_config
from raysl.data.masks import draw_masks
from raysl.errors import UserError
from raysl.methods.base import build_method, method_class
from raysl.methods.losses import self_distillation_loss, sinkhorn
from raysl.models.backbone import create_backbone
from raysl.models.jepa import JEPAPredictor
from raysl.models.tokens import indices_of, vit_tokens, vit_tokens_of
from raysl.train.batch import Batch, forward
from raysl.train.run_views import spec_for

B = 4
VALUES = {"step": 0, "teacher_temp": 0.05, "ema_momentum": 0.9}


def vit(**kw):
    torch.manual_seed(0)
    return create_backbone("test_vit", img_size=64, **kw).eval()


def images(n=B, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def setup(name, *extra):
    """A small method of `name` (its bench settings) and its spec."""
    cls = method_class(name)
    cfg = load_config(
        "quickstart",
        [f"method.name={name}", *cls.bench_overrides, *(["method.proj_hidden_dim=32"] if name != "ijepa" else [])]
        + list(extra),
    )
    cls.check_config(cfg)
    torch.manual_seed(0)
    return build_method(cfg), spec_for(cfg, cls)


def batch_for(spec, seeds, *, masks=True):
    g = torch.Generator().manual_seed(int(seeds[0]))
    views = [torch.randn(len(seeds), 3, c.size, c.size, generator=g) for c in spec.per_view()]
    m = torch.from_numpy(np.stack([draw_masks(spec.masks, s) for s in seeds])).bool()
    return Batch(views, m if masks else torch.zeros_like(m))


# ---------------------------------------------------------------- token passes


def test_vit_tokens_without_a_mask_are_timms_forward_features():
    model = vit()
    x = images()
    with torch.no_grad():
        assert torch.allclose(vit_tokens(model, x), model.forward_features(x), atol=1e-6)


def test_masked_patches_carry_the_mask_token_not_the_image():
    """Under the mask, the image's pixels do not reach the tokens: two images that differ only
    inside the masked patches give the same tokens everywhere."""
    model = vit()
    token = torch.randn(model.num_features)
    mask = torch.zeros(B, 16, dtype=torch.bool)
    mask[:, [0, 1, 4, 5]] = True  # the top-left 32x32 px
    a = images()
    b = a.clone()
    b[:, :, :32, :32] = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        ta, tb = (vit_tokens(model, x, mask=mask, mask_token=token) for x in (a, b))
        assert torch.allclose(ta, tb, atol=1e-6)
        assert not torch.allclose(vit_tokens(model, a), vit_tokens(model, b), atol=1e-3)


def test_padding_is_hidden_from_attention():
    """A subset of patches gives the same tokens alone as padded next to a longer subset."""
    model = vit()
    x = images(2)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[0, [1, 2, 7]] = True
    keep[1, :12] = True
    at, valid = indices_of(keep)
    assert at.shape == (2, 12) and valid.sum(1).tolist() == [3, 12] and at[0, :3].tolist() == [1, 2, 7]
    with torch.no_grad():
        together = vit_tokens_of(model, x, at, valid)
        alone = vit_tokens_of(model, x[:1], at[:1, :3], valid[:1, :3])
    assert torch.allclose(together[0, : 1 + 3], alone[0], atol=1e-5)  # the cls token and 3 patches


def test_predictor_predicts_each_image_and_block_independently_of_the_batch():
    torch.manual_seed(0)
    pred = JEPAPredictor(24, (4, 4), dim=16, depth=2, heads=2).eval()
    ctx = torch.randn(2, 10, 24)
    c_valid = torch.ones(2, 10, dtype=torch.bool)
    c_valid[0, 4:] = False
    c_at = torch.arange(10).repeat(2, 1)
    t_at = torch.tensor([[[12, 13, 0], [14, 15, 11]], [[10, 11, 12], [13, 14, 15]]])
    t_valid = torch.tensor([[[1, 1, 0], [1, 1, 1]], [[1, 1, 1], [1, 1, 1]]], dtype=torch.bool)
    with torch.no_grad():
        both = pred(ctx, c_at, c_valid, t_at, t_valid)
        alone = pred(ctx[:1, :4], c_at[:1, :4], c_valid[:1, :4], t_at[:1, :1, :2], t_valid[:1, :1, :2])
    assert both.shape == (2, 2, 3, 24)
    assert torch.allclose(both[0, 0, :2], alone[0, 0], atol=1e-5)


# ---------------------------------------------------------------- the methods


@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_masked_patch_loss_needs_masks_and_trains_the_mask_token(name):
    model, spec = setup(name)
    seeds = np.arange(B) + 7
    out = forward(model, batch_for(spec, seeds, masks=False), VALUES)
    out["loss"].backward()
    assert float(out["patch_loss"]) == 0.0 and float(out["masked"]) == 0.0
    assert model.mask_token.grad is None or not model.mask_token.grad.any()
    model.zero_grad()
    batch = batch_for(spec, seeds)
    assert batch.masks.any()
    out = forward(model, batch, VALUES)
    out["loss"].backward()
    assert float(out["patch_loss"]) > 0 and float(out["masked"]) == float(batch.masks.float().mean())
    assert model.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("teacher_"))
    with pytest.raises(ValueError, match="patch masks"):
        model(batch.views, VALUES)


def test_ibot_centres_move_dinov2_centres_by_sinkhorn_knopp():
    ibot, spec = setup("ibot")
    batch = batch_for(spec, np.arange(B))
    center = ibot.center.clone()
    forward(ibot, batch, VALUES)
    assert not torch.equal(ibot.center, center) and ibot.patch_center.abs().sum() > 0

    dinov2, spec = setup("dinov2", "method.koleo_weight=0")
    assert not hasattr(dinov2, "center")
    out = forward(dinov2, batch, VALUES)
    with torch.no_grad():  # the [CLS] loss by hand: teacher logits -> Sinkhorn-Knopp at the teacher temperature
        views = batch.views
        t = dinov2.teacher_head(dinov2.teacher_backbone(torch.cat(views[:2])))[0]
        probs = list(sinkhorn(t, VALUES["teacher_temp"], 3).chunk(2))
        m = batch.masks.unbind(1)
        student = []
        for v, mask in zip(views[:2], m):
            tok = vit_tokens(dinov2.backbone, v, mask=mask.flatten(1), mask_token=dinov2.mask_token)
            student.append(dinov2.head(dinov2.backbone.forward_head(tok, pre_logits=True))[0])
        want = self_distillation_loss(student, probs, 0.1)
    assert torch.allclose(out["cls_loss"], want, atol=1e-5)


def test_dinov2_koleo_joins_the_loss_with_its_weight():
    model, spec = setup("dinov2", "method.koleo_weight=0.5")
    out = forward(model, batch_for(spec, np.arange(B)), VALUES)
    assert float(out["loss"]) == pytest.approx(float(out["cls_loss"] + out["patch_loss"] + out["koleo"]), rel=1e-6)
    assert float(out["koleo"]) != 0


def test_dinov2_separate_head_has_its_own_teacher():
    model, _ = setup("dinov2", "method.separate_head=true", "method.patch_prototypes=48")
    assert model.patch_head.last_layer.weight_v.shape[0] == 48
    assert "patch_head" in model.teacher_pairs and hasattr(model, "teacher_patch_head")


def test_ijepa_predicts_target_blocks_from_the_context():
    model, spec = setup("ijepa")
    batch = batch_for(spec, np.arange(B) + 3)
    planes = batch.masks.flatten(2)
    assert not (planes[:, :1] & planes[:, 1:]).any()  # targets are never context
    out = forward(model, batch, VALUES)
    out["loss"].backward()
    assert float(out["context"]) == float(planes[:, 0].sum(1).float().mean())
    assert float(out["target"]) == float(planes[:, 1:].sum((1, 2)).float().mean())
    assert model.predictor.mask_token.grad.abs().sum() > 0 and model.backbone.pos_embed.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher_backbone.parameters())
    with pytest.raises(ValueError, match="masks"):
        model(batch.views, VALUES)


def test_masks_come_from_the_row_seeds_so_a_batch_repeats_exactly():
    model, spec = setup("ijepa")
    a, b = batch_for(spec, np.arange(B)), batch_for(spec, np.arange(B))
    assert torch.equal(a.masks, b.masks)
    with torch.no_grad():
        assert float(forward(model, a, VALUES)["loss"]) == float(forward(model, b, VALUES)["loss"])
    assert not torch.equal(a.masks, batch_for(spec, np.arange(B) + 100).masks)


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("ibot", ["model.backbone=test_resnet"], "method ibot needs a Vision Transformer"),
        ("dinov2", ["model.backbone=test_resnet"], "method dinov2 needs a Vision Transformer"),
        ("ijepa", ["model.backbone=test_resnet"], "method ijepa needs a Vision Transformer"),
        ("ibot", ["method.mask_ratio_min=0.6"], "method.mask_ratio_min: 0.6 is above method.mask_ratio_max"),
        ("ijepa", ["method.predictor_dim=30", "method.predictor_heads=5"], "predictor_dim: 30 is not a multiple of 4"),
        ("ijepa", ["method.predictor_heads=5"], "predictor_heads: 5 does not divide"),
        ("ijepa", ["method.target_scale_min=0.5"], "target_scale_min: it is above method.target_scale_max"),
    ],
)
def test_config_errors_name_the_key(name, overrides, match):
    cls = method_class(name)
    cfg = load_config("quickstart", [f"method.name={name}", *cls.bench_overrides, *overrides])
    with pytest.raises(UserError, match=match):
        cls.check_config(cfg)


def test_crop_sizes_must_fit_the_patches():
    cfg = load_config("dinov2_vits14", ["model.backbone=vit_tiny_patch16_224"])  # its 98 px local crops
    with pytest.raises(UserError, match=r"data.local_size: local crops of 98 px .* 16 px patches"):
        spec_for(cfg, method_class("dinov2"))
    cfg = load_config(
        "quickstart", ["method.name=ijepa", "data.views=ijepa", "model.backbone=test_vit", "data.image_size=72"]
    )
    with pytest.raises(UserError, match="data.image_size: 72 px is not a multiple of the 16 px patches"):
        spec_for(cfg, method_class("ijepa"))
    cfg = load_config(
        "quickstart",
        ["method.name=ijepa", "data.views=ijepa", "data.image_size=0", "model.backbone=vit_small_patch14_dinov2"],
    )
    with pytest.raises(UserError, match="data.image_size: the crops are 224 px"):
        spec_for(cfg, method_class("ijepa"))


def test_views_made_on_the_worker_are_refused_for_masks_and_the_eval_view():
    overrides = ["method.name=ibot", "model.backbone=test_vit", *method_class("ibot").bench_overrides]
    cfg = load_config("quickstart", [*overrides, "data.augment_on=worker"])
    with pytest.raises(UserError, match=r"data.augment_on: 'worker' .* ibot .*data.augment_on=tasks"):
        spec_for(cfg, method_class("ibot"))
    assert spec_for(load_config("quickstart", overrides), method_class("ibot")).masks is not None
    cfg = load_config(
        "quickstart", ["method.name=mae", "model.backbone=test_vit", "data.views=eval", "data.augment_on=worker"]
    )
    with pytest.raises(UserError, match=r"data.augment_on: 'worker' makes training views, not the eval view"):
        spec_for(cfg, method_class("mae"))
