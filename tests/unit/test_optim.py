"""raysl.optim.optimizers and the optim bench (unit tier, CPU)."""

import pytest
import torch
from torch import nn

from raysl.errors import UserError
from raysl.optim.optimizers import OPTIMIZERS, build_optimizer, optimizer_state_bytes, param_groups

CPU_OPTIMIZERS = [n for n in OPTIMIZERS if not n.startswith("paged_")]
PAGED = [n for n in OPTIMIZERS if n.startswith("paged_")]
LR = {
    "adamw": 1e-2,
    "sgd": 0.05,
    "lars": 1.0,
    "lamb": 1e-2,
    "adamw8bit": 1e-2,
    "lion8bit": 1e-3,
    "paged_adamw8bit": 1e-2,
    "paged_lion8bit": 1e-3,
}


class Tiny(nn.Module):
    """conv + norm + linear (64x64 = 4096 elements: big enough for bitsandbytes' 8-bit state)
    + a token listed in no_weight_decay(), like timm ViTs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LayerNorm(64)
        self.fc = nn.Linear(64, 64)
        self.token = nn.Parameter(torch.zeros(1, 1, 64))

    def no_weight_decay(self):
        return {"token"}

    def forward(self, x):  # x: (B, 3, 4, 4)
        h = self.conv(x).flatten(1) + self.token.flatten()
        return self.fc(self.norm(h))


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_split():
    m = Tiny()
    g = param_groups(m, 0.05)
    assert len(g) == 2
    decay, nodecay = g
    assert _names(m, decay) == {"conv.weight", "fc.weight"}
    assert _names(m, nodecay) == {"conv.bias", "norm.weight", "norm.bias", "fc.bias", "token"}
    assert (decay["weight_decay"], decay["wd_scale"], decay["lars_exclude"]) == (0.05, 1.0, False)
    assert (nodecay["weight_decay"], nodecay["wd_scale"], nodecay["lars_exclude"]) == (0.0, 0.0, True)
    # every trainable param exactly once
    ids = [id(p) for grp in g for p in grp["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters()) and len(set(ids)) == len(ids)


def test_param_groups_timm_vit_and_wrapped():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    wrapped = nn.ModuleDict({"backbone": vit, "head": nn.Linear(192, 8)})
    decay, nodecay = param_groups(wrapped, 0.04)
    nd = _names(wrapped, nodecay)
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight", "head.bias"} <= nd
    assert {"backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "head.weight"} <= _names(
        wrapped, decay
    )
    assert len(decay["params"]) + len(nodecay["params"]) == len(list(wrapped.parameters()))


def test_param_groups_split_partitioned_parameters_by_their_whole_shape():
    """Under ZeRO-3 the optimizer is built over partitioned parameters: p.data is an empty
    1-D tensor and the shape is in `ds_shape`; weights must still be decayed."""
    m = Tiny()
    want = [_names(m, grp) for grp in param_groups(m, 0.05)]
    for p in m.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    assert [_names(m, grp) for grp in param_groups(m, 0.05)] == want


def test_param_groups_frozen_params_left_out():
    m = Tiny()
    m.conv.requires_grad_(False)
    ids = {id(p) for grp in param_groups(m, 0.1) for p in grp["params"]}
    assert id(m.conv.weight) not in ids and id(m.conv.bias) not in ids


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_optimizer_lowers_loss(name):
    torch.manual_seed(0)
    m = Tiny()
    x, y = torch.randn(16, 3, 4, 4), torch.randn(16, 64)
    opt = build_optimizer(name, param_groups(m, 1e-4), lr=LR[name])

    def loss():
        return nn.functional.mse_loss(m(x), y)

    first = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < first
    assert optimizer_state_bytes(opt) > 0


def test_lars_excludes_norms_and_biases():
    opt = build_optimizer("lars", param_groups(Tiny(), 1e-6), lr=0.1)
    assert [g["always_adapt"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_unknown_and_paged_errors():
    g = param_groups(Tiny(), 0.0)
    with pytest.raises(UserError, match="adamw8bit"):  # lists the choices
        build_optimizer("adam8", g, lr=1e-3)
    with pytest.raises(UserError, match="lr"):
        build_optimizer("adamw", g, lr=-1.0)
    if not torch.cuda.is_available():
        for name in PAGED:
            with pytest.raises(UserError, match="GPU.*adamw8bit|GPU.*lion8bit"):
                build_optimizer(name, g, lr=1e-3)


def _step_once(model, opt):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def test_adamw8bit_state_is_uint8():
    m = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256))
    opt = build_optimizer("adamw8bit", param_groups(m, 0.05), lr=1e-3)
    _step_once(m, opt)
    big = opt.state[m[0].weight]
    assert big["state1"].dtype == torch.uint8 and big["state2"].dtype == torch.uint8
    assert big["absmax1"].numel() == 256 * 256 // 256
    assert opt.state[m[1].weight]["state1"].dtype == torch.float32  # < min_8bit_size stays 32-bit


def test_8bit_state_bytes_ratio():
    m = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512))
    n = sum(p.numel() for p in m.parameters())
    per_param = {}
    for name in ("adamw", "adamw8bit"):
        opt = build_optimizer(name, param_groups(m, 0.05), lr=1e-3)
        _step_once(m, opt)
        per_param[name] = optimizer_state_bytes(opt) / n
    assert 8.0 <= per_param["adamw"] < 8.1
    assert per_param["adamw8bit"] / per_param["adamw"] < 0.3


def test_state_bytes_counts_shared_qmap_once():
    m = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    opt = build_optimizer("adamw8bit", param_groups(m, 0.0), lr=1e-3)
    _step_once(m, opt)
    w = 128 * 128
    blocks = w // 256
    qmaps = 2 * 256 * 4
    per_weight = 2 * w + 2 * blocks * 4
    biases = 2 * (2 * 128 * 4)  # 32-bit state for the two biases
    assert optimizer_state_bytes(opt) == 2 * per_weight + qmaps + biases


def test_bench_tiny_model():
    from raysl.bench.optim import run_optim_bench

    r = run_optim_bench("resnet18")
    assert r["bench"] == "optim" and r["model"] == "resnet18"
    assert r["params"] == 11_689_512
    assert 8.0 <= r["adamw_bytes_per_param"] < 8.1
    assert 2.0 <= r["adamw8bit_bytes_per_param"] < r["adamw_bytes_per_param"]
    assert r["ratio"] == pytest.approx(r["adamw8bit_bytes_per_param"] / r["adamw_bytes_per_param"], abs=1e-3)
    assert 0 < r["adamw8bit_fp32_state_params"] < r["params"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", PAGED)
def test_paged_optimizers_step_on_cuda(name):
    torch.manual_seed(0)
    m = Tiny().cuda()
    x, y = torch.randn(16, 3, 4, 4, device="cuda"), torch.randn(16, 64, device="cuda")
    opt = build_optimizer(name, param_groups(m, 1e-4), lr=LR[name])
    first = nn.functional.mse_loss(m(x), y).item()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    torch.cuda.synchronize()
    assert nn.functional.mse_loss(m(x), y).item() < first
    assert opt.state[m.fc.weight]["state1"].dtype == torch.uint8
