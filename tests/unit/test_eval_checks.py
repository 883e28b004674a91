"""`raysl eval`: bad input is refused before Ray starts, one clear error each."""

import os

import pytest

from raysl.cli import main
from raysl.errors import UserError
from raysl.eval.run import validate


def test_bad_input_is_refused_before_ray(eval_sets, capsys):
    run, train, val = str(eval_sets / "run"), str(eval_sets / "train"), str(eval_sets / "val")
    assert validate("knn", run, train, val) == (150, 50, 7)
    with pytest.raises(UserError, match=r"--ckpt .*run: that run trained 'test_resnet', not 'test_vit'"):
        validate("knn", run, train, val, backbone="test_vit")
    with pytest.raises(UserError, match=r"--ckpt .*edited: the weights do not fit a 'test_vit' backbone"):
        validate("linear", str(eval_sets / "edited"), train, val)
    with pytest.raises(UserError, match=r"--train .*unlabeled: 8 of 8 rows have no value in the 'label' column"):
        validate("fewshot", run, str(eval_sets / "unlabeled"), val)
    with pytest.raises(UserError, match=r"--val .*nolabelcol: shard .*shard-00000.parquet has no 'label' column"):
        validate("linear", run, train, str(eval_sets / "nolabelcol"))
    with pytest.raises(UserError, match=r"--val .*empty: the shard set has no images"):
        validate("finetune", run, train, str(eval_sets / "empty"))
    with pytest.raises(UserError, match=r"--shots 0: out of range \(must be >= 1\)"):
        validate("fewshot", run, train, val, options={"shots": [1, 0]})
    with pytest.raises(UserError, match=r"--ckpt .*train: no config.yaml there"):
        validate("knn", train, train, val)
    # a run in a bucket: tests/integration/test_buckets.py
    # the CLI prints one line and exits 2, before any Ray work
    assert main(["eval", "knn", "--ckpt", run, "--train", str(eval_sets / "unlabeled"), "--val", val]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysl: error: --train ") and "'label' column" in err
    assert not os.path.exists(os.path.join(run, "eval_knn.json"))
