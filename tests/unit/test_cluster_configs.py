"""cluster/: the launcher YAMLs pass Ray's own cluster-config schema (after Ray fills in
the provider defaults, as `ray up` does), the KubeRay manifests turn into a valid
autoscaling config through Ray's KubeRay autoscaler code, and all of them have the shape
raysl needs: a head with no work on it, GPU workers scaled from 0, CPU-only data nodes
advertising the resource the recipe asks for, Ray pinned to the version raysl uses."""

import copy
import os
import shlex

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from raysl.config import load_config

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "cluster")
DATA_RESOURCE = "data_node"


def _load(name: str) -> dict:
    with open(os.path.join(ROOT, name)) as f:
        return yaml.safe_load(f)


def _check_node_types(types: dict, head: str) -> None:
    assert types[head]["resources"].get("CPU") == 0 and not types[head]["resources"].get("GPU")
    workers = {k: v for k, v in types.items() if k != head}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    data = [v for v in workers.values() if v["resources"].get(DATA_RESOURCE, 0) >= 1]
    assert gpu and all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in gpu)
    assert data and all(
        v["min_workers"] == 0 and not v["resources"].get("GPU") and v["resources"]["CPU"] >= 1 for v in data
    )


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_rays_schema(name):
    raw = _load(name)
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    _check_node_types(config["available_node_types"], config["head_node_type"])
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any("pip install" in c and "raysl" in c for c in raw["setup_commands"])
    assert any("--num-cpus=0" in c for c in raw["head_start_ray_commands"])

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0  # a typo Ray's schema must catch
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def _kuberay_cluster(name: str) -> dict:
    doc = _load(f"kuberay/{name}")
    assert doc["apiVersion"] == "ray.io/v1"
    if doc["kind"] == "RayJob":
        return {"metadata": doc["metadata"], "spec": doc["spec"]["rayClusterSpec"]}
    assert doc["kind"] == "RayCluster"
    return doc


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_give_a_valid_autoscaling_config(name):
    cr = _kuberay_cluster(name)
    spec = cr["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == ray.__version__
    config = _derive_autoscaling_config_from_ray_cr(cr)  # validates against Ray's schema itself
    _check_node_types(config["available_node_types"], config["head_node_type"])
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_entrypoint_is_a_valid_raysl_command():
    job = _load("kuberay/rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["raysl", "pretrain"]
    cfg = load_config(argv[2], argv[3:])  # every override names a real key with a valid value
    assert cfg.train.gpus_per_worker >= 1 and cfg.train.storage_path.startswith("s3://")
    assert cfg.data.task_cpus >= 1 and cfg.data.task_resources.get(DATA_RESOURCE, 0) > 0  # data tasks on data nodes


def test_image_pins_the_same_ray():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        base = next(line.split()[1] for line in f if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")
