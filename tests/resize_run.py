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
