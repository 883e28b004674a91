"""What raysl does so that third-party noise stays off the terminal, checked against the
libraries' own code paths (no Ray started)."""

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


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 96])
def test_the_idle_workers_raysl_keeps_stay_below_the_raylets_warning(cpus):
    """The raylet warns once its workers, less 2 x max_io_workers (4), reach 4 x its startup
    concurrency. raysl keeps up to num_workers_soft_limit idle workers; a run adds as many busy
    ones again (on 2 CPUs, Ray warned during raysl demo at 16 workers in all)."""
    pool = runtime.worker_pool(cpus)
    assert pool["worker_maximum_startup_concurrency"] >= cpus  # never fewer starts at once than Ray's default
    warns_at = 4 * pool["worker_maximum_startup_concurrency"] + 2 * 4
    assert warns_at > 2 * pool["num_workers_soft_limit"]
