"""The method zoo on tiny timm backbones (test_resnet / test_vit, 32 px), one process, no
Ray: losses, gradients, EMA teachers, queues, frozen prototypes / last layers, MAE
masking, Feature Transformation, quality weights, collapse warnings, recipes. The EMA
teacher's checkpoint round trip is in test_engine.py, exact resume on Ray in test_train.py."""

from __future__ import annotations

import copy
import dataclasses
import glob
import os

import pytest
import torch
import torch.nn.functional as F

from raysl.config import load_config
from raysl.errors import UserError
from raysl.methods.base import METHODS, build_method, collapse_warning, method_class
from raysl.methods.losses import nt_xent

TINY = [
    "data.image_size=32",
    "method.proj_hidden_dim=32",
    "method.proj_dim=16",
    "method.pred_hidden_dim=32",
    "method.queue_size=40",
    "method.num_prototypes=12",
    "method.decoder_dim=32",
    "method.decoder_depth=1",
    "method.decoder_heads=4",
]
VALUES = {"lr": 0.1, "weight_decay": 0.0, "ema_momentum": 0.9, "teacher_temp": 0.04, "step": 0}
B = 6

# (method, backbone, number of views, local crop views at 16 px)
CASES = [
    ("simclr", "test_resnet", 2, 0),
    ("simclr", "test_vit", 2, 0),
    ("mocov2", "test_resnet", 2, 0),
    ("mocov3", "test_vit", 2, 0),
    ("byol", "test_resnet", 2, 0),
    ("swav", "test_resnet", 2, 2),
    ("swav", "test_vit", 2, 2),
    ("dino", "test_vit", 2, 2),
    ("dino", "test_resnet", 2, 2),
    ("mae", "test_vit", 1, 0),
    ("barlowtwins", "test_resnet", 2, 0),
    ("vicreg", "test_vit", 2, 0),
    ("simsiam", "test_resnet", 2, 0),
]


def tiny(name):
    """TINY's method keys that method `name` has (each method accepts only its own keys)."""
    keys = {f.name for f in dataclasses.fields(method_class(name).config_class)}
    return [o for o in TINY if not o.startswith("method.") or o.split("=")[0][len("method.") :] in keys]


def make(name, backbone="test_resnet", *extra):
    cfg = load_config("quickstart", [f"method.name={name}", f"model.backbone={backbone}", *tiny(name), *extra])
    torch.manual_seed(0)
    return build_method(cfg)


def views(n_global=2, n_local=0, b=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g) for _ in range(n_global)] + [
        torch.randn(b, 3, 16, 16, generator=g) for _ in range(n_local)
    ]


def step(method, vs, values=None, opt=None):
    values = {**VALUES, **(values or {})}
    out = method(vs, values)
    if opt is not None:
        opt.zero_grad()
    out["loss"].backward()
    if opt is not None:
        opt.step()
    method.after_step(values)
    return out


def test_all_methods_are_registered():
    method_class("simclr")
    assert {"simclr", "mocov2", "mocov3", "byol", "swav", "dino", "mae", "barlowtwins", "vicreg"} <= set(METHODS)


