"""Every raysl command on a real S3 API (moto's server, the session's `s3` fixture): shard sets,
a pretraining run and its resume, eval, export, report and curate of a run in the bucket,
tune, a mixture of a local and a bucket set; a wrong bucket, key or endpoint is one line
before Ray starts, and the secret key is written nowhere."""

import contextlib
import io
import json
import os

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from imagefactory import encode, photo, write_folder
from runfactory import train_overrides
from s3server import SECRET_KEY
from shardfactory import as_v1, digit_images, write_shards

from raysl.cli import main
from raysl.data.schema import read_manifest, shard_paths
from raysl.errors import UserError
from raysl.train import checkpoint
from raysl.train.local_world import free_port

STEPS = 4  # the shared run: a checkpoint at 2 and at 4, then resumed to 6
PRINTED: list[str] = []  # what every command of this module printed (none may show the secret key)


def _run(argv: list[str]) -> tuple[int, str]:
    """`raysl ARGV` in this process: (exit code, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    PRINTED.append(out.getvalue())
    return code, out.getvalue()


def _keys(s3, uri: str) -> dict[str, int]:
    """Every object under the URI: relative key -> bytes."""
    root = uri.removeprefix("s3://").rstrip("/")
    infos = s3.filesystem().get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}


def _read(s3, uri: str) -> bytes:
    with s3.filesystem().open_input_stream(uri.removeprefix("s3://")) as f:
        return f.read()


def _upload(s3, local: str, uri: str) -> str:
    pafs.copy_files(local, uri.removeprefix("s3://"), destination_filesystem=s3.filesystem())
    return uri


def _overrides(shards: str, storage: str, name: str, *extra: str) -> list[str]:
    """runfactory's training overrides with fp32 AdamW, the recipe's epochs, STEPS steps and a
    checkpoint every 2."""
    fp32 = ("optim.name=adamw", "train.epochs=20", f"train.max_steps={STEPS}", "train.checkpoint_every=2")
    return train_overrides(shards, storage, name, *fp32, *extra)


@pytest.fixture(scope="module")
def lake(s3, ray_local, tmp_path_factory):
    """A bucket with a digit shard set (64 images, shards of 8), labeled local eval sets and one
    2-worker run pretrained from the bucket into the bucket: {bucket, shards, run, train, val, output}."""
    root = tmp_path_factory.mktemp("lake")
    bucket = s3.bucket()
    write_shards(str(root / "shards"), digit_images(64), shard_size=8)
    shards = _upload(s3, str(root / "shards"), f"{bucket}/shards")
    digits = digit_images(120)
    write_shards(str(root / "train"), digits[:80], shard_size=40)
    write_shards(str(root / "val"), digits[80:], shard_size=40)
    code, output = _run(["pretrain", "quickstart", *_overrides(shards, f"{bucket}/runs", "first")])
    assert code == 0, output
    return {
        "bucket": bucket,
        "shards": shards,
        "run": f"{bucket}/runs/first",
        "train": str(root / "train"),
        "val": str(root / "val"),
        "root": root,
    }


def _rows(uri: str) -> list[dict]:
    """The set's rows as raysl's reader lists them (manifest, index, shard files), read from the bucket."""
    return [
        r for p in shard_paths(uri, read_manifest(uri)) for r in pq.read_table(p, columns=["key", "sha256"]).to_pylist()
    ]


def test_shards_build_append_inspect_and_migrate_on_a_bucket(s3, ray_local, tmp_path):
    bucket = s3.bucket()
    pngs = [encode(photo(40 + 4 * i), "PNG") for i in range(7)]
    first = write_folder(tmp_path / "first", {f"{i}.png": pngs[i] for i in range(4)})
    second = write_folder(tmp_path / "second", {f"{i}.png": pngs[i] for i in range(4, 7)})
    out = f"{bucket}/shards"
    code, output = _run(["shards", "build", first, "--out", out, "--shard-size", "2"])
    assert code == 0, output
    keys = _keys(s3, out)
    assert {"manifest.json", "index.parquet", "shard-00000.parquet", "shard-00001.parquet"} <= set(keys)
    assert sorted(r["key"] for r in _rows(out)) == [f"first/{i}.png" for i in range(4)]

    code, output = _run(["shards", "build", second, "--out", out, "--shard-size", "2", "--append"])
    assert code == 0, output
    m = read_manifest(out)
    assert m.rows == 7 and m.index_version == 1 and m.index_file in _keys(s3, out)
    assert len({r["sha256"] for r in _rows(out)}) == 7
    assert (
        len(read_manifest(out, "index.parquet").shards) == 2
    )  # the first version is still there for the runs that pinned it

    code, output = _run(["shards", "inspect", out])
    assert code == 0 and "7" in output, output

    local = tmp_path / "old"
    write_shards(str(local), digit_images(12), shard_size=5)
    as_v1(str(local))
    old = _upload(s3, str(local), f"{bucket}/old")
    assert "index.parquet" not in _keys(s3, old)
    code, output = _run(["shards", "migrate", old])
    assert code == 0, output
    assert "index.parquet" in _keys(s3, old) and read_manifest(old).rows == 12 and len(_rows(old)) == 12


def test_pretrain_writes_every_run_file_into_the_bucket(s3, lake):
    keys = _keys(s3, lake["run"])
    for name in ("config.yaml", "metrics.jsonl", "attempts.jsonl", "loss.png", "lr.png", "shard_sets.json"):
        assert name in keys, name
    assert any(k.startswith("tensorboard/events.out.tfevents") and size > 0 for k, size in keys.items())
    ckpts = sorted({k.split("/")[0] for k in keys if k.startswith("checkpoint_") and "/" in k})
    assert len(ckpts) == 2  # train.keep_checkpoints
    for c in ckpts:
        for name in (checkpoint.WEIGHTS, checkpoint.RUN_STATE, "worker_0.json", "worker_1.json"):
            assert f"{c}/{name}" in keys
    steps = [json.loads(line)["step"] for line in _read(s3, f"{lake['run']}/metrics.jsonl").splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert json.loads(_read(s3, f"{lake['run']}/{ckpts[-1]}/{checkpoint.RUN_STATE}"))["step"] == STEPS


def test_resume_from_the_bucket_continues_after_its_checkpoint(s3, lake):
    code, output = _run(
        ["pretrain", "quickstart", *_overrides(lake["shards"], f"{lake['bucket']}/runs", "first"), "train.max_steps=6"]
        + ["--resume"]
    )
    assert code == 0, output
    attempts = [json.loads(line) for line in _read(s3, f"{lake['run']}/attempts.jsonl").splitlines()]
    assert len(attempts) == 2 and attempts[1]["start_step"] == STEPS and attempts[1]["first_step"] == STEPS + 1
    steps = [json.loads(line)["step"] for line in _read(s3, f"{lake['run']}/metrics.jsonl").splitlines()]
    assert steps == list(range(1, 7))


# What eval, export, report and curate may read of a run in a bucket (GET requests): config.yaml,
# each checkpoint's rank-0 state and listing (to find the latest complete one), and the latest's weights
def _reads(requests, run: str) -> list[str]:
    prefix = run.removeprefix("s3://") + "/"
    return [path[len(prefix) :] for method, path, _ in requests if method == "GET" and path.startswith(prefix)]


def _only_what_is_needed(reads: list[str], latest: str, *extra: str) -> None:
    import fnmatch

    allowed = ("config.yaml", "checkpoint_*/raysl_state.json", "checkpoint_*/worker_0.json", *extra)
    weights = [r for r in reads if r.endswith(checkpoint.WEIGHTS)]
    assert weights and set(weights) == {f"{latest}/{checkpoint.WEIGHTS}"}, reads
    unexpected = [r for r in reads if r not in weights and not any(fnmatch.fnmatchcase(r, a) for a in allowed)]
    assert not unexpected, unexpected
    assert not [r for r in reads if "/engine/" in r or "worker_1" in r or r.endswith(".pt")]


def _latest(s3, run: str) -> str:
    from raysl.eval.weights import latest_checkpoint

    return latest_checkpoint(run)[1].rsplit("/", 1)[1]


def test_export_of_a_bucket_run_reads_only_its_weights(s3, lake, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from raysl.eval.weights import backbone_state, method_state

    with s3.recording() as requests:
        code, output = _run(["export", "--ckpt", lake["run"], "--out", str(tmp_path / "export")])
    assert code == 0, output
    _only_what_is_needed(_reads(requests, lake["run"]), _latest(s3, lake["run"]), "metrics.jsonl", "eval_*.json")
    weights = str(tmp_path / "export" / "model.safetensors")
    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    exported = load_file(weights)
    assert meta["raysl_run"] == lake["run"] and int(meta["step"]) == json.loads(output.splitlines()[-1])["step"]
    _, _, state = method_state(lake["run"])
    trained = backbone_state(state)
    assert exported.keys() == trained.keys() and all((exported[k] == trained[k]).all() for k in trained)
    assert "steps" in (tmp_path / "export" / "README.md").read_text()
    code, output = _run(["export", "--ckpt", lake["run"], "--out", f"{lake['bucket']}/export"])
    assert code == 2 and "--out" in output


def test_eval_knn_of_a_bucket_run(s3, lake):
    run = lake["run"]
    with s3.recording() as requests:
        code, output = _run(["eval", "knn", "--ckpt", run, "--train", lake["train"], "--val", lake["val"], "--k", "5"])
    assert code == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    assert result["ckpt"] == run and result["val_images"] == 40 and 0 <= result["knn_top1_k5"] <= 100
    assert json.loads(_read(s3, f"{run}/eval_knn.json")) == result
    assert not [k for k in _keys(s3, run) if k.startswith(".eval_")]  # Ray Train's storage of the eval, removed
    reads = [r for r in _reads(requests, run) if not r.startswith(".eval_")]
    _only_what_is_needed(reads, _latest(s3, run))  # the driver and the worker each read the weights


def test_report_of_a_bucket_run_is_written_into_it(s3, lake):
    run = lake["run"]
    with s3.recording() as requests:
        code, output = _run(["report", run, "--eval", lake["val"]])
    assert code == 0, output
    assert output.strip().splitlines()[-1] == f"{run}/report.html"
    keys = _keys(s3, run)
    assert "report.html" in keys and "report_pictures/embedding_pca.png" in keys
    page = _read(s3, f"{run}/report.html").decode()
    assert run in page and "data:image/png;base64," in page
    extra = ("metrics.jsonl", "eval_*.json", "score_histograms/*", "report_pictures/*", "report.html")
    _only_what_is_needed(_reads(requests, run), _latest(s3, run), *extra)


def test_curate_embed_with_a_bucket_run(s3, lake, tmp_path):
    run = lake["run"]
    out = str(tmp_path / "emb")
    with s3.recording() as requests:
        code, output = _run(["curate", "embed", "--shards", lake["val"], "--model", run, "--out", out, "--actors", "1"])
    assert code == 0, output
    meta = json.loads(open(os.path.join(out, "embed.json")).read())
    assert meta["model"].startswith(f"run:{run}@step=")
    _only_what_is_needed(_reads(requests, run), _latest(s3, run))


def test_the_latest_complete_checkpoint_is_the_one_fetched(s3, lake, tmp_path):
    """A copy of the run whose newest checkpoint lost its weights: the one before is read."""
    from raysl.eval.weights import checkpoints, local_run

    fs = s3.filesystem()
    run = lake["run"].removeprefix("s3://")
    copy = f"{lake['bucket']}/runs/copy"
    keys = _keys(s3, lake["run"])
    for key in keys:
        if key == "config.yaml" or "/engine/" not in key and key.startswith("checkpoint_"):
            fs.copy_file(f"{run}/{key}", f"{copy.removeprefix('s3://')}/{key}")
    (older, _), (newest, newest_dir) = checkpoints(copy)
    fs.delete_file(f"{newest_dir.removeprefix('s3://')}/{checkpoint.WEIGHTS}")
    with local_run(copy) as local:
        files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs_ in os.walk(local) for f in fs_)
        older_name = checkpoints(copy)[-1][1].rsplit("/", 1)[1]
        assert files == sorted(
            ["config.yaml", f"{older_name}/{checkpoint.RUN_STATE}", f"{older_name}/{checkpoint.WEIGHTS}"]
        )
        assert checkpoints(local)[-1][0] == older < newest
    assert not os.path.exists(local)


def test_tune_writes_its_experiment_into_the_bucket(s3, lake):
    from runfactory import tune_trial_config

    from raysl.tune.search import tune_recipe
    from raysl.tune.space import parse_space

    storage = f"{lake['bucket']}/tune"
    cfg = tune_trial_config(lake["shards"], "train.max_steps=2", "train.checkpoint_every=2", "train.name=tiny")
    space = parse_space({"optim.lr": {"choice": [1e-3, 1e-2]}})
    result = tune_recipe(cfg, space, samples=2, metric="loss", name="search", storage=storage, max_concurrent=2)
    assert result["errors"] == 0 and len(result["rows"]) == 2
    keys = _keys(s3, f"{storage}/search")
    assert {"results.csv", "best.yaml"} <= set(keys)
    for row in result["rows"]:
        attempt = f"train/{row['trial_id']}/attempt_0"
        assert f"{attempt}/metrics.jsonl" in keys and f"{attempt}/config.yaml" in keys
        assert any(k.startswith(f"{attempt}/checkpoint_") and k.endswith(checkpoint.WEIGHTS) for k in keys)
    with pytest.raises(UserError, match="exists: pass --resume"):  # found in the bucket, as in a local folder
        tune_recipe(cfg, space, samples=2, metric="loss", name="search", storage=storage)
    with pytest.raises(UserError, match="has no Tune experiment"):
        tune_recipe(cfg, space, samples=2, metric="loss", name="other", storage=storage, resume=True)


def test_a_mixture_of_a_local_and_a_bucket_set_trains(s3, lake, mixture_sets, tmp_path):
    curated, web = mixture_sets
    remote = _upload(s3, web, f"{lake['bucket']}/web")
    code, output = _run(
        ["pretrain", "quickstart"]
        + _overrides(f"[{curated}, {remote}]", str(tmp_path / "runs"), "mixed", "train.num_workers=1")
        + ["data.weights=[1, 3]", "train.max_steps=2"]
    )
    assert code == 0, output
    run = tmp_path / "runs" / "mixed"
    sets = json.loads((run / "shard_sets.json").read_text())
    assert remote in json.dumps(sets) and curated in json.dumps(sets)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _one_error_line(code: int, output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("raysl: error: "), output
    assert SECRET_KEY not in output
    return lines[0]


@pytest.fixture
def no_ray_start(monkeypatch):
    """A command that gets past its checks would start (here: join) Ray: fail the test instead."""
    import raysl.runtime

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(raysl.runtime, "init_ray", refuse)


def test_a_missing_bucket_is_one_line_before_ray_starts(s3, lake, tmp_path, no_ray_start):
    missing = "s3://no-such-bucket-here"
    line = _one_error_line(*_run(["pretrain", "quickstart", *_overrides(f"{missing}/shards", str(tmp_path), "x")]))
    assert f"data.shards {missing}/shards" in line and "no bucket 'no-such-bucket-here'" in line
    runs = f"{missing}/runs"
    line = _one_error_line(*_run(["pretrain", "quickstart", *_overrides(lake["shards"], runs, "x")]))
    assert f"train.storage_path {runs}" in line
    line = _one_error_line(*_run(["shards", "build", str(tmp_path), "--out", f"{missing}/out"]))
    assert f"--out {missing}/out" in line
    args = ["--train", lake["train"], "--val", lake["val"]]
    line = _one_error_line(*_run(["eval", "knn", "--ckpt", f"{missing}/runs/first", *args]))
    assert f"--ckpt {missing}/runs/first" in line
    line = _one_error_line(*_run(["export", "--ckpt", f"{missing}/runs/first", "--out", str(tmp_path / "e")]))
    assert "no bucket" in line


def test_refused_credentials_are_one_line_before_ray_starts(s3, lake, tmp_path, no_ray_start, monkeypatch):
    """A key the server knows, with a wrong secret key."""
    with s3.credentials_checked() as key:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        line = _one_error_line(*_run(["pretrain", "quickstart", *_overrides(lake["shards"], str(tmp_path), "x")]))
        assert f"data.shards {lake['shards']}" in line and "refused these credentials" in line
        assert "AWS_SECRET_ACCESS_KEY" in line and "not-the-secret" not in line
        line = _one_error_line(*_run(["shards", "inspect", lake["shards"]]))
        assert "refused these credentials" in line
        args = ["--train", lake["train"], "--val", lake["val"]]
        line = _one_error_line(*_run(["eval", "knn", "--ckpt", lake["run"], *args]))
        assert f"--ckpt {lake['run']}" in line and "refused these credentials" in line


def test_an_unreachable_endpoint_is_one_line_before_ray_starts(s3, lake, tmp_path, no_ray_start, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    line = _one_error_line(*_run(["pretrain", "quickstart", *_overrides(lake["shards"], str(tmp_path), "x")]))
    assert f"data.shards {lake['shards']}" in line and "cannot reach the storage" in line
    line = _one_error_line(*_run(["report", lake["run"]]))
    assert "cannot reach the storage" in line


def test_the_secret_key_is_written_nowhere(s3, lake):
    """Every file of every command in the bucket, and what the commands printed."""
    fs = s3.filesystem()
    bucket = lake["bucket"].removeprefix("s3://")
    files = [
        i.path for i in fs.get_file_info(pafs.FileSelector(bucket, recursive=True)) if i.type == pafs.FileType.File
    ]
    assert any(f.endswith("config.yaml") for f in files)  # and, after the tests above, eval/report/tune files
    leaked = [f for f in files if SECRET_KEY.encode() in _read(s3, f"s3://{f}")]
    assert not leaked
    assert PRINTED and not [text for text in PRINTED if SECRET_KEY in text]
