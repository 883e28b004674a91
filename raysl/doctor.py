"""`raysl doctor`: is this machine ready? One line per check, and what to do about a failure."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import socket
import sys
from dataclasses import dataclass
from importlib import metadata

PACKAGES = ("torch", "ray", "deepspeed", "bitsandbytes", "timm")
MIN_FREE_GB = 10.0  # room for a few checkpoints of a ViT-B run


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what to do when not ok

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}" + (
            "" if self.ok or not self.fix else f" -> {self.fix}"
        )


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check(
        "python", ok, f"{platform.python_version()} ({sys.executable})", "use Python 3.10 or newer (3.11 is tested)"
    )


def check_package(name: str) -> Check:
    try:
        return Check(name, True, metadata.version(name))
    except metadata.PackageNotFoundError:
        return Check(name, False, "not installed", "pip install -e . in the raysl checkout (or pip install raysl)")


def check_gpu() -> Check:
    import torch

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return Check("gpu", True, f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}")
    why = "torch is a CPU build" if not torch.version.cuda else "CUDA build, but no GPU is visible"
    return Check(
        "gpu",
        True,
        f"none ({why}); raysl trains on the CPU (train.gpus_per_worker=0)",
        "for GPUs: a CUDA build of torch, a driver (nvidia-smi) and CUDA_VISIBLE_DEVICES unset or right",
    )


def check_8bit() -> Check:
    """One AdamW8bit step on a tensor large enough for 8-bit state (bitsandbytes keeps
    smaller ones in fp32)."""
    try:
        import bitsandbytes as bnb
        import torch

        p = torch.nn.Parameter(torch.ones(4096, device="cuda" if torch.cuda.is_available() else "cpu"))
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        dtype = opt.state[p]["state1"].dtype
    except Exception as exc:  # any failure here means the 8-bit optimizers cannot run
        return Check(
            "8-bit optimizers",
            False,
            f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
            "use optim.name=adamw, or reinstall bitsandbytes for this platform",
        )
    ok = dtype == torch.uint8
    return Check(
        "8-bit optimizers",
        ok,
        f"AdamW8bit step on {p.device.type}, state {dtype}",
        "bitsandbytes kept fp32 state: reinstall bitsandbytes, or use optim.name=adamw",
    )


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def check_ray(address: str | None, timeout_s: float = 5.0) -> Check:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return Check("ray cluster", True, "no --address or $RAY_ADDRESS: raysl commands start a local Ray")
    fix = "start it (ray start --head) or check the host, port and firewall; ray://HOST:10001 for Ray Client"
    hp = _host_port(address)
    if hp:
        try:
            socket.create_connection(hp, timeout=timeout_s).close()
        except OSError as exc:
            return Check("ray cluster", False, f"{address}: cannot connect ({exc})", fix)
    import ray

    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        try:
            res = ray.cluster_resources()
            nodes = len([n for n in ray.nodes() if n.get("Alive")])
        finally:
            ray.shutdown()
    except Exception as exc:
        return Check("ray cluster", False, f"{address}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", fix)
    return Check(
        "ray cluster", True, f"{address}: {nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"
    )


def check_disk(storage: str) -> Check:
    if "://" in storage:
        return Check("disk", True, f"{storage} is a bucket URI; its space is not checked")
    existing = os.path.abspath(storage)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free_gb = shutil.disk_usage(existing).free / 1e9
    ok = free_gb >= MIN_FREE_GB
    return Check(
        "disk",
        ok,
        f"{free_gb:.1f} GB free at {existing} (storage path {storage})",
        f"free space, or point train.storage_path / --storage at a disk with {MIN_FREE_GB:g} GB or more",
    )


def run_checks(address: str | None, storage: str) -> list[Check]:
    checks = [check_python(), *(check_package(p) for p in PACKAGES)]
    installed = {c.name for c in checks if c.ok}
    if "torch" in installed:
        checks.append(check_gpu())
        if "bitsandbytes" in installed:
            checks.append(check_8bit())
    if "ray" in installed:
        checks.append(check_ray(address))
    checks.append(check_disk(storage))
    return checks


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument(
        "--storage", type=resolve_path, default="runs", help="where runs will be stored (train.storage_path)"
    )


def run_from_args(args: argparse.Namespace) -> int:
    checks = run_checks(args.address, args.storage)
    for check in checks:
        print(check.line(), flush=True)
    return 0 if all(c.ok for c in checks) else 1
