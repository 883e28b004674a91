"""`raysl bench elastic`: what a change of nodes costs an elastic run (`train.num_workers: [1, 2]`),
on a local multi-node Ray cluster (ray.cluster_utils.Cluster: a head node and training nodes that
advertise {"raysl_train": 1}, which the run's workers ask for) in this process:

- reclaim (2 -> 1): one of the run's two nodes gets a drain notice with reason PREEMPTION through
  Ray's GCS client, as a cloud's spot reclaim reaches Ray, and goes at its deadline (`--deadline-s`);
- grow (1 -> 2): a second training node joins a run on one.

For each: seconds from the event (the notice; the node joining) to the new group's first step,
steps lost (trained by the old group and trained again by the new one), and the world size of
each attempt. A reclaim's seconds include the notice's deadline, which the workers wait out after
their checkpoint; a grow's include Ray's look for new nodes (its autoscaling coordinator looks
every 20 s) and the wait for the run's next checkpoint. Prints one JSON line.

`ElasticCluster` and `Run` are also what tests/elastic_run.py's drills move nodes with."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time

TRAIN_RESOURCE = {"raysl_train": 1}
# Ray Train's controller and preemption watcher look every 0.25 s / 0.5 s (defaults 2 s / 5 s) on
# this one machine; a node lost without notice is seen by the survivors at once and by Ray's node
# health checks seconds later, so Ray Train first tries the old size again: 15 s before it gives up
RUN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
}


class ElasticCluster:
    """A local Ray cluster of a head node (no training resource) and training nodes of 1 CPU and
    {"raysl_train": 1}, this process its driver."""

    def __init__(self, env: dict | None = None, *, log_to_driver: bool = True):
        import ray
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled; no stub names it
        from ray.cluster_utils import Cluster

        # the dashboard: Ray Train's placement-group cleaner asks its state API about the run
        from raysl.train.local_world import free_port

        head = {"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": True, "dashboard_port": free_port()}
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        # RAY_ADDRESS: Ray's state API in the job's processes finds this cluster, not another on this machine
        env = {**RUN_ENV, "RAY_ADDRESS": self.cluster.address, **(env or {})}
        ray.init(address=self.cluster.address, runtime_env={"env_vars": env}, log_to_driver=log_to_driver)
        self.gcs = GcsClient(address=self.cluster.gcs_address)

    def add(self):
        node = self.cluster.add_node(num_cpus=1, resources=TRAIN_RESOURCE)
        self.cluster.wait_for_nodes()
        return node

    def drain(self, node, deadline: float) -> None:
        """A spot reclaim's notice: drain `node` with reason PREEMPTION, to go at `deadline` (epoch s)."""
        from ray.core.generated import autoscaler_pb2

        reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")  # type: ignore[attr-defined]
        accepted, why = self.gcs.drain_node(node.node_id, reason, "spot instance reclaimed", int(deadline * 1000))
        if not accepted:
            raise RuntimeError(f"drain of node {node.node_id} refused: {why}")

    def remove(self, node) -> None:
        """The node goes at once, as an instance a cloud takes back (no graceful shutdown)."""
        self.cluster.remove_node(node, allow_graceful=False)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


class Run:
    """One run of raysl.pretrain in a thread of this process, while the caller moves nodes; it
    notes when each step first appears in metrics.jsonl and when each attempt starts."""

    def __init__(self, cfg):
        import raysl.pretrain

        self.cfg, self.dir = cfg, raysl.pretrain.run_dir(cfg)
        self.error: str | None = None
        self.seen: list[tuple[float, int, int]] = []  # (time, last step in metrics.jsonl, attempts) of each look
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import raysl.pretrain

        try:
            with contextlib.redirect_stdout(sys.stderr):  # pretrain's own lines: stdout is the bench's JSON line
                raysl.pretrain.pretrain(self.cfg)
        except Exception as exc:  # the outcome, read by the caller
            self.error = f"{type(exc).__name__}: {exc}"

    def _rows(self, name: str) -> list[dict]:
        path = os.path.join(self.dir, name)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def attempts(self) -> list[dict]:
        return self._rows("attempts.jsonl")

    def step(self) -> int:
        """The last step in metrics.jsonl (0: none yet), noted with the time and the attempts so far."""
        rows = self._rows("metrics.jsonl")
        step = rows[-1]["step"] if rows else 0
        self.seen.append((time.time(), step, len(self.attempts())))
        return step

    def wait(self, until, what: str, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while not until():
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"{self.cfg.train.name}: gave up waiting for {what} (error: {self.error})")
            time.sleep(0.1)

    def join(self) -> None:
        while self.thread.is_alive():
            self.step()
            self.thread.join(timeout=0.1)
        self.step()

    def newest_checkpoint_step(self) -> int:
        from raysl.train import recovery, storage

        path, _ = recovery.newest_complete(self.dir)
        return storage.checkpoint_step(path) if path else 0

    def cost(self, event_time: float) -> dict:
        """After the run: seconds from `event_time` to the second attempt's first step, the steps
        the first attempt trained that the second trained again, and each attempt's world size.
        The second attempt drops the first one's steps after its checkpoint from metrics.jsonl
        before its first step: its first step is the first look past them."""
        attempts = self.attempts()
        out: dict = {"world_sizes": [a["world_size"] for a in attempts], "error": self.error}
        if len(attempts) < 2:
            return out
        start = attempts[1]["start_step"]
        before = max(step for _, step, n in self.seen if n < 2)
        dropped = next(i for i, (_, step, n) in enumerate(self.seen) if n >= 2 and step <= start)
        first = next(t for t, step, _ in self.seen[dropped:] if step > start)
        return out | {"seconds_to_first_step": round(first - event_time, 2), "steps_lost": before - start}


