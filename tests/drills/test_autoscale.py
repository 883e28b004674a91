"""Scale from zero with Ray's own autoscaler: a head node without the training resource, and a
worker node type (min 0) that advertises it, launched by Ray's fake multi-node provider (the one
ray.cluster_utils.AutoscalingCluster uses; each "node" is a raylet on this machine). `raysl
pretrain`, submitted as a Ray job (jobs/submit.py, the Jobs API), asks for workers no node can
hold yet; the autoscaler launches nodes for them, the run trains, and once it ends the idle nodes
are removed again.

AutoscalingCluster itself runs `ray stop --force` at start and at shutdown, which stops every Ray
on the machine, and reads a config file the Ray wheel does not ship. So the cluster is started
here the way it starts one (`ray start --head --autoscaling-config` with RAY_FAKE_CLUSTER=1), on
its own ports and temp dir, from the config it would write, and stopped by killing only the
processes of that temp dir."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from runfactory import train_overrides
from shardfactory import digit_images, write_shards
from test_jobs import _agent_ports, _free_ports, _pids_of, _stop_cluster, _submit_argv

BIN = os.path.dirname(sys.executable)
HEAD_CPUS = 1
IDLE_TIMEOUT_MIN = 0.1  # an idle node is removed after 6 s


def _config(gcs: str) -> dict:
    """The cluster config AutoscalingCluster builds (Ray's fake_multi_node example with our
    node types): a head without `trainer_node`, and `trainer` nodes (min 0) that have it."""
    return {
        "cluster_name": "raysl_autoscale",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,
            "gcs_address": gcs,  # not the default 6379, which another Ray on the machine may hold
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0},
            "trainer": {
                "resources": {"CPU": 1, "trainer_node": 1, "object_store_memory": 200 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@pytest.fixture
def autoscaling_cluster():
    temp_dir = tempfile.mkdtemp(prefix="raysl_a")  # short: Ray's socket paths live under it
    gcs, client, dashboard, *agent = _free_ports(7)
    config = os.path.join(temp_dir, "autoscaling.json")
    with open(config, "w") as f:
        json.dump(_config(f"127.0.0.1:{gcs}"), f)
    token = os.path.join(temp_dir, "auth_token")  # its own token, whatever ~/.ray holds
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=token,
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    head = [
        os.path.join(BIN, "ray"),
        "start",
        "--head",
        f"--autoscaling-config={config}",
        "--port",
        str(gcs),
        "--num-cpus",
        str(HEAD_CPUS),
        "--node-ip-address",
        "127.0.0.1",
        "--include-dashboard",
        "true",  # the Jobs API
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--ray-client-server-port",
        str(client),
        *_agent_ports(*agent),
        "--temp-dir",
        os.path.join(temp_dir, "ray"),
        "--disable-usage-stats",
    ]
    try:
        run = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, f"{' '.join(head)}\n{run.stdout}\n{run.stderr}"
        yield {"gcs": f"127.0.0.1:{gcs}", "address": f"http://127.0.0.1:{dashboard}", "env": env, "temp_dir": temp_dir}
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _nodes(temp_dir: str) -> list[dict]:
    """The static resources of each node of the cluster under `temp_dir`: one raylet process
    per node, seen through /proc (this process may already be connected to another Ray)."""
    nodes = []
    for pid in _pids_of(temp_dir):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) != "raylet":
            continue
        listed = next(a for a in argv if a.startswith("--static_resource_list=")).split("=", 1)[1].split(",")
        nodes.append({k: float(v) for k, v in zip(listed[::2], listed[1::2]) if not k.startswith("node:")})
    return nodes


def _autoscaler_state(cluster) -> str:
    """`ray status` and the end of the autoscaler's log, for a failure message."""
    status = subprocess.run(
        [os.path.join(BIN, "ray"), "status", "--address", cluster["gcs"], "-v"],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    logs = os.path.join(cluster["temp_dir"], "ray", "session_latest", "logs")
    with open(os.path.join(logs, "monitor.log"), errors="replace") as f:
        monitor = f.read()[-6000:]
    return f"{status.stdout}{status.stderr}\n--- monitor.log ---\n{monitor}"


def test_the_autoscaler_launches_nodes_for_a_run_and_removes_them_after(autoscaling_cluster, tmp_path):
    temp_dir = autoscaling_cluster["temp_dir"]
    assert [n.get("trainer_node") for n in _nodes(temp_dir)] == [None]  # the head alone, no trainer_node
    shards = str(tmp_path / "shards")
    write_shards(shards, digit_images(32), shard_size=8)
    overrides = train_overrides(
        shards,
        str(tmp_path / "runs"),
        "scaled",
        "optim.name=adamw",
        "deepspeed.zero_stage=0",
        "train.num_workers=1",
        "train.max_steps=3",
        "train.checkpoint_every=3",
        'train.worker_resources={"trainer_node": 1}',  # only the autoscaled nodes have it
    )
    t0 = time.monotonic()
    log = open(tmp_path / "pretrain.log", "w")
    run = subprocess.Popen(
        _submit_argv(autoscaling_cluster, overrides),
        env=autoscaling_cluster["env"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    most = []
    try:
        while run.poll() is None and time.monotonic() - t0 < 240:
            trainers = [n for n in _nodes(temp_dir) if n.get("trainer_node")]
            most = max(most, trainers, key=len)
            time.sleep(0.5)
    finally:
        if run.poll() is None:
            run.kill()
        run.wait()
        log.close()
    trained = time.monotonic() - t0
    out = (tmp_path / "pretrain.log").read_text()
    assert run.returncode == 0, out
    assert "SUCCEEDED" in out, out
    summary = json.loads([line for line in out.splitlines() if line.startswith('{"run_dir"')][-1])
    assert summary["steps"] == 3 and summary["checkpoint"], summary
    assert len(most) == 1, most  # a node launched for the worker (1 CPU, 1 trainer_node), no more

    deadline = time.monotonic() + 120
    nodes = _nodes(temp_dir)
    while len(nodes) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = _nodes(temp_dir)
    assert [n.get("trainer_node") for n in nodes] == [None], (nodes, _autoscaler_state(autoscaling_cluster))
    print(
        f"\nautoscaled run: a node launched, 3 steps, {trained:.0f} s to the end of the run, "
        f"{time.monotonic() - t0 - trained:.0f} s more until the idle nodes were removed"
    )
