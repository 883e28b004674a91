import os

import pytest

from raysl.config import Config, from_dict, load_config, recipe_path
from raysl.errors import UserError


def test_shipped_recipes_load_and_round_trip(tmp_path):
    for name in ("quickstart", "simclr_resnet50", "simclr_vits16"):
        cfg = load_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(cfg.to_yaml())
        assert load_config(str(path)) == cfg


def test_every_shipped_recipe_passes_the_engine_checks():
    from importlib import resources

    from raysl.train.engine import check_config

    names = [p.name[:-5] for p in (resources.files("raysl") / "recipes").iterdir() if p.name.endswith(".yaml")]
    assert len(names) >= 10
    for name in names:
        check_config(load_config(name))


def test_overrides_are_typed():
    cfg = load_config(
        "quickstart", ["optim.lr=0.5", "train.num_workers=3", "model.compile=true", "optim.weight_decay=0"]
    )
    assert cfg.optim.lr == 0.5 and cfg.train.num_workers == 3 and cfg.model.compile is True
    assert isinstance(cfg.optim.weight_decay, float)


@pytest.mark.parametrize(
    "override, message",
    [
        (["optim.lrr=1"], "optim.lrr is unknown"),
        (["optim.lr=fast"], "optim.lr: expected a number"),
        (["optim.lr=0"], r"optim.lr: 0.0 is out of range \(must be > 0"),
        (["train.num_workers=0"], r"train.num_workers: 0 is out of range \(must be >= 1"),
        (["train.num_workers=1.5"], "train.num_workers: expected an integer"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: 4 is not one of 0, 1, 2, 3"),
        (["deepspeed.precision=fp8"], "deepspeed.precision: 'fp8' is not one of fp32, bf16, fp16"),
        (["optim.name=adam"], "optim.name: 'adam' is not one of"),
        (["model.drop_path_rate=2"], "model.drop_path_rate: 2.0 is out of range"),
        (["model.compile=maybe"], "model.compile: expected true or false"),
        (["turbo.x=1"], "unknown section 'turbo'"),
        (["lr=1"], "expected section.key=value"),
        (["optim.min_lr=1e-6x"], "optim.min_lr: expected a number, got '1e-6x'"),  # numbers as people write them, wrong
        (["optim.lr=1e"], "optim.lr: expected a number"),
        (["optim.warmup_steps=1e-6"], "optim.warmup_steps: expected an integer"),
        (["optim.warmup_steps=2.5E0"], "optim.warmup_steps: expected an integer"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config("quickstart", override)


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(UserError, match="quickstart"):
        recipe_path("no_such_recipe")


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))


def test_defaults_are_valid():
    assert from_dict({}) == Config()


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("optim.min_lr=1e-6", "min_lr", 1e-6),
        ("optim.lr=5e-4", "lr", 5e-4),
        ("optim.lr=1E3", "lr", 1000.0),
        ("optim.lr=.5", "lr", 0.5),
        ("optim.lr=2.5e-3", "lr", 2.5e-3),
        ("optim.warmup_steps=1_000", "warmup_steps", 1000),
        ("optim.warmup_steps=1E3", "warmup_steps", 1000),
        ("optim.weight_decay=1_000", "weight_decay", 1000.0),
    ],
)
def test_numbers_as_people_write_them(override, key, value):
    got = getattr(load_config("quickstart", [override]).optim, key)
    assert got == value and type(got) is type(value)


def test_numbers_in_a_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 5e-4\n  min_lr: 1e-6\n  warmup_steps: 1E2\ntrain:\n  max_steps: 1_000\n")
    cfg = load_config(str(recipe))
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.train.max_steps) == (5e-4, 1e-6, 100, 1000)


def test_paths_are_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("data:\n  shards: shards\n")
    cfg = load_config(
        "recipes/r.yaml",
        ["eval.knn_shards=labeled", "eval.val_shards=~/held_out", "train.storage_path=s3://bucket/runs"],
    )
    assert cfg.data.shards == str(tmp_path / "shards") and cfg.eval.knn_shards == str(tmp_path / "labeled")
    assert cfg.eval.val_shards == os.path.expanduser("~/held_out")
    assert cfg.train.storage_path == "s3://bucket/runs" and cfg.eval.knn_val_shards == ""  # URIs and "off" stay
    assert load_config("quickstart").train.storage_path == str(tmp_path / "runs")
    assert recipe_path("recipes/r.yaml") == str(tmp_path / "recipes" / "r.yaml")


@pytest.mark.parametrize(
    "name, backbone, zero, checkpointing",
    [
        ("dino_vitl16", "vit_large_patch16_224", 2, True),
        ("mae_vitl16", "vit_large_patch16_224", 2, False),
        ("mae_vith14", "vit_huge_patch14_224", 2, True),
        ("dino_vitg14", "vit_giant_patch14_224", 3, True),
    ],
)
def test_large_backbone_recipes_state_their_memory_arithmetic(name, backbone, zero, checkpointing):
    """bf16, AdamW8bit, the ZeRO stage and checkpointing each recipe argues for in
    its header, which gives the bytes per parameter of weights, grads, master and state."""
    cfg = load_config(name)
    assert (cfg.model.backbone, cfg.deepspeed.zero_stage, cfg.model.grad_checkpointing) == (
        backbone,
        zero,
        checkpointing,
    )
    assert cfg.deepspeed.precision == "bf16" and cfg.optim.name == "adamw8bit"
    with open(recipe_path(name)) as f:
        header = "".join(line for line in f if line.startswith("#"))
    for words in (
        "Memory per parameter",
        "bf16 weights 2 B",
        "fp32 master 4 B",
        "8-bit Adam state 2 B",
        f"ZeRO-{zero}",
    ):
        assert words in header, (name, words)
