"""raysl: self-supervised visual pretraining on Ray Data + Ray Train + DeepSpeed."""

__version__ = "0.1.0"
