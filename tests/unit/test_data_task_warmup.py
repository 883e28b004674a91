"""Which worker processes a training worker starts ahead for its view pipeline's tasks
(run_views.data_task_warmup): what those tasks import, as many as run at once, and none
when the tasks run on other nodes."""

import importlib

import pytest

from raysl.config import from_dict
from raysl.data import reader
from raysl.train.run_views import data_task_warmup


def cfg(**data):
    return from_dict({"data": {"shards": "/s", **data}, "train": {"cpus_per_worker": 3}})


def test_tasks_beside_the_worker_get_processes_that_imported_what_they_run():
    warm = data_task_warmup(cfg())
    assert warm is not None
    assert warm["count"] == 2 * 3  # read and augment tasks, train.cpus_per_worker of each at once
    assert reader._read_windows.__module__ in warm["modules"]
    assert "raysl.data.views" in warm["modules"]
    for name in warm["modules"]:
        importlib.import_module(name)  # each is a module the task's process can import


def test_views_made_on_the_worker_warm_the_decoding_module_and_augment_tasks_count():
    warm = data_task_warmup(cfg(augment_on="worker", augment_tasks=1))
    assert warm == {"count": 2, "modules": ["raysl.data.reader", "raysl.data.decode"]}


@pytest.mark.parametrize("data", [{"task_cpus": 1.0}, {"task_resources": {"data_node": 1}}])
def test_tasks_placed_on_other_nodes_get_none(data):
    assert data_task_warmup(cfg(**data)) is None
