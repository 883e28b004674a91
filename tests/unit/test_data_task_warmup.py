"""Which worker processes a training worker starts ahead for its view pipeline's tasks
(run_views.data_task_warmup): what those tasks import; one per CPU of the worker but the
one its own start uses, at most as many as its tasks run at once; none when the tasks run
on other nodes."""

import importlib

import pytest

from raysl.config import from_dict
from raysl.data import reader
from raysl.train.run_views import data_task_warmup


def cfg(cpus: int = 3, **data):
    return from_dict({"data": {"shards": "/s", **data}, "train": {"cpus_per_worker": cpus}})


def test_tasks_beside_the_worker_get_processes_that_imported_what_they_run():
    warm = data_task_warmup(cfg())
    assert warm is not None
    assert warm["count"] == 3 - 1  # the worker's CPUs less the one its own imports use
    assert reader._read_windows.__module__ in warm["modules"]
    assert "raysl.data.views" in warm["modules"]
    for name in warm["modules"]:
        importlib.import_module(name)  # each is a module the task's process can import


def test_views_made_on_the_worker_warm_the_decoding_module_and_no_more_than_the_tasks_run():
    warm = data_task_warmup(cfg(cpus=8, augment_on="worker", augment_tasks=1))
    assert warm == {"count": 2, "modules": ["raysl.data.reader", "raysl.data.decode"]}  # 1 read + 1 augment task


def test_a_worker_of_one_cpu_gets_none():
    assert data_task_warmup(cfg(cpus=1)) is None


@pytest.mark.parametrize("data", [{"task_cpus": 1.0}, {"task_resources": {"data_node": 1}}])
def test_tasks_placed_on_other_nodes_get_none(data):
    assert data_task_warmup(cfg(**data)) is None
