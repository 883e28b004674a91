"""SimCLR (Chen et al. 2020): two views, MLP projector, NT-Xent over the global batch;
optionally with Feature Transformation (Zhu et al. 2021) and GenView-style
quality-driven contrast (Li et al. 2024) with user-generated extra views."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raysl.checks import between
from raysl.errors import UserError
from raysl.methods.base import Method, register
from raysl.methods.common import embedding_std, encode_views, is_vit, make_backbone, register_external_params, step_of
from raysl.methods.distributed import all_reduce_sum, gather_no_grad, world
from raysl.methods.feature_transform_plots import draw_score_histograms
from raysl.methods.keys import FeatureTransformKeys, MethodConfig, ProjectorKeys, TemperatureKeys, key
from raysl.methods.losses import feature_transform, nt_xent, nt_xent_weighted, pos_neg_scores
from raysl.models.heads import mlp


def load_callable(spec: str, key: str = "method.extra_views"):
    """ "package.module:function" -> the function (a UserError naming `key` otherwise)."""
    if ":" not in spec:
        raise UserError(f"config key {key}: {spec!r} should be 'package.module:function'")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"config key {key}: cannot import {spec!r} ({exc})") from exc
    if not callable(fn):
        raise UserError(f"config key {key}: {spec!r} is not callable")
    return fn


def _weighted_mean(terms: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-anchor terms (2B,), each pair's two anchors weighted by weights (B,)
    normalised to mean 1 over the global batch (as nt_xent_weighted)."""
    if weights is None:
        return terms.mean()
    w = weights.detach().to(terms.dtype)
    mean = all_reduce_sum(w.sum()) / (w.numel() * world()[1])
    return (terms * (w / mean.clamp_min(torch.finfo(w.dtype).tiny)).repeat(2)).mean()


@dataclass
class SimCLRConfig(FeatureTransformKeys, TemperatureKeys, ProjectorKeys, MethodConfig):
    quality_weighting: bool = key(False, "GenView-style quality-driven weighting of positive pairs")
    quality_temp: float = key(0.5, "softmax temperature over the quality scores", **between(0.0, lo_open=True))
    extra_views: str = key("", "`package.module:function` mapping a batch's views to extra (generated) views")


