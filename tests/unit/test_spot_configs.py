"""cluster/ for spot capacity: each launcher YAML and KubeRay manifest has a spot GPU type scaled
from 0, after Ray fills in its defaults (launcher) or derives its autoscaling config (KubeRay);
its spot types are spot in the provider's own terms (AWS InstanceMarketOptions, GCP Spot
provisioning, GKE/Karpenter spot node labels); and the on-demand head advertises the resource
train.driver_resources names, which no spot type advertises, so a run's driver side never
lands on a node that can be reclaimed."""

import copy
import os
import shlex

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from raysl.config import load_config

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "cluster")
DRIVER, SPOT = "on_demand", "spot"
SPOT_LABELS = {"cloud.google.com/gke-spot": "true", "karpenter.sh/capacity-type": "spot"}


def _load(name: str) -> dict:
    with open(os.path.join(ROOT, name)) as f:
        return yaml.safe_load(f)


def _launcher_is_spot(node_config: dict) -> bool:
    if node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot":  # AWS
        return True
    return any(s.get("provisioningModel") == "SPOT" for s in node_config.get("scheduling", []))  # GCP


def _check_spot_types(types: dict, head: str, spot: set[str]) -> None:
    """The head advertises the driver resource and is not spot; a spot GPU type scales from 0
    and advertises `spot`; no spot type advertises the driver resource."""
    assert types[head]["resources"].get(DRIVER, 0) >= 1 and head not in spot
    assert spot and not any(types[t]["resources"].get(DRIVER) for t in spot)
    gpu_spot = [t for t in spot if types[t]["resources"].get("GPU", 0) >= 1]
    assert gpu_spot and all(
        types[t]["min_workers"] == 0 and types[t]["max_workers"] >= 1 and types[t]["resources"].get(SPOT)
        for t in gpu_spot
    )
    assert not any(types[t]["resources"].get(SPOT) for t in types if t not in spot)  # `spot` means spot


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_spot_types_pass_rays_schema(name):
    config = prepare_config(copy.deepcopy(_load(name)))
    validate_config(config)
    types = config["available_node_types"]
    spot = {t for t, v in types.items() if _launcher_is_spot(v.get("node_config", {}))}
    _check_spot_types(types, config["head_node_type"], spot)


def _pod_is_spot(pod: dict) -> bool:
    """Every node the pod may run on is a spot node, and it tolerates spot taints."""
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    required = [(e["key"], e["values"]) for t in terms for e in t["matchExpressions"] if e["operator"] == "In"]
    tolerated = {(t["key"], t.get("value")) for t in pod.get("tolerations", [])}
    return (
        len(required) == len(terms)  # each alternative requires a spot label
        and all(key in SPOT_LABELS and values == [SPOT_LABELS[key]] for key, values in required)
        and all(item in tolerated for item in SPOT_LABELS.items())
    )


def _head_avoids_spot(pod: dict) -> bool:
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return all(
        {(e["key"], e["operator"], tuple(e["values"])) for e in t["matchExpressions"]}
        >= {(k, "NotIn", (v,)) for k, v in SPOT_LABELS.items()}
        for t in terms
    )


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_spot_groups_give_a_valid_autoscaling_config(name):
    doc = _load(f"kuberay/{name}")
    cr = {"metadata": doc["metadata"], "spec": doc["spec"]["rayClusterSpec"]} if doc["kind"] == "RayJob" else doc
    config = _derive_autoscaling_config_from_ray_cr(cr)  # validates against Ray's schema itself
    groups = cr["spec"]["workerGroupSpecs"]
    spot = {
        g["groupName"] for g in groups if "affinity" in g["template"]["spec"] and _pod_is_spot(g["template"]["spec"])
    }
    _check_spot_types(config["available_node_types"], config["head_node_type"], spot)
    assert _head_avoids_spot(cr["spec"]["headGroupSpec"]["template"]["spec"])
    for group in groups:
        if group["groupName"] in spot:
            assert group["minReplicas"] == 0


def test_rayjob_keeps_its_driver_on_the_head():
    job = _load("kuberay/rayjob.yaml")["spec"]
    assert yaml.safe_load(job["entrypointResources"]) == {DRIVER: 1}
    argv = shlex.split(job["entrypoint"])
    cfg = load_config(argv[2], argv[3:])
    assert cfg.train.driver_resources == {DRIVER: 1} and cfg.train.worker_resources == {SPOT: 1}
