"""Elastic runs (`train.num_workers: [1, 2]`) on a local multi-node Ray cluster whose nodes come
and go, for tests/drills/test_elastic.py (which also checks `raysl bench elastic`'s figures of them).

`python elastic_run.py OUT SHARDS` (its own process: a cluster of its own, token auth on when the
environment asks for it) starts a head node and training nodes that advertise {"raysl_train": 1},
then runs, one after another on the same cluster, with the runs' workers asking for that resource:
  grow:      one training node; a second joins once the run has trained a step; once the run's
             two workers have trained 3 steps, that node is killed without a notice (the hard loss:
             the same run goes on with one worker, so no third group of workers is started for it);
  reclaim:   two nodes; one gets a drain notice (reason PREEMPTION, through the GCS client, as a
             spot reclaim does) with a deadline 10 s away, and is killed at the deadline;
  too_few:   one node for a run of [2, 2] that gives up waiting after 3 s.
The cluster and the runs are raysl.bench.elastic's (`raysl bench elastic` measures the grow and
the reclaim; its figures of these runs go to OUT/events.json too). Every worker records the keys
of the images of each step it trains (with its attempt, world size, epoch and rank) to
OUT/<name>.keys; OUT/events.json says what was done at which step."""

import json
import os
import sys
import time

from resize_run import recording_loop  # the keys of each step, with attempt, world size and epoch

HERE = os.path.dirname(os.path.abspath(__file__))
# the grow run has steps to spare after the node joins (Ray is made to look at once, then waits
# for the next checkpoint), however fast the machine trains them
GROW_STEPS, STEPS = 128, 32


def steps_trained(keys_file: str, *, world: int) -> int:
    """Steps rank 0 has recorded in `keys_file` (resize_run.recording_loop) with `world` workers."""
    if not os.path.exists(keys_file):
        return 0
    with open(keys_file) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]  # a line being written: not yet
    return sum(1 for r in rows if r["rank"] == 0 and r["world"] == world)


def main(out: str, shards: str) -> None:
    import raysl.pretrain
    from raysl.bench import elastic
    from raysl.train.elastic import fresh_reservations

    storage = os.path.join(out, "runs")
    cluster = elastic.ElasticCluster()
    events: dict = {}

    def save():
        with open(os.path.join(out, "events.json"), "w") as f:
            json.dump(events, f)

    def recording(name: str) -> None:
        raysl.pretrain.train_loop_per_worker = recording_loop(os.path.join(out, f"{name}.keys"))

    try:
        cluster.add()
        # grow: [1, 2] on one training node; a second one joins after the first step
        recording("grow")
        keys = os.path.join(out, "grow.keys")

        def hard_loss(run, joined, second):
            # once the two workers have trained 3 steps, the second node goes without a notice
            run.wait(lambda: run.step() >= 0 and steps_trained(keys, world=2) >= 3, "3 steps on two workers")
            events["grow"] = {"cost": run.cost(joined)}  # of the grow alone: `raysl bench elastic`'s figures
            events["hard_loss"] = {"step": run.step(), "time": time.time()}
            cluster.remove(second)

        run, _, at, _ = elastic.grow(cluster, shards, storage, steps=GROW_STEPS, look_now=True, then=hard_loss)
        events["grow"] |= {"step": at, "error": run.error}
        events["hard_loss"]["error"] = run.error
        save()

        # reclaim: two nodes again; the new one is drained as a spot reclaim, and goes at the deadline.
        # Ray looks at the cluster at once (it looks every 20 s), so the run starts on both nodes
        third = cluster.add()
        fresh_reservations()
        recording("reclaim")
        run, noticed, at, checkpoint_step = elastic.reclaim(cluster, shards, storage, third, steps=STEPS, deadline_s=10)
        events["reclaim"] = {"step": at, "checkpoint_step": checkpoint_step, "error": run.error}
        events["reclaim"]["cost"] = run.cost(noticed)
        save()

        # too few: a run of [2, 2] on the one node left gives up after 3 s with one line
        recording("too_few")
        overrides = ("train.num_workers=[2, 2]", "train.min_workers_timeout_s=3")
        run = elastic.Run(elastic.config(shards, storage, "too_few", *overrides))
        run.join()
        events["too_few"] = {"error": run.error}
        save()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
