"""`raysl tune`: Ray Tune over any config key of a recipe.

Each trial (`RecipeTrial`, a class Trainable) fits the recipe's TorchTrainer (Ray Train
V2) with its sampled values in a background thread. A Ray Train callback forwards every
report of the training workers (metrics, the checkpoint when there is one) through a
queue to the trial, whose `step` returns it to Tune: ASHA stops trials on the metric,
PBT clones the checkpoints of the best trials. A Tune checkpoint is a pointer to the
Train checkpoint (no copy); a restored or exploited trial starts a fresh Train run from
it (the loop's `resume_from`), since Train V2 has no `resume_from_checkpoint`.
Why not a function trainable with Ray's TuneReportCallback: that callback forwards
metrics only, so PBT never sees a checkpoint and never exploits; and a stopped trial
must abort its Train run (`cleanup`) or the run's workers keep their CPUs/GPUs.

Layout under `<storage>/<name>/`: Tune's experiment (trial dirs, checkpoint pointers),
`train/<trial_id>/attempt_N/` (each Train run of a trial: config.yaml, metrics.jsonl,
Train checkpoints, resume_from.txt when it started from a checkpoint), `results.csv`,
`best.yaml`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import threading

from ray.train import UserCallback
from ray.tune import Trainable

from raysl.config import Config, from_dict, load_config
from raysl.errors import UserError
from raysl.paths import resolve_path
from raysl.train import storage as store  # `storage` is tune_recipe's argument
from raysl.tune import space as space_mod

SCHEDULERS = ("asha", "pbt")


def resolve_metric(cfg: Config, metric: str, mode: str | None) -> tuple[str, str]:
    """The metric the loop reports under that name, and min/max."""
    if metric.startswith("knn_"):
        if not cfg.eval.knn_shards:
            raise UserError(
                f"--metric {metric}: the online kNN monitor is off; set eval.knn_shards to a labeled shard set"
            )
        ks = cfg.eval.knn_k
        allowed = {"knn_top1"} | {f"knn_top{t}_k{k}" for t in (1, 5) for k in ks}
        if metric not in allowed:
            raise UserError(f"--metric {metric}: the kNN monitor reports {', '.join(sorted(allowed))}")
        default_mode = "max"
    elif metric == "loss":
        default_mode = "min"
    elif metric == "val_loss":
        if not cfg.eval.val_shards:
            raise UserError(
                f"--metric {metric}: the held-out loss is off; set eval.val_shards to a shard set kept out of training"
            )
        default_mode = "min"
    else:
        raise UserError(
            f"--metric {metric}: not a metric the training loop reports; use loss, val_loss with eval.val_shards "
            "set, or knn_top1 with eval.knn_shards set"
        )
    mode = mode or default_mode
    if mode not in ("min", "max"):
        raise UserError(f"--mode {mode}: use min or max")
    return metric, mode


class ForwardToTune(UserCallback):
    """Ray Train callback (runs in the Train controller): every report of the workers ->
    (metrics of rank 0, checkpoint or None, the controller's handle) onto the trial's queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        import ray

        self.queue.put((dict(metrics[0]), checkpoint, ray.get_runtime_context().current_actor))


def _plain(values: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}


def next_attempt(base: str) -> str:
    """A new Train run's name under the trial's folder (local or URI): each restart of a
    trial (PBT exploit, --resume) trains in a fresh attempt_N, never over an earlier one."""
    return f"attempt_{len(store.subdirs(base, 'attempt_'))}"


POINTER = "train_checkpoint.txt"
# A trial waits on its queue for the next report this long at a time, and between two waits
# looks whether its Train run has ended: the trial ends at most this long after its run.
RUN_END_LOOK_S = 0.25


class RecipeTrial(Trainable):
    """One Tune trial: the recipe with this trial's values, trained by a TorchTrainer in
    a background thread; each `step` is the Train run's next report.

    A Tune checkpoint is a pointer (train_checkpoint.txt) to the Train checkpoint, which
    already sits in the run's storage where every node can read it: nothing is copied.
    `cleanup` aborts a Train run still going (ASHA stop, PBT pause), so its workers and
    placement group are freed before the next trial starts."""

    # tune.with_parameters passes the keyword arguments; Trainable's type leaves them out
    def setup(self, config, *, base: dict, train_root: str, metric: str, report_every: int):  # type: ignore[override]
        self._base, self._train_root, self._metric, self._report_every = base, train_root, metric, report_every
        self._resume_from: str | None = None
        self._thread = None
        self._controller = None
        self._last_checkpoint = None
        self._last_metric = None
        self._last_out = None
        self._error: list[BaseException] = []

    def _start(self):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from raysl.pretrain import make_trainer, run_dir

        raw = space_mod.apply(self._base, _plain(self.config["params"]))
        storage = f"{self._train_root.rstrip('/')}/{self.trial_id}"
        raw["train"]["storage_path"] = storage
        raw["train"]["name"] = next_attempt(storage)
        cfg = from_dict(raw, origin=f"trial {self.trial_id}")
        self._out = run_dir(cfg)
        store.write_text(f"{self._out}/config.yaml", cfg.to_yaml())
        if self._resume_from:  # provenance: which (possibly another trial's) checkpoint this run starts from
            store.write_text(f"{self._out}/resume_from.txt", self._resume_from + "\n")
        # the queue on this trial's node, as Ray Train puts the run's controller: where the
        # trial's own resources (train.driver_resources) placed it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        trainer = make_trainer(
            cfg,
            self._out,
            callbacks=[ForwardToTune(self._queue)],
            resume_from=self._resume_from,
            report_every=self._report_every,
        )

        def fit():
            try:
                trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - raised again in step()
                self._error.append(exc)

        self._thread = threading.Thread(target=fit, daemon=True)
        self._thread.start()

    def step(self):
        from ray.util.queue import Empty

        if self._thread is None:
            self._start()
        while True:
            try:
                metrics, checkpoint, self._controller = self._queue.get(timeout=RUN_END_LOOK_S)
            except Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._thread.join()
                    if self._error:
                        raise self._error[0] from None
                    return {**(self._last_out or {}), "done": True}
                continue
            if checkpoint is not None:
                self._last_checkpoint = checkpoint
            if self._metric in metrics:
                self._last_metric = metrics[self._metric]
            elif self._last_metric is not None:  # kNN / val_loss come every eval.*_every steps: carry them
                metrics[self._metric] = self._last_metric
            else:
                continue  # nothing to rank this trial on yet
            out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            out["attempt_dir"] = self._out
            self._last_out = dict(out)
            if checkpoint is not None:
                out["should_checkpoint"] = True
            return out

    def save_checkpoint(self, checkpoint_dir: str):
        if self._last_checkpoint is None:
            return None
        ckpt = self._last_checkpoint
        path = ckpt.path if ckpt.filesystem.type_name == "local" else f"{ckpt.filesystem.type_name}://{ckpt.path}"
        with open(os.path.join(checkpoint_dir, POINTER), "w") as f:
            f.write(path)
        return checkpoint_dir

    # Ray passes what save_checkpoint returned, here a directory; Trainable types it as a dict
    def load_checkpoint(self, checkpoint_dir: str):  # type: ignore[override]
        with open(os.path.join(checkpoint_dir, POINTER)) as f:
            self._resume_from = f.read().strip()

    def cleanup(self):
        import ray

        if self._thread is not None and self._thread.is_alive() and self._controller is not None:
            try:
                ray.get(self._controller.abort.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - the controller may be gone already
                pass
            self._thread.join(timeout=30)

    def reset_config(self, new_config):
        return False  # a new config means a new Train run: never reuse this actor


def _scheduler(kind: str, params: list, *, total: int, checkpoint_every: int, grace_steps: int | None):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if kind == "asha":
        grace = grace_steps or max(1, total // 4)
        return ASHAScheduler(time_attr="step", max_t=total, grace_period=min(grace, total), reduction_factor=2)
    return PopulationBasedTraining(
        time_attr="step",
        perturbation_interval=checkpoint_every,
        hyperparam_mutations={"params": {p.key: p.tune_domain() for p in params}},
        quantile_fraction=0.5,
        resample_probability=0.25,
        # synchronous: the population waits at each perturbation, so every trial is ranked
        # against all others (asynchronous PBT rarely exploits in a small population)
        synch=True,
    )


def trial_resources(driver: dict[str, float]) -> dict[str, float]:
    """What each trial actor asks Tune for. The trial only drives its Train run, whose workers
    hold the CPUs/GPUs; Tune needs a non-empty request, so it asks for a little memory, and
    for `train.driver_resources` (as far as the cluster has them): the node the trial lands on
    also runs its Train controller and report queue, and should not be a spot node."""
    return {"cpu": 0, "memory": 64 * 1024**2, **driver}


def search_alg(search: str | None, scheduler: str, max_concurrent: int):
    if not search:
        return None
    if search != "optuna":
        raise UserError(f"--search {search}: the only search algorithm is optuna (default: random search)")
    if scheduler == "pbt":
        raise UserError("--search optuna does not combine with --scheduler pbt (PBT picks its own values); use asha")
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise UserError("--search optuna needs the optuna package, which is not installed: pip install optuna")
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(), max_concurrent=max_concurrent)


def tune_recipe(
    cfg: Config,
    params: list,
    *,
    scheduler: str = "asha",
    samples: int = 4,
    metric: str = "loss",
    mode: str | None = None,
    search: str | None = None,
    name: str = "tune",
    storage: str = "runs",
    resume: bool = False,
    max_concurrent: int = 1,
    grace_steps: int | None = None,
    address: str | None = None,
) -> dict:
    import ray.tune

    from raysl.data.buckets import check_bucket
    from raysl.pretrain import validate
    from raysl.runtime import driver_resources, init_ray
    from raysl.train.steps import total_steps

    if scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler {scheduler}: use asha or pbt")
    if samples < 1:
        raise UserError(f"--samples {samples}: must be >= 1")
    if scheduler == "pbt" and samples < 2:
        raise UserError("--scheduler pbt needs --samples >= 2 (a population)")
    check_bucket(storage, "--storage")
    metric, mode = resolve_metric(cfg, metric, mode)
    base = cfg.to_dict()
    for p in params:  # every trial's recipe must pass the same checks as `raysl pretrain`
        for value in p.values_to_check():
            validate(from_dict(space_mod.apply(base, {p.key: value}), origin=f"space {p.key}={value}"))
    validate(cfg)
    total = total_steps(cfg, cfg.train.max_workers)  # an elastic run steps with the global batch of its max
    exp_dir = store.run_dir(storage, name)
    exists = store.exists(exp_dir) and ray.tune.Tuner.can_restore(exp_dir)  # a local folder or a bucket URI
    if exists and not resume:
        raise UserError(f"tune experiment {exp_dir} exists: pass --resume to continue it, or --name NEW")
    if resume and not exists:
        raise UserError(f"--resume: {exp_dir} has no Tune experiment to continue")
    if metric.startswith("knn_"):
        report_every = cfg.eval.knn_every
    elif metric == "val_loss":
        report_every = cfg.eval.val_every
    else:
        report_every = cfg.train.log_every
    if scheduler == "pbt":
        report_every = 0  # PBT acts on reports that carry a checkpoint (every train.checkpoint_every steps)

    print(init_ray(address, quiet=True), flush=True)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            RecipeTrial, base=base, train_root=f"{exp_dir}/train", metric=metric, report_every=report_every
        ),
        trial_resources(driver_resources(cfg.train.driver_resources)),
    )
    if resume:
        tuner = ray.tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"params": {p.key: p.tune_domain() for p in params}},
            tune_config=ray.tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=samples,
                max_concurrent_trials=max_concurrent,
                scheduler=_scheduler(
                    scheduler, params, total=total, checkpoint_every=cfg.train.checkpoint_every, grace_steps=grace_steps
                ),
                search_alg=search_alg(search, scheduler, max_concurrent),
            ),
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=os.path.dirname(exp_dir),  # the absolute storage path or URI
                checkpoint_config=ray.tune.CheckpointConfig(
                    num_to_keep=max(cfg.train.keep_checkpoints, 3) if scheduler == "pbt" else cfg.train.keep_checkpoints
                ),
                verbose=0,
            ),
        )
    grid = tuner.fit()
    rows = _rows(grid, [p.key for p in params], metric, mode)
    if not rows:
        errors = [str(e) for e in grid.errors]
        raise UserError(
            f"tune {exp_dir}: no trial reported {metric}" + (f"; first error: {errors[0]}" if errors else "")
        )
    results_csv = f"{exp_dir}/results.csv"
    _write_csv(results_csv, rows)
    best = rows[0]
    best_raw = space_mod.apply(base, {k: best[k] for k in (p.key for p in params)})
    best_raw["train"]["name"] = f"{cfg.train.name}_best"
    best_cfg = from_dict(best_raw, origin="best trial")
    best_yaml = f"{exp_dir}/best.yaml"
    header = (
        f"# best trial {best['trial_id']} of `raysl tune` {exp_dir} ({metric} {best[metric]:.6g}, {mode})\n"
        f"# train it: raysl pretrain {best_yaml}\n"
    )
    store.write_text(best_yaml, header + best_cfg.to_yaml())
    return {
        "experiment_dir": exp_dir,
        "metric": metric,
        "mode": mode,
        "rows": rows,
        "table": format_table(rows, [p.key for p in params], metric),
        "results_csv": results_csv,
        "best_yaml": best_yaml,
        "errors": len(grid.errors),
    }