def config(shards: str, storage: str, name: str, *overrides: str):
    """A [1, 2]-worker SimCLR run of test_resnet at 32 px: 4 images per worker, a global batch of 8,
    a checkpoint every 2 steps, resize checks every second, drain notices looked for every step."""
    from raysl.config import load_config

    return load_config(
        "quickstart",
        [
            f"data.shards={shards}",
            "data.image_size=32",
            "data.batch_size=4",
            "model.backbone=test_resnet",
            "method.proj_hidden_dim=64",
            "method.proj_dim=32",
            "optim.name=adamw",
            "deepspeed.zero_stage=2",
            "train.num_workers=[1, 2]",
            "train.worker_resources={raysl_train: 1}",
            "train.resize_check_s=1",
            "train.preemption_check_steps=1",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=1000",  # every checkpoint stays: each attempt names the one it started from
            "train.max_failures=1",
            "train.log_every=1",
            f"train.storage_path={storage}",
            f"train.name={name}",
            *overrides,
        ],
    )


def write_digit_shards(directory: str, n: int = 64) -> str:
    """`n` 32 x 32 digits in shards of 8 (each worker reads whole shards)."""
    import numpy as np

    from raysl.bench.methods import write_shards
    from raysl.data.demo_images import digit_pngs

    digits = digit_pngs(32, n)
    pngs, labels = [png for png, _ in digits], np.array([label for _, label in digits])
    return write_shards(directory, pngs, labels, np.arange(len(pngs)), shard_size=8, key="digits/{i:05d}.png")


def reclaim(cluster: ElasticCluster, shards: str, storage: str, spare, *, steps: int, deadline_s: float):
    """A run on two nodes whose second (`spare`) gets a drain notice after step 2 and goes at the
    notice's deadline. Returns (the Run, the notice's time, the step it came after, the step of the
    checkpoint the notice made, the only one before the run's last: train.checkpoint_every=1000)."""
    run = Run(config(shards, storage, "reclaim", f"train.max_steps={steps}", "train.checkpoint_every=1000"))
    run.wait(lambda: run.step() >= 2, "the second step")
    at, deadline = run.step(), time.time() + deadline_s
    cluster.drain(spare, deadline)
    noticed = time.time()
    run.wait(lambda: run.step() >= 0 and run.newest_checkpoint_step() > 0, "the drain notice's checkpoint")
    checkpoint_step = run.newest_checkpoint_step()
    time.sleep(max(0.0, deadline - time.time()))
    cluster.remove(spare)
    run.join()
    return run, noticed, at, checkpoint_step


def grow(cluster: ElasticCluster, shards: str, storage: str, *, steps: int, look_now: bool = False, then=None):
    """A run on one node, joined by a second after its first step. Returns (the Run, the join's
    time, the step it came after, the new node). `look_now`: have Ray's autoscaling coordinator
    look at the cluster as soon as the node is up, instead of at its next look (every 20 s), so
    that a short run cannot end before Ray sees the node (the drills). `then(run, joined, node)`,
    if given, is called once the node is up, before the run is waited for (the drills: the node
    goes again)."""
    run = Run(config(shards, storage, "grow", f"train.max_steps={steps}"))
    run.wait(lambda: run.step() >= 1, "the first step")
    at = run.step()
    node = cluster.add()
    joined = time.time()
    if look_now:
        from raysl.train.elastic import fresh_reservations

        fresh_reservations()
    if then is not None:
        then(run, joined, node)
    run.join()
    return run, joined, at, node


def run_elastic_bench(*, steps: int = 64, deadline_s: float = 10.0, out: str | None = None) -> dict:
    work = out or tempfile.mkdtemp(prefix="raysl_bench_elastic_")
    shards = write_digit_shards(os.path.join(work, "shards"))
    storage = os.path.join(work, "runs")
    cluster = ElasticCluster(log_to_driver=False)  # the workers' lines: not on the bench's stdout
    try:
        cluster.add()
        spare = cluster.add()
        run, noticed, _, _ = reclaim(cluster, shards, storage, spare, steps=steps, deadline_s=deadline_s)
        result = {"reclaim": run.cost(noticed) | {"deadline_s": deadline_s}}
        run, joined, _, _ = grow(cluster, shards, storage, steps=steps)
        result["grow"] = run.cost(joined)
    finally:
        cluster.shutdown()
    return {"steps": steps, "run_dir": storage, **result}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=64, help="steps of each run (8 per epoch of 64 images)")
    p.add_argument("--deadline-s", type=float, default=10.0, help="seconds from the drain notice to the node going")
    p.add_argument("--out", default=None, help="where the shards and runs go (default: a new temporary folder)")


def run_from_args(args: argparse.Namespace) -> dict:
    return run_elastic_bench(steps=args.steps, deadline_s=args.deadline_s, out=args.out)
