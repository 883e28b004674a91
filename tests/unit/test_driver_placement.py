"""train.driver_resources without Ray: the key's checks, the request each `raysl tune` trial makes
(the node it lands on also runs its Train controller), the laptop fallback, and the entrypoint
resources jobs/submit.py hands to the Jobs API."""

import importlib.util
import os

import pytest
import ray
import ray.tune
from shardfactory import digit_images, write_shards

from raysl.config import load_config
from raysl.errors import UserError
from raysl.runtime import driver_resources
from raysl.tune.space import parse_space

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_key_takes_custom_resources_only():
    assert load_config("quickstart").train.driver_resources == {}  # today's placement unless asked
    cfg = load_config("quickstart", ["train.driver_resources={on_demand: 1}"])
    assert cfg.train.driver_resources == {"on_demand": 1.0}
    with pytest.raises(UserError, match=r"train.driver_resources: 'CPU' is not a custom resource name"):
        load_config("quickstart", ["train.driver_resources={CPU: 1}"])
    with pytest.raises(UserError, match=r"train.driver_resources.on_demand: -1.0 is out of range"):
        load_config("quickstart", ["train.driver_resources={on_demand: -1}"])


def test_a_resource_no_node_advertises_is_left_out_with_a_line(capsys):
    cluster = {"CPU": 2.0, "memory": 1e9, "on_demand": 100.0}
    assert driver_resources({"on_demand": 1.0}, cluster) == {"on_demand": 1.0}
    assert capsys.readouterr().err == ""
    assert driver_resources({"on_demand": 1.0, "head_pool": 1.0}, cluster) == {"on_demand": 1.0}
    assert "no node advertises head_pool" in capsys.readouterr().err
    assert driver_resources({"on_demand": 1.0}, {"CPU": 8.0}) == {}  # a laptop: the run goes on where it is
    assert "no node advertises on_demand" in capsys.readouterr().err


@pytest.fixture
def tune_until_tuner(monkeypatch):
    """tune_recipe up to the Tuner, on a cluster whose resources the test gives; returns the
    trainable it would have run."""
    import raysl.runtime

    seen = {}

    class Stop(Exception):
        pass

    class Tuner:
        def __init__(self, trainable, **kwargs):
            seen["trainable"] = trainable
            raise Stop

    def run(cfg, cluster):
        monkeypatch.setattr(raysl.runtime, "init_ray", lambda *a, **k: "Ray: test")
        monkeypatch.setattr(ray, "cluster_resources", lambda: cluster)
        monkeypatch.setattr(ray.tune, "Tuner", Tuner)
        from raysl.tune.search import tune_recipe

        space = parse_space({"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "simclr")
        with pytest.raises(Stop):
            tune_recipe(cfg, space, samples=1, storage=str(cfg.train.storage_path), name="t")
        return seen["trainable"].default_resource_request({}).bundles

    return run


def test_each_trial_asks_for_the_driver_resource_the_cluster_has(tmp_path, tune_until_tuner):
    shards = str(tmp_path / "shards")
    write_shards(shards, digit_images(16), shard_size=8)
    base = [f"data.shards={shards}", "data.batch_size=4", f"train.storage_path={tmp_path}"]
    cfg = load_config("quickstart", [*base, "train.driver_resources={on_demand: 1}"])
    [bundle] = tune_until_tuner(cfg, {"CPU": 0.0, "on_demand": 100.0, "GPU": 4.0})
    assert bundle == {"on_demand": 1, "memory": 64 * 1024**2}  # no CPU: the Train workers hold those
    [laptop] = tune_until_tuner(cfg, {"CPU": 8.0})  # no node has it: no request Ray could never place
    assert laptop == {"memory": 64 * 1024**2}


def _submit_module():
    spec = importlib.util.spec_from_file_location("jobs_submit", os.path.join(REPO, "jobs", "submit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submit_hands_the_entrypoint_resources_to_the_jobs_api(monkeypatch):
    import ray.job_submission

    submitted = {}

    class Client:
        def __init__(self, address):
            pass

        def submit_job(self, **kwargs):
            submitted.update(kwargs)
            raise SystemExit(0)

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    submit = _submit_module()
    with pytest.raises(SystemExit):
        submit.main(["--entrypoint-resources", '{"on_demand": 1}', "--", "raysl", "pretrain", "quickstart"])
    assert submitted["entrypoint_resources"] == {"on_demand": 1}
    assert submitted["entrypoint"] == "raysl pretrain quickstart"
    with pytest.raises(SystemExit):
        submit.main(["--", "raysl", "pretrain", "quickstart"])
    assert submitted["entrypoint_resources"] is None  # Ray's default: the driver on the head node
    with pytest.raises(SystemExit) as bad:
        submit.parse_args(["--entrypoint-resources", '{"on_demand": 0}', "--", "raysl"])
    assert bad.value.code == 2


def test_a_driver_on_a_node_without_the_resource_says_what_that_costs(monkeypatch, capsys):
    from types import SimpleNamespace

    from raysl.runtime import check_driver_node

    nodes = [
        {"NodeID": "head", "Resources": {"CPU": 0.0, "on_demand": 100.0}},
        {"NodeID": "spot1", "Resources": {"CPU": 8.0, "GPU": 1.0, "spot": 1.0}},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "on_demand": 100.0, "spot": 1.0})
    for here, lacking in (("head", []), ("spot1", ["on_demand"])):
        monkeypatch.setattr(ray, "get_runtime_context", lambda here=here: SimpleNamespace(get_node_id=lambda: here))
        assert check_driver_node({"on_demand": 1.0}) == lacking
    err = capsys.readouterr().err
    assert "this driver's node does not advertise on_demand" in err and "--entrypoint-resources" in err
