"""A real Ray cluster (a head node and a CPU-only data node, started with `ray start`,
token authentication on) and the real Jobs API: `jobs/submit.py` submits a short
pretrain through JobSubmissionClient, follows its logs, and the Ray state API shows
that decoding/augmentation ran on the data node while the training worker held the
other one."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from procs import FAST_NODE_DEATH, wait_gone
from shardfactory import digit_images, write_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_of(marker: str) -> set[int]:
    """Processes whose command line mentions `marker` (our cluster's temp dir), and their
    descendants (workers forked by our raylets)."""
    pids, parents = set(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        parents[int(entry)] = ppid
        if marker in cmd:
            pids.add(int(entry))
    grew = True
    while grew:
        children = {p for p, pp in parents.items() if pp in pids and p not in pids}
        grew = bool(children)
        pids |= children
    pids.discard(os.getpid())
    return pids


def _stop_cluster(temp_dir: str) -> None:
    """Stop only the processes of the cluster under `temp_dir` (never a global `ray stop`)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = _pids_of(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        wait_gone(pids, wait)


def _agent_ports(listen: int, grpc: int, runtime_env: int, metrics: int) -> list[str]:
    """`ray start` options for a node's dashboard agent, runtime-env agent and metrics ports."""
    return [
        "--dashboard-agent-listen-port",
        str(listen),
        "--dashboard-agent-grpc-port",
        str(grpc),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--metrics-export-port",
        str(metrics),
    ]


@pytest.fixture(scope="module")
def cluster():
    """A head node ({"trainer_node": 2}, 2 CPUs, dashboard/job server) and a worker node
    ({"data_node": 2}, 1 CPU) on 127.0.0.1 with their own ports and temp dir."""
    from raysl.runtime import LOCAL_ENV

    temp_dir = tempfile.mkdtemp(prefix="raysl_c")  # short: Ray's socket paths live under it
    token = os.path.join(temp_dir, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=token,
        RAY_USAGE_STATS_ENABLED="0",
        **FAST_NODE_DEATH,
        # every process of the cluster has it, the job's driver too: Ray Train's polls as on a local Ray
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=LOCAL_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"],
    )
    gcs, dash, client, *agent = _free_ports(11)
    common = ["--node-ip-address", "127.0.0.1", "--temp-dir", os.path.join(temp_dir, "ray"), "--disable-usage-stats"]
    head = [
        os.path.join(BIN, "ray"),
        "start",
        "--head",
        "--port",
        str(gcs),
        "--num-cpus",
        "2",
        "--resources",
        json.dumps({"trainer_node": 2}),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--ray-client-server-port",
        str(client),
        *_agent_ports(*agent[:4]),
        *common,
    ]
    worker = [
        os.path.join(BIN, "ray"),
        "start",
        "--address",
        f"127.0.0.1:{gcs}",
        "--num-cpus",
        "1",
        "--resources",
        json.dumps({"data_node": 2}),
        *_agent_ports(*agent[4:8]),
        *common,
    ]
    try:
        for cmd in (head, worker):
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout}\n{run.stderr}"
        yield {"address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "env": env, "temp_dir": temp_dir}
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit_argv(cluster, overrides: list[str], *options: str) -> list[str]:
    """jobs/submit.py running `raysl pretrain quickstart <overrides>` on the cluster, 400 s at most."""
    submit = [sys.executable, os.path.join(REPO, "jobs", "submit.py"), "--address", cluster["address"]]
    submit += ["--working-dir", REPO, "--runtime-env", os.path.join(REPO, "jobs", "runtime_env.yaml"), *options]
    return [*submit, "--timeout", "400", "--", "raysl", "pretrain", "quickstart", *overrides]


def test_job_on_a_real_cluster_puts_data_tasks_on_the_data_node(cluster, tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, digit_images(32), shard_size=8)
    runs = str(tmp_path / "runs")
    storage = f"file://{runs}"  # a bucket URI, as s3:// or gs:// would be: the run's files go through pyarrow.fs
    placement_file = str(tmp_path / "placement.json")
    overrides = [
        f"data.shards={shards}",
        "data.image_size=32",
        "data.batch_size=4",
        "model.backbone=test_resnet",
        "method.proj_hidden_dim=64",
        "method.proj_dim=32",
        "train.max_steps=3",
        "train.checkpoint_every=2",
        "train.log_every=1",
        f"train.storage_path={storage}",
        "train.name=job",
        # decoding/augmentation on the CPU-only data node, the training worker on the "GPU" node
        "data.task_cpus=0.5",
        'data.task_resources={"data_node": 1}',
        'train.worker_resources={"trainer_node": 1}',
    ]
    t0 = time.monotonic()
    job = subprocess.run(
        _submit_argv(cluster, overrides, "--placement", placement_file),
        cwd=REPO,
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=480,
    )
    seconds = time.monotonic() - t0
    out = job.stdout + job.stderr
    assert job.returncode == 0, out
    assert "SUCCEEDED" in job.stderr, out
    # the job's own output came back through tail_job_logs: the loop's banner and pretrain's summary
    assert "raysl: attempt 1: simclr on test_resnet, 1 worker(s), 3 steps" in job.stdout, out
    summary = json.loads([line for line in job.stdout.splitlines() if line.startswith('{"run_dir"')][-1])
    assert summary["steps"] == 3 and summary["checkpoint"], summary
    assert os.path.exists(os.path.join(summary["checkpoint"], "weights.safetensors")), summary
    # every file of the run directory reached <storage URI>/<train.name>/, none a local `file:` folder
    run = os.path.join(runs, "job")
    assert summary["run_dir"] == f"{storage}/job", summary
    assert summary["checkpoint"].startswith(run + "/checkpoint_"), summary
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "lr.png"):
        assert os.path.getsize(os.path.join(run, name)) > 0, (name, os.listdir(run))
    assert summary["plots"] == [f"{storage}/job/loss.png", f"{storage}/job/lr.png"], summary
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))] == [1, 2, 3]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run, "tensorboard")))
    for root in (cluster["temp_dir"], REPO, str(tmp_path)):
        strays = [os.path.join(d, n) for d, dirs, _ in os.walk(root) for n in dirs if n.startswith("file:")]
        assert not strays, strays

    placement = json.loads(open(placement_file).read())
    data_nodes = {n["node_id"] for n in placement["nodes"] if n["resources"].get("data_node")}
    train_nodes = {n["node_id"] for n in placement["nodes"] if n["resources"].get("trainer_node")}
    assert len(data_nodes) == 1 and len(train_nodes) == 1 and data_nodes != train_nodes, placement
    data_tasks = {
        name: {n["node_id"] for n in nodes}
        for name, nodes in placement["tasks"].items()
        if "_read_windows" in name or "_augment" in name
    }
    assert any("_read_windows" in n for n in data_tasks) and any("_augment" in n for n in data_tasks), placement[
        "tasks"
    ]
    for name, nodes in data_tasks.items():
        assert nodes == data_nodes, (name, nodes)
    workers = {n["node_id"] for n in placement["actors"]["RayTrainWorker"]}
    assert workers == train_nodes, placement["actors"]
    print(
        f"\njob on a 2-node cluster: {seconds:.0f} s; data tasks {sorted(data_tasks)} on the data node, "
        f"RayTrainWorker on the trainer node"
    )


