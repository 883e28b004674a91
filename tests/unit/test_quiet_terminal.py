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