@register("simclr")
class SimCLR(Method):
    """SimCLR. Config keys (section `method`): temperature, proj_hidden_dim, proj_dim,
    proj_layers, and the options below.

    Feature Transformation (Zhu et al. 2021), `ft_extrapolate` / `ft_interpolate` > 0
    (Beta concentrations, paper: 2.0 / 1.6): the anchors and their positives are
    extrapolated apart (harder positives) and the negatives -- the other images of the
    global batch, used as constants (no gradient through negatives in this mode, as in
    MoCo) -- are mixed pairwise (more diverse negatives), via `losses.feature_transform`.
    Every `ft_every` steps the output also carries the cosine-score distributions
    "hist_pos"/"hist_neg" (as scored by the loss) and "hist_pos_raw"/"hist_neg_raw"
    (before the transformation), 1-D tensors for `feature_transform_plots.plot_score_histograms`.

    Quality-driven contrast (GenView, Li et al. 2024), `quality_weighting: true`: each
    positive pair gets a weight from a quality score = cos(foreground_a, foreground_b) -
    cos(background_a, background_b) (similar objects, diverse backgrounds score high),
    weights = B * softmax(score / quality_temp) (detached; `nt_xent_weighted` renormalises
    them to mean 1 over the global batch). Foreground/background are saliency-weighted
    averages of the backbone's own last feature map: the channel-norm of the last conv
    feature map for convnets, the CLS token's attention in the last block for ViTs
    (token norm for ViTs without a CLS token); saliency s is scaled to max 1 per image and
    the background weight is 1 - s. Metrics: "quality_mean", "quality_weight_max".

    Extra generated views (the GenView hook): a callable that maps a batch to additional
    views of the same images, e.g. a diffusion model's image variations. Plug it in with
    the config key `method.extra_views: "package.module:function"` (imported on every
    worker) or in code with `method.set_extra_views(fn)`. It is called under no_grad as
    `fn(views)` with this step's list of views (float tensors (B, 3, H, W),
    ImageNet-normalised, on the worker's device) and returns a tensor or a list of
    tensors with the shape of views[0], normalised the same way. Each extra view e forms
    one more positive pair (view 0, e); the loss is the mean over all pairs (each
    quality-weighted when that is on, each with FT when that is on).
    """

    config_class = SimCLRConfig
    default_views = "simclr"
    bench_overrides = (
        "data.views=mocov2",
        "method.temperature=0.2",
    )
    _captured: torch.Tensor | None  # the last block's input, when quality_weighting hooks it

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.temperature = m.temperature
        self.backbone = make_backbone(cfg)
        # the paper's code normalises the projection too (batch norm with a scale, no shift):
        # without it the embeddings drift towards one direction within a few dozen steps
        self.projector = mlp(
            self.backbone.num_features,
            m.proj_hidden_dim,
            m.proj_dim,
            layers=m.proj_layers or 2,
            last_bn=True,
            last_bn_scale=True,
        )
        self.embedding_dim = m.proj_dim
        self.ft_extrapolate = m.ft_extrapolate or None
        self.ft_interpolate = m.ft_interpolate or None
        self.ft_every = m.ft_every
        self.quality_weighting = m.quality_weighting
        self.quality_temp = m.quality_temp
        self.extra_views = load_callable(m.extra_views) if m.extra_views else None
        self._captured = None
        if self.quality_weighting:  # forward_features bypasses the backbone's own forward
            register_external_params(self, self.backbone)
        if self.quality_weighting and is_vit(self.backbone) and getattr(self.backbone, "cls_token", None) is not None:
            self.backbone.blocks[-1].norm1.register_forward_hook(self._capture_last_block_input)

    def set_extra_views(self, fn) -> None:
        """Register the extra-views callable (see the class docstring); None removes it."""
        if fn is not None and not callable(fn):
            raise TypeError("extra_views must be callable")
        self.extra_views = fn

    # --- encoders -------------------------------------------------------------------

    def _capture_last_block_input(self, module, inputs, output):
        self._captured = output.detach()

    def _encode(self, x: torch.Tensor):
        """(projection, (tokens (B, L, C), saliency (B, L))) for quality weighting."""
        self._captured = None
        feats = self.backbone.forward_features(x)
        h = self.backbone.forward_head(feats)
        return self.projector(h), self._saliency(feats)

    @torch.no_grad()
    def _saliency(self, feats: torch.Tensor):
        bb = self.backbone
        if feats.dim() == 4:  # convnet feature map
            if getattr(bb, "output_fmt", "NCHW") == "NHWC":
                feats = feats.permute(0, 3, 1, 2)
            tokens = feats.flatten(2).transpose(1, 2)  # (B, HW, C)
            sal = tokens.norm(dim=-1)
        else:  # ViT tokens (B, N, D)
            npt = getattr(bb, "num_prefix_tokens", 0)
            tokens = feats[:, npt:]
            sal = self._cls_attention(npt) if self._captured is not None else None
            if sal is None or sal.shape != tokens.shape[:2]:
                sal = tokens.norm(dim=-1)
        sal = sal.float()
        sal = sal / sal.amax(dim=1, keepdim=True).clamp_min(1e-12)
        return tokens.float(), sal

    def _cls_attention(self, npt: int):
        """Attention of the CLS token over the patch tokens in the last block, mean over heads."""
        attn = self.backbone.blocks[-1].attn
        x = self._captured
        assert x is not None  # set by the hook on the last block's norm1
        if not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
            return None
        b, n, _ = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
        k = attn.k_norm(k) if hasattr(attn, "k_norm") else k
        scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
        a = ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, N)
        return a[:, :, 0, npt:].mean(dim=1)

    @torch.no_grad()
    def quality_weights(self, a, b) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (B,), quality scores (B,)) for the pairs of views with saliency maps a, b
        ((tokens, saliency) from `_encode`)."""

        def pools(tokens, sal):
            fg = (sal.unsqueeze(-1) * tokens).sum(1) / sal.sum(1, keepdim=True).clamp_min(1e-6)
            bgw = 1 - sal
            bg = (bgw.unsqueeze(-1) * tokens).sum(1) / bgw.sum(1, keepdim=True).clamp_min(1e-6)
            return fg, bg

        fg_a, bg_a = pools(*a)
        fg_b, bg_b = pools(*b)
        quality = F.cosine_similarity(fg_a, fg_b, dim=1) - F.cosine_similarity(bg_a, bg_b, dim=1)
        weights = quality.shape[0] * torch.softmax(quality / self.quality_temp, dim=0)
        return weights, quality

    # --- losses ---------------------------------------------------------------------

    def _ft_loss(self, za: torch.Tensor, zb: torch.Tensor, weights, want_hist: bool):
        """NT-Xent with Feature Transformation: 2B anchors per worker, positives the other
        view, negatives all other embeddings of the global batch (constants)."""
        rank, _ = world()
        b = za.shape[0]
        anchors = torch.cat([za, zb])
        keys = torch.cat([zb, za])
        bank = gather_no_grad(anchors)  # (2B*W, d), worker-major
        q, k, n = feature_transform(
            anchors, keys, bank, extrapolate=self.ft_extrapolate, interpolate=self.ft_interpolate
        )
        rows = torch.arange(2 * b, device=za.device)
        own = rows + rank * 2 * b
        positive = own + torch.where(rows < b, b, -b)
        drop = torch.zeros(2 * b, bank.shape[0], dtype=torch.bool, device=za.device)
        drop[rows, own] = True
        drop[rows, positive] = True
        neg = (q @ n.t()).masked_fill(drop, float("-inf"))
        logits = torch.cat([(q * k).sum(1, keepdim=True), neg], dim=1) / self.temperature
        terms = F.cross_entropy(logits, torch.zeros(2 * b, dtype=torch.long, device=za.device), reduction="none")
        hist = {}
        if want_hist:
            keep = ~drop
            pos, neg_s = pos_neg_scores(q, k, n)
            pos_raw, neg_raw = pos_neg_scores(anchors, keys, bank)
            hist = {
                "hist_pos": pos,
                "hist_neg": neg_s.view(2 * b, -1)[keep],
                "hist_pos_raw": pos_raw,
                "hist_neg_raw": neg_raw.view(2 * b, -1)[keep],
            }
        return _weighted_mean(terms, weights), hist

    def draw(self, out: dict, step: int, folder: str) -> None:
        draw_score_histograms(out, step, folder)

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        views = list(views[:2])
        if self.extra_views is not None:
            with torch.no_grad():
                extra = self.extra_views(views)
            extra = [extra] if torch.is_tensor(extra) else list(extra)
            for e in extra:
                if e.shape != views[0].shape:
                    raise ValueError(
                        f"extra_views returned a view of shape {tuple(e.shape)}; expected {tuple(views[0].shape)}"
                    )
            views += [e.to(views[0].dtype) for e in extra]
        if self.quality_weighting:
            encoded = [self._encode(v) for v in views]
        else:
            encoded = [(self.projector(h), None) for h in encode_views(self.backbone, views)]
        pairs = [(0, j) for j in range(1, len(views))]
        use_ft = self.ft_extrapolate is not None or self.ft_interpolate is not None
        want_hist = use_ft and self.ft_every > 0 and step_of(values) % self.ft_every == 0
        out: dict[str, torch.Tensor] = {}
        losses, qualities, weights_all = [], [], []
        for n_pair, (i, j) in enumerate(pairs):
            (za, sa), (zb, sb) = encoded[i], encoded[j]
            weights = None
            if self.quality_weighting:
                weights, quality = self.quality_weights(sa, sb)
                qualities.append(quality)
                weights_all.append(weights)
            if use_ft:
                loss, hist = self._ft_loss(za, zb, weights, want_hist and n_pair == 0)
                out.update(hist)
            elif weights is not None:
                loss = nt_xent_weighted(za, zb, self.temperature, weights)
            else:
                loss = nt_xent(za, zb, self.temperature)
            losses.append(loss)
        out["loss"] = torch.stack(losses).mean()
        out["embedding_std"] = embedding_std(encoded[0][0])
        if qualities:
            out["quality_mean"] = torch.cat(qualities).mean()
            out["quality_weight_max"] = torch.cat(weights_all).max()
        return out