def test_a_lost_node_costs_only_the_steps_after_the_latest_checkpoint(cluster, tmp_path):
    """A third node ({"trainer_node": 1}, 1 CPU) joins; the run's two workers are spread over
    it and the head. After step 5 the whole node is killed (its raylet and every process it
    started, SIGKILL). Ray Train restarts the worker group on the head, which suffices, and
    the run continues from its newest complete checkpoint."""
    from raysl.train import recovery, storage
    from raysl.train.metrics import read_metrics

    marker = str(_free_ports(1)[0])  # this node's metrics port: it names the node's processes
    spot = [
        os.path.join(BIN, "ray"),
        "start",
        "--address",
        cluster["gcs"],
        "--num-cpus",
        "1",
        "--resources",
        json.dumps({"trainer_node": 1}),
        "--metrics-export-port",
        marker,
        "--node-ip-address",
        "127.0.0.1",
        "--temp-dir",
        os.path.join(cluster["temp_dir"], "ray"),
        "--disable-usage-stats",
    ]
    started = subprocess.run(spot, env=cluster["env"], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    shards = str(tmp_path / "shards")
    write_shards(shards, digit_images(64), shard_size=8)
    run = str(tmp_path / "runs" / "lost")
    overrides = [
        f"data.shards={shards}",
        "data.image_size=32",
        "data.batch_size=4",
        "model.backbone=test_resnet",
        "method.proj_hidden_dim=64",
        "method.proj_dim=32",
        "train.num_workers=2",
        "train.epochs=2",
        "train.max_steps=12",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=3",  # the one resumed from (step 4 or 8) must outlive the run's end
        "train.log_every=1",
        "train.max_failures=1",
        f"train.storage_path={tmp_path / 'runs'}",
        "train.name=lost",
        "train.placement_strategy=SPREAD",
        'train.worker_resources={"trainer_node": 1}',
        "data.task_cpus=0.5",
        'data.task_resources={"data_node": 1}',
    ]
    log = open(tmp_path / "submit.log", "w")
    job = subprocess.Popen(
        _submit_argv(cluster, overrides),
        cwd=REPO,
        env=cluster["env"],
        # a file, not a pipe: nobody reads a pipe while the job runs, and once its 64 KiB
        # buffer is full, submit.py's log tail blocks on print and stalls until the deadline
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed_after = newest = None
    try:
        deadline = time.monotonic() + 400
        while job.poll() is None and time.monotonic() < deadline:
            rows = read_metrics(run) if os.path.exists(run) else []
            if killed_after is None and rows and rows[-1]["step"] >= 5:
                node = _pids_of(f"--metrics_export_port={marker}")
                assert node, "the third node's processes"
                for pid in node:
                    os.kill(pid, signal.SIGKILL)
                assert not wait_gone(node)
                killed_after = read_metrics(run)[-1]["step"]
                newest, _ = recovery.newest_complete(run)
            time.sleep(0.05)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    out = (tmp_path / "submit.log").read_text()
    assert job.returncode == 0 and "SUCCEEDED" in out, out
    assert killed_after is not None, out
    attempts = recovery.read_attempts(run)
    assert [a["attempt"] for a in attempts] == [1, 2], (attempts, out)
    assert attempts[1]["checkpoint"] == os.path.basename(newest) and attempts[1]["world_size"] == 2
    start = storage.checkpoint_step(newest)
    assert attempts[1]["start_step"] == start and start < killed_after < start + 4  # only steps after it redone
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))
    assert storage.checkpoint_problem(newest) is None  # what the finished checkpoint wrote is all there
    assert "raysl: attempt 2: simclr on test_resnet, 2 worker(s), 12 steps" in out, out
