"""Config keys (section `method`) that several methods share. A method's own config class
combines the groups it reads with its own keys, so `method.<key>` of another method is an
error naming the key, and the key table of docs/methods.md is written from these dataclasses
(`raysl.methods.docs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raysl.checks import between


def key(default, help: str, **check):
    """A config key: its default, its description (docs/methods.md), and its checks (checks.between / one_of)."""
    return field(default=default, metadata={"help": help, **check})


@dataclass
class MethodConfig:
    """Keys of every method."""

    name: str = key("simclr", "the method (`raysl.methods`)")


@dataclass
class ProjectorKeys:
    proj_hidden_dim: int = key(2048, "hidden width of the projector / head MLP", **between(1))
    proj_dim: int = key(128, "output (embedding) size of the projector; DINO: the head's bottleneck", **between(1))
    proj_layers: int = key(0, "projector depth; 0: the method's usual depth", **between(0))


@dataclass
class PredictorKeys:
    pred_hidden_dim: int = key(4096, "hidden width of the 2-layer predictor", **between(1))


@dataclass
class TemperatureKeys:
    temperature: float = key(0.1, "softmax temperature of the contrastive loss", **between(0.0, lo_open=True))


@dataclass
class EMAKeys:
    """An EMA teacher: momentum cosine-scheduled from ema_momentum to ema_momentum_end."""

    ema_momentum: float = key(0.996, "EMA teacher momentum at step 0", **between(0.0, 1.0))
    ema_momentum_end: float = key(1.0, "EMA teacher momentum at the last step (cosine schedule)", **between(0.0, 1.0))


@dataclass
class FeatureTransformKeys:
    """Feature Transformation (Zhu et al. 2021): Beta concentrations, 0 = off."""

    ft_extrapolate: float = key(0.0, "positive extrapolation, Beta concentration (paper: 2.0); 0: off", **between(0.0))
    ft_interpolate: float = key(0.0, "negative interpolation, Beta concentration (paper: 1.6); 0: off", **between(0.0))
    ft_every: int = key(0, "draw positive/negative score histograms every N steps; 0: never", **between(0))