def _rows(grid, keys: list[str], metric: str, mode: str) -> list[dict]:
    """One row per trial: its values, its best `metric` and the step it was reached at,
    best trial first."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        if df is None or metric not in df or df[metric].dropna().empty:
            continue
        series = df[metric].dropna()
        i = series.idxmax() if mode == "max" else series.idxmin()
        values = _plain((result.config or {}).get("params", {}))
        rows.append(
            {
                "trial_id": result.metrics.get("trial_id", os.path.basename(result.path)),
                **{k: values.get(k) for k in keys},
                metric: float(series[i]),
                "step": int(df.loc[i, "step"]) if "step" in df else None,
                "last_step": int(df["step"].max()) if "step" in df else None,
                "status": "ERROR" if result.error else "done",
                "path": result.path,
            }
        )
    rows.sort(key=lambda r: r[metric], reverse=(mode == "max"))
    if any(math.isnan(r[metric]) for r in rows):
        rows.sort(key=lambda r: math.isnan(r[metric]))
    return rows


def _write_csv(path: str, rows: list[dict]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    store.write_text(path, buf.getvalue())


def format_table(rows: list[dict], keys: list[str], metric: str) -> str:
    cols = ["trial_id", *keys, metric, "step", "last_step", "status"]

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a shipped recipe name or a YAML path")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied before the search space")
    p.add_argument(
        "--space",
        type=resolve_path,
        required=True,
        help="SPACE.yaml: section.key -> {loguniform|uniform: [a, b]} | {choice: [...]} | {randint: [a, b]}",
    )
    p.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="asha",
        help="asha: stop weak trials early; pbt: copy the best trials' checkpoints and perturb their values "
        "(default asha)",
    )
    p.add_argument("--samples", type=int, default=4, help="trials (PBT: the population)")
    p.add_argument(
        "--metric", default="loss", help="loss, val_loss (needs eval.val_shards) or knn_top1 (needs eval.knn_shards)"
    )
    p.add_argument("--mode", choices=["min", "max"], default=None, help="default: min for loss, max for knn_*")
    p.add_argument(
        "--search", choices=["optuna"], default=None, help="Optuna TPE instead of random search (needs optuna)"
    )
    p.add_argument("--concurrent", type=int, default=1, help="trials at once (each takes train.num_workers workers)")
    p.add_argument(
        "--grace-steps", type=int, default=None, help="ASHA: steps before a trial can be stopped (default: a quarter)"
    )
    p.add_argument("--name", default="tune", help="experiment name (a folder under --storage)")
    p.add_argument("--storage", type=resolve_path, default="runs", help="local dir, NFS path or bucket URI")
    p.add_argument("--resume", action="store_true", help="continue the experiment --storage/--name")


def run_from_args(args: argparse.Namespace) -> None:
    cfg = load_config(args.recipe, args.overrides)
    result = tune_recipe(
        cfg,
        space_mod.load_space(args.space, cfg.method.name),
        scheduler=args.scheduler,
        samples=args.samples,
        metric=args.metric,
        mode=args.mode,
        search=args.search,
        name=args.name,
        storage=args.storage,
        resume=args.resume,
        max_concurrent=args.concurrent,
        grace_steps=args.grace_steps,
        address=args.address,
    )
    print(result["table"])
    keys = ("experiment_dir", "metric", "mode", "results_csv", "best_yaml", "errors")
    print(json.dumps({k: result[k] for k in keys}))
