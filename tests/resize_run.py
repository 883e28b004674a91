"""A pretraining run whose workers record the keys each step trained on, for the resize tests.

In the test process (`recording_loop`, patched into raysl.pretrain), or in a process of its own
with its own local Ray of more logical CPUs than the session's (`python resize_run.py CPUS
CONFIG KEYS RESUME [CONFIG KEYS RESUME ...]`, the runs one after another): runs of 3 or 4
workers, which the session's Ray of 2 CPUs cannot hold."""

import json
import sys


def recording_loop(keys_file: str):
    """The pretrain loop of every worker (raysl.pretrain.train_loop_per_worker), plus a callback
    appending to `keys_file`, per step and rank, the keys of the images the step trained on, with
    the attempt (an id the attempt's workers share), its world size and the step's epoch."""

    def loop(raw: dict) -> None:
        import uuid

        import ray.train.collective

        from raysl.config import from_dict
        from raysl.train.callback import Callback
        from raysl.train.trainer import Trainer

        attempt = ray.train.collective.broadcast_from_rank_zero(uuid.uuid4().hex)

        class Keys(Callback):
            def setup(self, trainer) -> None:
                self.keys: list[str] = []
                to_batch = trainer.to_batch

                def recorded(batch):
                    self.keys += [str(k) for k in batch["key"]]
                    return to_batch(batch)

                trainer.to_batch = recorded

            def on_step(self, trainer, out, metrics) -> None:
                row = {"attempt": attempt, "world": trainer.world, "rank": trainer.rank, "keys": self.keys}
                row |= {"step": trainer.state["step"], "epoch": trainer.state["epoch"]}
                with open(keys_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
                self.keys = []

        trainer = Trainer(from_dict(raw["config"]), raw["run_dir"], callbacks=[Keys()], pins=raw.get("shard_pins"))
        trainer.fit()

    return loop


def run(monkeypatch, cfg, keys_file: str, *, resume: bool = False) -> str:
    """The run in the test process (the session's Ray), its keys recorded to `keys_file`."""
    import raysl.pretrain

    monkeypatch.setattr(raysl.pretrain, "train_loop_per_worker", recording_loop(keys_file))
    return raysl.pretrain.pretrain(cfg, resume=resume)["run_dir"]


def run_apart(*runs: tuple, cpus: int) -> list[str]:
    """The runs, each (config, keys file, resume), one after another in one process of their own
    with a local Ray of `cpus` logical CPUs (this module's main); their run directories."""
    import os
    import subprocess

    from raysl.pretrain import run_dir

    cmd = [sys.executable, os.path.abspath(__file__), str(cpus)]
    for cfg, keys_file, resume in runs:
        config = keys_file + ".yaml"
        with open(config, "w") as f:
            f.write(cfg.to_yaml())
        cmd += [config, keys_file, str(int(resume))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [run_dir(cfg) for cfg, _, _ in runs]


def keys_of(keys_file: str) -> dict[int, list[str]]:
    """step -> the keys of its global batch (ranks in order)."""
    rows = [json.loads(line) for line in open(keys_file)]
    out: dict[int, list[str]] = {}
    for r in sorted(rows, key=lambda r: (r["step"], r["rank"])):
        out.setdefault(r["step"], []).extend(r["keys"])
    return out


def each_image_once(*steps: list[str]) -> list[str]:
    keys = [k for step in steps for k in step]
    assert len(keys) == len(set(keys)), "an image trained on twice in one epoch"
    return keys


def main(cpus: int, runs: list[tuple[str, str, bool]]) -> None:
    import ray

    import raysl.pretrain
    from raysl.config import from_dict, load_yaml
    from raysl.runtime import LOCAL_ENV, SETUP_HOOK, worker_pool

    ray.init(  # as tests/conftest.py's ray_local: a Ray of its own, found by its workers' state API calls
        address="local",
        num_cpus=cpus,
        include_dashboard=True,
        log_to_driver=False,
        runtime_env={"env_vars": LOCAL_ENV, "worker_process_setup_hook": SETUP_HOOK},
        _system_config=worker_pool(cpus),
    )
    for config_yaml, keys_file, resume in runs:
        with open(config_yaml) as f:
            cfg = from_dict(load_yaml(f))
        raysl.pretrain.train_loop_per_worker = recording_loop(keys_file)
        raysl.pretrain.pretrain(cfg, resume=resume)


if __name__ == "__main__":
    args = sys.argv[2:]
    main(int(sys.argv[1]), [(args[i], args[i + 1], args[i + 2] == "1") for i in range(0, len(args), 3)])
