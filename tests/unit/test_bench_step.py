"""`raysl bench step`'s arguments and settings checks."""

import json

import pytest

from raysl.errors import UserError


def test_bench_step_cli_passes_its_arguments(monkeypatch, capsys):
    import raysl.bench.step as step
    from raysl.cli import main

    seen = {}

    def fake(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return {"bench": "step"}

    monkeypatch.setattr(step, "run_step_bench", fake)
    assert (
        main(
            [
                "bench",
                "step",
                "--model",
                "test_vit",
                "--batch-size",
                "4",
                "--image-size",
                "32",
                "--steps",
                "3",
                "--warmup",
                "0",
                "--threads",
                "2",
                "--optimizer",
                "adamw8bit",
                "--zero-stage",
                "2",
            ]
        )
        == 0
    )
    assert seen["args"] == ("test_vit", 4, 32, 3, 0, 2, "adamw8bit", 2)
    assert seen["kwargs"] == {"seed": 0, "address": None}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"bench": "step"}


def test_bench_step_rejects_bad_settings():
    from raysl.bench.step import run_step_bench

    with pytest.raises(UserError, match="steps >= 2"):
        run_step_bench("test_resnet", steps=1)
    with pytest.raises(UserError, match="optim.name"):
        run_step_bench("test_resnet", optimizer="adam9bit")
