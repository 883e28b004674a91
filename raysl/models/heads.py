"""Heads that sit on a backbone's pooled features: projector/predictor MLPs, SwAV
prototypes and the DINO head. Every head that reads its own weights does it inside its
own `forward`, so DeepSpeed ZeRO-3 gathers them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScaleBatchNorm1d(nn.BatchNorm1d):
    """Batch norm that learns a scale per feature but no shift (SimCLR's projector output,
    `center=False` in the paper's code)."""

    def __init__(self, dim: int):
        super().__init__(dim, affine=True)
        self.register_parameter("bias", None)


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    layers: int = 2,
    last_bn: bool = False,
    bn: bool = True,
    last_bn_scale: bool = False,
) -> nn.Sequential:
    """Projector/predictor MLP: (Linear-BN-ReLU) x (layers-1), then Linear (+BN without affine,
    or with a learned scale and no shift when `last_bn_scale`). `bn=False` drops the hidden BNs
    (MoCo v2's fc-relu-fc)."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden_dim, bias=not bn)]
        if bn:
            mods.append(nn.BatchNorm1d(hidden_dim))
        mods.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(ScaleBatchNorm1d(out_dim) if last_bn_scale else nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


class _ZeroGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


def frozen_if(x: torch.Tensor, frozen: bool) -> torch.Tensor:
    """`x` itself, but when `frozen` its gradient is exactly zero (a zero tensor, not None:
    DeepSpeed's gradient buckets see a normal gradient, and an optimizer with no history
    moves nothing). Used to freeze SwAV prototypes and DINO's last layer for N steps."""
    return _ZeroGrad.apply(x) if frozen else x


class Prototypes(nn.Module):
    """SwAV prototypes: scores of L2-normalised embeddings against L2-normalised prototype
    vectors. The prototypes are normalised in every forward (functionally, so DeepSpeed's
    fp32 master weights and the module agree); `frozen=True` gives them a zero gradient."""

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)

    def normalized(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=1)

    def forward(self, z: torch.Tensor, *, frozen: bool = False, extra: torch.Tensor | None = None):
        w = frozen_if(self.normalized(), frozen)
        scores = z @ w.t().to(z.dtype)
        if extra is None:
            return scores
        return scores, extra @ w.detach().t().to(extra.dtype)


class WeightNormLinear(nn.Module):
    """Linear without bias with weight g * v / ||v|| per output row (torch weight_norm,
    dim=0), written out so DeepSpeed and deepcopy see two plain parameters."""

    def __init__(self, in_dim: int, out_dim: int, *, fix_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def forward(self, x: torch.Tensor, *, frozen: bool = False) -> torch.Tensor:
        w = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(x, frozen_if(w, frozen).to(x.dtype))


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021): MLP (GELU, `layers` linear layers) to a
    bottleneck, L2 normalisation, then a weight-normalised linear layer to `out_dim`
    prototypes (norm fixed to 1 when `norm_last_layer`). Returns (logits, bottleneck)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        layers = max(layers, 1)
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                mods.append(nn.BatchNorm1d(hidden_dim))
            mods.append(nn.GELU())
            dim = hidden_dim
        mods.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor, *, freeze_last_layer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(z, frozen=freeze_last_layer), z
