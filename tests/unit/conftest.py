"""The unit tier runs in this one process: no Ray, no DeepSpeed engine, no process group, no
other process. A unit test that starts any of them fails here, naming what it started, instead
of making the tier slow; such a test belongs in tests/integration."""

import multiprocessing.process
import subprocess

import pytest


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"a unit test started {what}: move it to tests/integration (or replace the call)")

    return refused


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    import deepspeed
    import ray
    import ray._private.worker
    import torch.distributed

    monkeypatch.setattr(ray, "init", _refuse("Ray (ray.init)"))
    monkeypatch.setattr(ray._private.worker, "init", _refuse("Ray (ray.init)"))
    monkeypatch.setattr(deepspeed, "initialize", _refuse("a DeepSpeed engine (deepspeed.initialize)"))
    monkeypatch.setattr(torch.distributed, "init_process_group", _refuse("a process group (init_process_group)"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("a subprocess (subprocess.Popen)"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("a process (multiprocessing)"))
    yield
