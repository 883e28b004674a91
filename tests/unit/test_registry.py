"""Methods are found, configured and documented from their own modules: no hand-kept lists."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

import raysl.methods
from raysl.config import from_dict, load_config, method_config
from raysl.errors import UserError
from raysl.methods import docs
from raysl.methods.base import METHODS, discover

NEW_METHOD = """
from dataclasses import dataclass

import torch

from raysl.checks import between
from raysl.methods.base import Method, register
from raysl.methods.common import make_backbone
from raysl.methods.keys import MethodConfig, key


@dataclass
class PlantedConfig(MethodConfig):
    spread: float = key(1.0, "a key only this method has", **between(0.0))


@register("planted")
class Planted(Method):
    config_class = PlantedConfig
    bench_overrides = ("method.spread=2.0",)

    def __init__(self, cfg):
        super().__init__()
        self.backbone = make_backbone(cfg)

    def forward(self, views, values):
        return {"loss": self.backbone(views[0]).pow(2).mean() * 0}
"""


@pytest.fixture
def planted_module(tmp_path, monkeypatch):
    """A method module dropped next to the shipped ones, as a contributor would add one."""
    (tmp_path / "planted.py").write_text(NEW_METHOD)
    monkeypatch.setattr(raysl.methods, "__path__", [*raysl.methods.__path__, str(tmp_path)])
    yield
    METHODS.pop("planted", None)
    sys.modules.pop("raysl.methods.planted", None)


def test_a_new_method_module_is_found_configured_and_benched_without_lists(planted_module):
    from raysl.bench.methods import bench_methods, bench_overrides

    assert "planted" in discover()
    cfg = load_config("quickstart", ["method.name=planted", "method.spread=0.5"])
    assert type(cfg.method).__name__ == "PlantedConfig" and cfg.method.spread == 0.5
    assert from_dict(cfg.to_dict()) == cfg  # the run's config.yaml reads back the same
    assert bench_overrides("planted") == ("planted", ["method.spread=2.0"]) and "planted" in bench_methods()
    assert "`method.spread`" in docs.key_table()
    with pytest.raises(UserError, match=r"method.spread: .* out of range"):
        load_config("quickstart", ["method.name=planted", "method.spread=-1"])


def test_a_key_of_another_method_names_the_methods_that_have_it():
    with pytest.raises(
        UserError, match=r"config key method.queue_size: method dino has no such key \(a key of mocov2\)"
    ):
        from_dict({"method": {"name": "dino", "queue_size": 10}})
    with pytest.raises(UserError, match=r"method.nonsense: method simclr has no such key;"):
        from_dict({"method": {"nonsense": 1}})


def test_switching_the_method_keeps_the_keys_it_shares_and_leaves_the_others():
    cfg = load_config("quickstart", ["method.name=byol"])  # quickstart is a SimCLR recipe with a temperature
    assert cfg.method.name == "byol" and not hasattr(cfg.method, "temperature")
    assert cfg.method.proj_hidden_dim == 512  # the recipe's, shared by both
    assert cfg.method.ema_momentum == method_config("byol").ema_momentum
    with pytest.raises(UserError, match="method.temperature: method byol"):  # but never one given on purpose
        load_config("quickstart", ["method.name=byol", "method.temperature=0.3"])


def test_every_method_declares_what_the_engine_needs():
    for name, cls in discover().items():
        keys = method_config(name)
        assert keys.name == name and dataclasses.is_dataclass(keys)
        assert cls.bench_overrides, f"{name}: no short-run settings for raysl bench methods"
        load_config("quickstart", [f"method.name={name}", *cls.bench_overrides])  # they are valid keys


def test_the_docs_key_table_is_the_one_the_dataclasses_write():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", docs.PAGE)) as f:
        text = f.read()
    assert docs.rewrite(text) == text, f"{docs.PAGE}'s method keys are stale: run python -m raysl.methods.docs"
