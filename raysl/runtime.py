"""Connecting to Ray: an embedded local Ray by default, or an existing cluster; and how loud
the libraries under raysl are.

Quiet by default: the terminal shows raysl's own progress, results and warnings (a
collapse, skipped images, a failed upload). Third-party lines that tell a raysl user
nothing are turned off where they start, in the driver and in every Ray worker of the job:
Ray Data's per-dataset lines and progress logs, bitsandbytes' CPU-kernel probe, DeepSpeed's
accelerator and untested-optimizer notes, Ray's own INFO lines on the driver, and Ray
Train's INFO lines where raysl builds the RunConfig (`train_logging`), torch's
deprecation of the all-gather that DeepSpeed's ZeRO calls on every step (QUIET_WARNINGS).
`raysl --verbose` (RAYSL_VERBOSE=1) leaves every library as it is.

Not turned off on a cluster: Ray Train 2.60's controller logs a C++ error line ("PreemptionWatcher
... constructor arguments in the object store") at every start of a worker group. The only switch
for it, RAY_BACKEND_LOG_LEVEL, makes every Ray process print a line that it was set, which is
worse. A local Ray has no watcher to start (LOCAL_ENV), and so no such line.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

VERBOSE_ENV = "RAYSL_VERBOSE"
# Python loggers of other libraries, and the least level of theirs that reaches the terminal.
# ray.data._internal.progress only says that its bars are off (raysl draws its own); Ray
# Train 2.60 names the logger of "Reporting training result ..." by its file's path.
QUIET_LOGGERS = {
    "bitsandbytes": logging.ERROR,
    "DeepSpeed": logging.ERROR,
    "ray.data._internal.progress": logging.ERROR,
    os.path.join("{ray}", "train", "v2", "_internal", "execution", "context.py"): logging.WARNING,
}
# Python warnings of other libraries, matched by the start of their message. DeepSpeed's ZeRO
# (stages 1-3) gathers with the name torch 2.14 deprecates, once from every worker.
QUIET_WARNINGS = {r"`torch\.distributed\.all_gather_into_tensor` is deprecated": FutureWarning}
# Read by Ray Data, in the driver and in the workers
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# Ray Train's controller polls its workers every 2 s (its default; the poll also collects
# their reports), so it sees a run end up to 2 s late. A local Ray holds one machine's
# workers: every 0.25 s (a run's end, last checkpoint to `fit` returning, then takes about
# half as long). A joined cluster keeps Ray's 2 s (at 1,024 workers, 512 calls a
# second already). A slow poll is not an error: Ray waits 10 minutes on one.
# Ray Train also starts a preemption watcher (an actor: one more process) with each group of
# workers, which asks Ray every 5 s whether a node of the group is being drained (a spot
# reclaim). A local Ray is this one machine, which no one drains from under its driver: none.
LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` in the job's driver
# How pyarrow (and boto) find a bucket and its credentials. A local Ray's workers inherit
# them from this process; the workers of a cluster raysl joins get the ones set here.
STORAGE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
SETUP_HOOK = "raysl.runtime.setup_worker"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose(on: bool) -> None:
    """`--verbose` or not, for this process and the local Ray it starts (children inherit the
    environment); call it before Ray, Ray Data or DeepSpeed are imported."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)  # the user's own setting wins
    quiet_logs()


class _AtLeast(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def quiet_logs() -> None:
    """QUIET_LOGGERS' levels and QUIET_WARNINGS, in this process. Also run in every worker of
    the job before any task (`setup_worker`)."""
    import ray

    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name.format(ray=os.path.dirname(ray.__file__)))
        logger.setLevel(level)  # child loggers (bitsandbytes.backends...) inherit it
        logger.addFilter(_AtLeast(level))  # kept when the library resets its level on import (DeepSpeed)
    quiet_warnings()


def quiet_warnings() -> None:
    for message, category in QUIET_WARNINGS.items():
        warnings.filterwarnings("ignore", message=message, category=category)


def setup_worker() -> None:
    """Ray's worker_process_setup_hook: runs in every worker process of the job before any task.
    Quiet unless --verbose, and the worker's RAY_ADDRESS is the cluster it belongs to."""
    import ray

    # Ray's state API (ray.util.state) finds its cluster from RAY_ADDRESS, else from the Ray
    # started last with `ray start`, else from the one GCS process running on this machine:
    # with another Ray on the machine it finds several and fails. Ray Train's placement-group
    # cleaner calls it in a worker every few seconds.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    if not verbose():
        quiet_logs()


def _quiet_runtime_env() -> dict | None:
    """The job's workers: quiet too. A job from `ray job submit` brings its own runtime_env,
    which Ray refuses to merge with one that sets the same keys: that one rules there."""
    if verbose() or _JOB_ENV in os.environ:
        return None
    env = {k: v for k, v in QUIET_ENV.items() if k not in os.environ or os.environ[k] == v}
    return {"env_vars": env, "worker_process_setup_hook": SETUP_HOOK}


def cluster_runtime_env() -> dict | None:
    """The runtime env of a job that joins a running cluster: quiet (`_quiet_runtime_env`) and
    with the storage variables (STORAGE_ENV) this process has, so every worker reaches the
    same buckets as the driver. A `ray job submit` job brings its own runtime_env: none."""
    if _JOB_ENV in os.environ:
        return None
    storage = {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}
    env = _quiet_runtime_env() or {}
    if storage:
        env["env_vars"] = {**env.get("env_vars", {}), **storage}
    return env or None


