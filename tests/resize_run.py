"""A pretraining run whose workers record the keys each step trained on, for the resize tests.

In the test process (`recording_loop`, patched into raysl.pretrain), or as its own process with
its own local Ray of more logical CPUs than the session's (`python resize_run.py CONFIG KEYS
CPUS [--resume]`): a run of 3 or 4 workers, which the session's Ray of 2 CPUs cannot hold."""

import json
import sys


def recording_loop(keys_file: str):
    """The pretrain loop of every worker (raysl.pretrain.train_loop_per_worker), plus a callback
    writing the keys of each step's batches, per rank, to `keys_file`."""

    def loop(raw: dict) -> None:
        from raysl.config import from_dict
        from raysl.train.callback import Callback
        from raysl.train.trainer import Trainer

        class Keys(Callback):
            def setup(self, trainer) -> None:
                self.keys: list[str] = []
                to_batch = trainer.to_batch

                def recorded(batch):
                    self.keys += [str(k) for k in batch["key"]]
                    return to_batch(batch)

                trainer.to_batch = recorded

            def on_step(self, trainer, out, metrics) -> None:
                with open(keys_file, "a") as f:
                    f.write(json.dumps({"step": trainer.state["step"], "rank": trainer.rank, "keys": self.keys}) + "\n")
                self.keys = []

        trainer = Trainer(from_dict(raw["config"]), raw["run_dir"], callbacks=[Keys()], pins=raw.get("shard_pins"))
        trainer.fit()

    return loop


def run(monkeypatch, cfg, keys_file: str, *, resume: bool = False) -> str:
    """The run in the test process (the session's Ray), its keys recorded to `keys_file`."""
    import raysl.pretrain

    monkeypatch.setattr(raysl.pretrain, "train_loop_per_worker", recording_loop(keys_file))
    return raysl.pretrain.pretrain(cfg, resume=resume)["run_dir"]


def run_apart(cfg, keys_file: str, cpus: int, *, resume: bool = False) -> str:
    """The run in its own process and local Ray of `cpus` logical CPUs (this module's main)."""
    import os
    import subprocess

    from raysl.pretrain import run_dir

    config = keys_file + ".yaml"
    with open(config, "w") as f:
        f.write(cfg.to_yaml())
    cmd = [sys.executable, os.path.abspath(__file__), config, keys_file, str(cpus)]
    done = subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir(cfg)


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


def main(config_yaml: str, keys_file: str, cpus: int, resume: bool) -> None:
    import ray

    import raysl.pretrain
    from raysl.config import from_dict, load_yaml
    from raysl.runtime import worker_pool

    with open(config_yaml) as f:
        cfg = from_dict(load_yaml(f))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _system_config=worker_pool(cpus))
    raysl.pretrain.train_loop_per_worker = recording_loop(keys_file)
    raysl.pretrain.pretrain(cfg, resume=resume)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), "--resume" in sys.argv[4:])
