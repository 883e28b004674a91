"""Connecting to Ray: an embedded local Ray by default, or an existing cluster."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> str:
    """Join the cluster at `address` (or $RAY_ADDRESS); otherwise start a local Ray.
    Returns a line that says which."""
    import ray

    if ray.is_initialized():
        return "Ray: already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
        return f"Ray: joined cluster at {address}"
    # With the dashboard: Ray Train's placement-group cleaner and `ray list` need its state
    # API (without it the cleaner warns every few seconds); it costs about 2 s at start.
    ray.init(num_cpus=num_cpus, include_dashboard=True, log_to_driver=not quiet)
    return f"Ray: started locally with {int(ray.cluster_resources().get('CPU', 0))} CPUs"
