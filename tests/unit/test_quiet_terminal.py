"""What raysl does so that third-party noise stays off the terminal, checked against the
libraries' own code paths (no Ray started)."""

import os
import types
import warnings

import pytest

from raysl import runtime


def _gather_without_a_process_group():
    import torch
    import torch.distributed as dist

    with pytest.raises((ValueError, RuntimeError)):  # no process group: it warns, then raises
        dist.all_gather_into_tensor(torch.zeros(2), torch.zeros(1))


def test_torchs_all_gather_deprecation_is_filtered_and_no_other_warning():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _gather_without_a_process_group()
    assert any("all_gather_into_tensor" in str(w.message) for w in seen)  # torch does warn

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        runtime.quiet_warnings()
        _gather_without_a_process_group()
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another deprecation"]


def test_a_worker_finds_its_own_cluster_with_other_ray_instances_on_the_machine(monkeypatch, restore_environ):
    """Ray's state API (Ray Train's placement-group cleaner) resolves its cluster through
    canonicalize_bootstrap_address_or_die; with two GCS processes on the machine and no
    RAY_ADDRESS it fails with "Found multiple active Ray instances"."""
    import ray
    from ray._private import services

    os.environ.pop("RAY_ADDRESS", None)
    os.environ[runtime.VERBOSE_ENV] = "1"  # only the address part of the hook
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: ["10.0.0.1:6379", "10.0.0.1:40000"])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    with pytest.raises(ConnectionError, match="multiple active Ray instances"):
        services.canonicalize_bootstrap_address_or_die(None)

    context = types.SimpleNamespace(gcs_address="10.0.0.1:40000")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    runtime.setup_worker()
    assert services.canonicalize_bootstrap_address_or_die(None) == "10.0.0.1:40000"

    os.environ["RAY_ADDRESS"] = "10.0.0.2:6379"  # a worker that already has one keeps it
    runtime.setup_worker()
    assert os.environ["RAY_ADDRESS"] == "10.0.0.2:6379"


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 96])
def test_the_idle_workers_raysl_keeps_stay_below_the_raylets_warning(cpus):
    """The raylet warns once its workers, less 2 x max_io_workers (4), reach 4 x its startup
    concurrency. raysl keeps up to num_workers_soft_limit idle workers; a run adds as many busy
    ones again (on 2 CPUs, Ray warned during raysl demo at 16 workers in all)."""
    pool = runtime.worker_pool(cpus)
    assert pool["worker_maximum_startup_concurrency"] >= cpus  # never fewer starts at once than Ray's default
    warns_at = 4 * pool["worker_maximum_startup_concurrency"] + 2 * 4
    assert warns_at > 2 * pool["num_workers_soft_limit"]


def test_a_local_start_is_a_ray_of_its_own_beside_one_from_ray_start(monkeypatch, restore_environ):
    """`ray start` leaves its address in Ray's temp dir, and ray.init() without an address joins
    that Ray; raysl's local start must not (nor can: it sets options only a new Ray takes)."""
    import ray
    from ray._private import services

    calls = []
    os.environ.pop("RAY_ADDRESS", None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2})
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: "10.0.0.1:6379")
    assert services.canonicalize_bootstrap_address(None) == "10.0.0.1:6379"  # what ray.init() would join
    runtime.init_ray()
    assert services.canonicalize_bootstrap_address(calls[-1]["address"]) is None  # Ray starts a new one
