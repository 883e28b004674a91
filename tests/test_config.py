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
    cfg = load_config("quickstart", ["optim.lr=0.5", "train.num_workers=3", "model.compile=true", "optim.weight_decay=0"])
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
