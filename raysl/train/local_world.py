"""A process group of worker processes on this host, set up as Ray Train sets up its
workers (MASTER_*/RANK/LOCAL_RANK/WORLD_SIZE in the environment, where DeepSpeed reads
them): for `raysl bench memory` and the multi-process tests."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: the local world's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_local_world(rank: int, world_size: int, port: int, backend: str = "gloo") -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch.distributed as dist

    dist.init_process_group(backend, rank=rank, world_size=world_size)