@pytest.mark.parametrize("name, backbone, n_global, n_local", CASES)
def test_forward_backward_reaches_the_backbone(name, backbone, n_global, n_local):
    m = make(name, backbone)
    out = m(views(n_global, n_local), VALUES)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert float(out["embedding_std"]) > 0 and m.embedding_dim > 0
    out["loss"].backward()
    grads = [p.grad for p in m.backbone.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    teachers = [mod for n, mod in m.named_children() if n.startswith("teacher_")]
    assert len(teachers) == len(getattr(m, "teacher_pairs", []))  # one naming scheme: teacher_<student>
    for t in teachers:  # teachers never get gradients and are not trainable
        assert all(not p.requires_grad and p.grad is None for p in t.parameters())


@pytest.mark.parametrize(
    "name, pairs",
    [
        ("byol", [("teacher_backbone", "backbone"), ("teacher_projector", "projector")]),
        ("mocov2", [("teacher_backbone", "backbone"), ("teacher_projector", "projector")]),
        ("mocov3", [("teacher_backbone", "backbone"), ("teacher_projector", "projector")]),
        ("dino", [("teacher_backbone", "backbone"), ("teacher_head", "head")]),
    ],
)
def test_ema_teacher_moves_by_the_formula(name, pairs):
    m = make(name, "test_resnet")
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    vs = views(2, 2 if name == "dino" else 0)
    before = {t: copy.deepcopy(getattr(m, t).state_dict()) for t, _ in pairs}
    out = m(vs, VALUES)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    students = {s: copy.deepcopy(getattr(m, s).state_dict()) for _, s in pairs}
    momentum = 0.7
    m.after_step({**VALUES, "ema_momentum": momentum})
    moved = 0
    for t, s in pairs:
        t_names = {n for n, _ in getattr(m, t).named_parameters()}
        after = getattr(m, t).state_dict()
        for key in t_names:
            want = momentum * before[t][key] + (1 - momentum) * students[s][key]
            torch.testing.assert_close(after[key], want)
            moved += int(not torch.equal(after[key], before[t][key]))
    assert moved > 0
    # momentum 1 keeps the teacher; momentum 0 copies the student
    snap = copy.deepcopy(m.state_dict())
    m.after_step({**VALUES, "ema_momentum": 1.0})
    for t, _ in pairs:
        for k, v in getattr(m, t).state_dict().items():
            assert torch.equal(v, snap[f"{t}.{k}"])
    m.after_step({**VALUES, "ema_momentum": 0.0})
    for t, s in pairs:
        sd = getattr(m, s).state_dict()
        for k, _ in getattr(m, t).named_parameters():
            assert torch.equal(getattr(m, t).state_dict()[k], sd[k])


def test_teacher_state_is_in_the_state_dict():
    m = make("dino", "test_vit")
    keys = m.state_dict().keys()
    assert any(k.startswith("teacher_backbone.") for k in keys) and "center" in keys
    assert (
        any(k.startswith("teacher_backbone.") for k in make("mocov2").state_dict())
        and "queue" in make("mocov2").state_dict()
    )


@pytest.mark.parametrize(
    "name, old, students",
    [
        ("byol", "target_", ["backbone", "projector"]),
        ("mocov2", "key_", ["backbone", "projector"]),
        ("mocov3", "momentum_", ["backbone", "projector"]),
        ("dino", "teacher_", ["backbone", "head"]),
    ],
)
def test_every_ema_teacher_is_named_teacher_and_old_checkpoint_keys_load(name, old, students):
    """One teacher abstraction (raysl.methods.teacher): the teachers of BYOL, MoCo v2/v3 and
    DINO are `teacher_<student>`; a state dict written before it (teachers under
    `target_`, `key_`, `momentum_`) loads strictly, its teacher weights landing in teacher_*."""
    m = make(name)
    assert m.teacher_pairs == students
    assert {n for n, _ in m.named_children() if n.startswith("teacher_")} == {f"teacher_{s}" for s in students}
    state = m.state_dict()
    old_state = {}
    for k, v in state.items():
        t = v.clone()
        if k.startswith("teacher_") and t.is_floating_point():
            t += 1.0  # a teacher that has moved away from the student
        old_state[old + k[len("teacher_") :] if k.startswith("teacher_") else k] = t
    if old != "teacher_":
        assert not any(k.startswith("teacher_") for k in old_state)
    fresh = make(name)
    fresh.load_state_dict(old_state, strict=True)
    for k, v in fresh.state_dict().items():
        want = state[k] + 1.0 if k.startswith("teacher_") and v.is_floating_point() else state[k]
        assert torch.equal(v, want), k


def test_mocov2_queue_enqueues_both_keys_at_the_pointer():
    m = make("mocov2")  # queue of 40, batch 6: two views -> 12 keys a step
    q0 = m.queue.clone()
    keys = torch.cat([m.keys(v) for v in views(2)])
    m(views(2), VALUES)
    assert int(m.queue_ptr) == 12
    torch.testing.assert_close(m.queue[:12], F.normalize(keys, dim=1))
    assert torch.equal(m.queue[12:], q0[12:])
    for _ in range(3):  # 12 * 4 = 48: wraps around a queue of 40
        m(views(2), VALUES)
    assert int(m.queue_ptr) == 48 % 40
    assert torch.allclose(m.queue.norm(dim=1), torch.ones(40))


def test_swav_prototypes_frozen_for_n_steps_then_learn():
    m = make("swav", "test_resnet", "method.freeze_prototypes_steps=2")
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    w0 = m.prototypes.normalized().detach().clone()
    for s in range(2):
        out = step(m, views(2, 2, seed=s), {"step": s}, opt)
        assert float(out["prototypes_frozen"]) == 1.0
        assert torch.count_nonzero(m.prototypes.weight.grad) == 0
        torch.testing.assert_close(m.prototypes.normalized(), w0)
    assert sum(float(p.grad.abs().sum()) for p in m.backbone.parameters()) > 0  # the rest learns meanwhile
    out = step(m, views(2, 2, seed=5), {"step": 2}, opt)
    assert float(out["prototypes_frozen"]) == 0.0
    assert m.prototypes.weight.grad.abs().sum() > 0
    assert not torch.allclose(m.prototypes.normalized(), w0)


def test_swav_queue_is_used_once_full():
    m = make("swav", "test_resnet", "method.swav_queue_size=12", "method.swav_queue_start=1")
    outs = [m(views(2, seed=s), {**VALUES, "step": s}) for s in range(4)]
    # batch 6 into a queue of 12: full after 2 steps; step 0 is before swav_queue_start
    assert [float(o["queue_used"]) for o in outs] == [0.0, 0.0, 1.0, 1.0]
    assert int(m.queue_count) == 12 and m.queue.abs().sum(-1).min() > 0


def test_dino_last_layer_frozen_centre_and_teacher_temperature():
    m = make("dino", "test_vit", "method.freeze_last_layer_steps=1")
    assert not m.head.last_layer.weight_g.requires_grad  # norm_last_layer: norm fixed to 1
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    out = step(m, views(2, 2), {"step": 0}, opt)
    assert torch.count_nonzero(m.head.last_layer.weight_v.grad) == 0
    assert m.head.mlp[0].weight.grad.abs().sum() > 0
    assert m.center.abs().sum() > 0  # the centre moved towards the teacher's mean
    assert 0.0 <= float(out["teacher_entropy"]) <= 1.0 and 0.0 <= float(out["teacher_mean_entropy"]) <= 1.0
    step(m, views(2, 2), {"step": 1}, opt)
    assert m.head.last_layer.weight_v.grad.abs().sum() > 0
    # the teacher temperature comes from the step's values
    a = m(views(2, 2), {**VALUES, "step": 5, "teacher_temp": 0.04})["loss"]
    b = m(views(2, 2), {**VALUES, "step": 5, "teacher_temp": 0.5})["loss"]
    assert not torch.isclose(a, b)


def test_mae_respects_the_mask_ratio():
    from raysl.models.mae import encode_visible, patchify, unpatchify

    m = make("mae", "test_vit", "method.mask_ratio=0.5", "data.image_size=64")  # 4x4 = 16 patches
    x = torch.randn(3, 3, 64, 64)
    tokens, mask, ids_restore = encode_visible(m.backbone, x, 0.5)
    assert mask.shape == (3, 16) and torch.all(mask.sum(1) == 8)
    assert tokens.shape[1] == 1 + 8  # CLS + visible patches
    assert not torch.equal(mask[0], mask[1])  # a fresh mask per image
    assert torch.equal(unpatchify(patchify(x, 16), 16, 64, 64), x)
    out = m([x], VALUES)
    assert float(out["mask_ratio"]) == 0.5
    m9 = make("mae", "test_vit", "method.mask_ratio=0.9", "data.image_size=64")
    _, mask9, _ = encode_visible(m9.backbone, x, 0.9)
    assert torch.all(mask9.sum(1) == 16 - 1)  # int(16 * 0.1) = 1 visible patch


def test_mae_needs_a_vit():
    with pytest.raises(UserError, match="mae needs a Vision Transformer.*test_resnet"):
        make("mae", "test_resnet")
    cfg = load_config("quickstart", ["method.name=mae", "model.backbone=resnet50"])
    with pytest.raises(UserError, match="resnet50"):
        method_class("mae").check_config(cfg)


@pytest.mark.parametrize("name", ["mocov2", "simclr"])
def test_feature_transformation_changes_scores_as_specified(name):
    m = make(name, "test_resnet", "method.ft_extrapolate=2.0", "method.ft_interpolate=1.6", "method.ft_every=2")
    vs = views(2)
    out = m(vs, {**VALUES, "step": 2})
    pos, pos_raw = out["hist_pos"], out["hist_pos_raw"]
    neg, neg_raw = out["hist_neg"], out["hist_neg_raw"]
    assert pos.shape == pos_raw.shape and neg.shape == neg_raw.shape
    # positive extrapolation makes every positive harder: cos(q', k') <= cos(q, k)
    assert torch.all(pos <= pos_raw + 1e-5) and (pos < pos_raw - 1e-4).any()
    assert not torch.allclose(neg, neg_raw)  # negatives were mixed
    assert torch.all(neg.abs() <= 1 + 1e-5)
    assert "hist_pos" not in m(vs, {**VALUES, "step": 3})  # only every ft_every steps
    # off by default: the plain loss, no histograms
    plain = make(name, "test_resnet", "method.ft_every=1")
    assert "hist_pos" not in plain(vs, VALUES)


def test_score_histograms_plot(tmp_path):
    from raysl.methods.feature_transform_plots import plot_score_histograms

    out = plot_score_histograms(
        torch.rand(50),
        torch.rand(500) * 2 - 1,
        7,
        str(tmp_path / "h" / "ft.png"),
        pos_raw=torch.rand(50),
        neg_raw=torch.rand(500),
    )
    assert os.path.getsize(out) > 1000


@pytest.mark.parametrize("backbone, size", [("test_resnet", 64), ("test_vit", 64)])
def test_quality_weights_in_range_and_differ_per_pair(backbone, size):
    m = make("simclr", backbone, "method.quality_weighting=true", f"data.image_size={size}")
    g = torch.Generator().manual_seed(3)
    vs = [torch.randn(B, 3, size, size, generator=g) for _ in range(2)]
    (_, sa), (_, sb) = m._encode(vs[0]), m._encode(vs[1])
    tokens, sal = sa
    assert sal.shape == tokens.shape[:2] and sal.min() >= 0 and torch.allclose(sal.amax(1), torch.ones(B))
    if backbone == "test_vit":
        assert m._captured is not None  # saliency from the CLS attention of the last block
    w, quality = m.quality_weights(sa, sb)
    assert w.shape == (B,) and torch.all(w > 0) and torch.all(w < B)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    assert torch.all(quality.abs() <= 2 + 1e-5)
    assert w.std() > 1e-4  # pairs are weighted differently
    out = m(vs, VALUES)
    assert torch.isfinite(out["loss"]) and "quality_mean" in out
    out["loss"].backward()
    assert sum(float(p.grad.abs().sum()) for p in m.backbone.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("backbone, calls", [("test_vit", 1), ("test_resnet", 2)])
def test_simclr_encodes_both_views_in_one_backbone_call_when_that_changes_nothing(backbone, calls):
    """One pass over both views on a ViT (what ZeRO-3 needs to free each gradient once);
    a ResNet keeps one pass per view so its batch norm sees each view's own batch."""
    m = make("simclr", backbone)
    seen = []
    m.backbone.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    vs = views()
    out = m(vs, VALUES)
    assert seen == [2 * B] if calls == 1 else seen == [B, B]
    per_view = [m.projector(m.backbone(v)) for v in vs]
    torch.testing.assert_close(out["loss"], nt_xent(*per_view, m.temperature), rtol=1e-5, atol=1e-6)


def flip_views(vs):
    """An 'extra views' generator for the hook test: horizontally flipped first view."""
    return [vs[0].flip(-1)]


def test_extra_views_hook():
    m = make("simclr", "test_resnet", "method.extra_views=test_methods:flip_views", "method.quality_weighting=true")
    assert m.extra_views is not None
    calls = []

    def gen(vs):
        calls.append(len(vs))
        return torch.stack([vs[0].flip(-1), vs[1].flip(-2)]).unbind(0)

    m.set_extra_views(gen)
    out = m(views(2), VALUES)
    assert calls == [2] and torch.isfinite(out["loss"])
    m.set_extra_views(lambda vs: vs[0][:, :, :16])
    with pytest.raises(ValueError, match="shape"):
        m(views(2), VALUES)
    with pytest.raises(UserError, match="method.extra_views"):
        make("simclr", "test_resnet", "method.extra_views=no_such_module:fn")


def test_collapse_warning():
    d = 128
    healthy = F.normalize(torch.randn(256, d), dim=1).std(0).mean()
    collapsed = F.normalize(torch.randn(1, d).expand(256, d) + 1e-4 * torch.randn(256, d), dim=1).std(0).mean()
    assert collapse_warning({"embedding_std": float(healthy), "step": 3}, d) is None
    msg = collapse_warning({"embedding_std": float(collapsed), "step": 3}, d)
    assert msg and "COLLAPSE" in msg and "step 3" in msg
    assert collapse_warning({"embedding_std": float("nan")}, d)
    assert collapse_warning({"embedding_std": float(healthy), "teacher_entropy": 0.999}, d)
    assert collapse_warning({"embedding_std": float(healthy), "teacher_mean_entropy": 0.001}, d)
    assert (
        collapse_warning({"embedding_std": float(healthy), "teacher_entropy": 0.3, "teacher_mean_entropy": 0.6}, d)
        is None
    )
    # a real method's metric on identical images: every embedding the same
    m = make("byol")
    x = torch.randn(1, 3, 32, 32).expand(B, 3, 32, 32).contiguous()
    m.eval()
    out = m([x, x], VALUES)
    assert collapse_warning({k: float(v) for k, v in out.items()}, m.embedding_dim)


def test_every_recipe_loads():
    import raysl

    paths = sorted(glob.glob(os.path.join(os.path.dirname(raysl.__file__), "recipes", "*.yaml")))
    names = {os.path.basename(p)[: -len(".yaml")] for p in paths}
    assert {"dino_vits16", "dino_resnet50", "mae_vitb16", "mae_medical_vitb16"} <= names
    methods = set()
    for p in paths:
        cfg = load_config(p)
        cls = method_class(cfg.method.name)
        cls.check_config(cfg)
        methods.add(cfg.method.name)
        # each recipe trains on its method's own views preset; the medical MAE recipe is the one
        # that names another (checked below)
        own = "mae_medical" if os.path.basename(p) == "mae_medical_vitb16.yaml" else cls.default_views
        assert (cfg.data.views or cls.default_views) == own, p
    assert methods == set(METHODS)
    medical = load_config("mae_medical_vitb16")
    assert medical.method.mask_ratio == 0.9 and medical.data.views == "mae_medical"
    from raysl.data.view_plans import view_spec

    assert view_spec(medical.data.views).crops[0].scale == (0.5, 1.0)
    for name in METHODS:  # a ResNet and a ViT recipe for every method (ViT-only methods: a ViT)
        backbones = {load_config(p).model.backbone for p in paths if load_config(p).method.name == name}
        assert any("vit" in b for b in backbones), name
        assert vit_only(name) or any("resnet" in b for b in backbones), name


def vit_only(name):
    """The method refuses a convnet backbone (MAE, iBOT, DINOv2, I-JEPA)."""
    try:
        method_class(name).check_config(
            load_config("quickstart", [f"method.name={name}", "model.backbone=test_resnet"])
        )
    except UserError as exc:
        assert "Vision Transformer" in str(exc), exc
        return True
    return False


def test_config_keys_are_range_checked():
    for method, bad, msg in [
        ("mae", "method.mask_ratio=1.0", r"mask_ratio: 1.0 is out of range"),
        ("mocov2", "method.queue_size=0", r"queue_size: 0 is out of range"),
        ("simclr", "method.ft_extrapolate=-1", r"ft_extrapolate: -1.0 is out of range"),
        ("simclr", "method.quality_weighting=maybe", r"quality_weighting: expected true or false"),
    ]:
        with pytest.raises(UserError, match=msg):
            load_config("quickstart", [f"method.name={method}", bad])