def train_logging():
    """Ray Train's RunConfig(logging_config=...): its INFO lines (resources requested, worker
    group started, each checkpoint and report) only with --verbose."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def worker_pool(num_cpus: int | None) -> dict:
    """Ray's worker pool for a local start: no processes started ahead that nothing can use;
    keep idle workers (up to twice the CPUs, at least 8) instead of killing them after 1 s
    idle. Each epoch's view pipeline runs its tasks in whatever idle workers there are; a
    killed one is replaced by a fresh process that spends 1-2 s importing the views'
    dependencies (3-5 s when they pulled in torchvision) before its first block, and with
    ordered streams every later block waits behind it (seconds of stall per epoch)."""
    cpus = num_cpus or os.cpu_count() or 1
    pool = max(8, 2 * cpus)
    return {
        "num_workers_soft_limit": pool,
        "idle_worker_killing_time_threshold_ms": 600_000,
        # The raylet prints "N PYTHON worker processes have been started ... 4x the maximum
        # expected startup concurrency" once its workers outnumber 4x that concurrency (default:
        # the CPUs) plus 8 I/O workers: on 2 CPUs, a pool of 8 idle workers plus a run's actors.
        # Twice the pool is expected here; the setting also lets as many workers start at once.
        "worker_maximum_startup_concurrency": max(cpus, pool // 2),
        # The raylet starts a Python worker per CPU when the first driver connects, with no
        # runtime env. A local raysl job carries one (its settings and setup hook), so none of
        # its tasks or actors can use those processes: they only take CPU from the run's start.
        "prestart_worker_first_driver": False,
    }


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> str:
    """Join the cluster at `address` (or $RAY_ADDRESS); otherwise start a local Ray.
    `quiet=False` shows the workers' output (raysl's progress lines) on this terminal.
    Returns a line that says which."""
    import ray

    if ray.is_initialized():
        return "Ray: already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = dict(log_to_driver=not quiet, runtime_env=_quiet_runtime_env())
    if not verbose():
        options["logging_level"] = logging.WARNING  # Ray's own INFO lines on this process
    if address:
        ray.init(address=address, **{**options, "runtime_env": cluster_runtime_env()})
        return f"Ray: joined cluster at {address}"
    runtime_env = options["runtime_env"] or {}
    local = {k: v for k, v in LOCAL_ENV.items() if k not in os.environ}  # the user's own setting wins
    options["runtime_env"] = {
        **runtime_env,
        "env_vars": {**runtime_env.get("env_vars", {}), **local},
        "worker_process_setup_hook": SETUP_HOOK,  # with --verbose too: the workers' RAY_ADDRESS
    }
    # With the dashboard: Ray Train's placement-group cleaner and `ray list` need its state
    # API (without it the cleaner warns every few seconds); it costs about 2 s at start.
    # address="local": a Ray of our own even when `ray start` left one on this machine, which
    # ray.init() would otherwise try to join, and fail: a Ray it joins takes none of these options.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        _system_config=worker_pool(num_cpus),
        **options,
    )
    return f"Ray: started locally with {int(ray.cluster_resources().get('CPU', 0))} CPUs"


def driver_resources(wanted: dict[str, float], cluster: dict[str, float] | None = None) -> dict[str, float]:
    """`train.driver_resources` as far as the cluster (`ray.cluster_resources()` unless given)
    advertises them. One that no node advertises is left out, with a line saying so: a recipe
    written for a cluster whose head advertises the resource still runs on a laptop."""
    import sys

    if not wanted:
        return {}
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    missing = sorted(k for k in wanted if k not in cluster)
    if missing:
        print(
            f"raysl: train.driver_resources: no node advertises {', '.join(missing)}; "
            "the run's driver side goes wherever Ray places it",
            file=sys.stderr,
            flush=True,
        )
    return {k: v for k, v in wanted.items() if k in cluster}


def check_driver_node(wanted: dict[str, float]) -> list[str]:
    """The resources of `train.driver_resources` that some node advertises but this process's
    node does not, with a line saying what that costs. Ray Train runs a run's controller on
    its driver's node, so a driver on a spot node ends the run when that node is reclaimed."""
    import sys

    import ray

    here = ray.get_runtime_context().get_node_id()
    node: dict = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == here), {})
    lacking = sorted(k for k in driver_resources(wanted) if k not in node)
    if lacking:
        print(
            f"raysl: this driver's node does not advertise {', '.join(lacking)} (train.driver_resources); Ray Train "
            "runs the controller on the driver's node, so losing this node ends the run. Run the driver where the "
            "resource is: `ray job submit` puts a job's driver on the head, or give it "
            f"--entrypoint-resources '{json.dumps({k: wanted[k] for k in lacking})}'",
            file=sys.stderr,
            flush=True,
        )
    return lacking


def keep_data_stats_here() -> None:
    """Start Ray Data's stats actor on this process's node, unless the cluster has one. Ray Data
    starts it (detached, pinned to its node) from the first process that runs a dataset: in a
    raysl run, a training worker. That node then never counts as idle again, so the autoscaler
    never removes it, and when it is a spot node its reclaim takes the actor along. The run's
    driver starts it first, on the node train.driver_resources keeps the driver on."""
    from ray.data._internal.stats import get_or_create_stats_actor  # Ray Data's own get-or-create

    get_or_create_stats_actor()


def _import_modules(modules: list[str]) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


def warm_workers(count: int, modules: list[str]) -> None:
    """Start `count` idle Ray worker processes, on this node, that have imported `modules`,
    without waiting for them. Ray hands its idle processes to the next tasks of the same
    job and runtime env: tasks submitted from this process that would otherwise each start
    a fresh process and import their dependencies (seconds, before any of their work)."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_import_modules)
    for _ in range(count):
        task.remote(modules)
