"""Submit a raysl command to a running Ray cluster as a Ray job, follow its logs, and
report where its tasks ran.

    python jobs/submit.py --address http://HEAD:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- raysl pretrain quickstart data.shards=...

The same as `ray job submit ... -- CMD` plus two things a platform engineer wants in
CI: the exit code is the job's (0 only for SUCCEEDED), and `--placement FILE` writes,
after the job, which node ran each of its tasks and actors (Ray state API), so a
recipe that sends decoding to CPU-only nodes can be checked.

Token authentication (on by default in Ray 2.60 clusters) needs nothing here: the client
sends the token Ray finds itself ($RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token; `ray get-auth-token` prints it on the head node).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="the cluster's dashboard (job server) URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=None, help="upload this folder as the job's working dir (.gitignore respected)")
    p.add_argument("--runtime-env", default=None, help="a runtime_env YAML (e.g. jobs/runtime_env.yaml)")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--entrypoint-resources", type=_resources, default=None, metavar="JSON",
                   help="custom resources the job's driver needs, e.g. '{\"on_demand\": 1}': the driver (and Ray "
                        "Train's controller, which runs on its node) goes only to a node that advertises them, never "
                        "to a spot node (the value of train.driver_resources)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job before stopping it")
    p.add_argument("--placement", default=None, help="write the node of every task/actor of the job here (JSON)")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command, e.g. raysl pretrain RECIPE ...")
    args = p.parse_args(argv)
    if args.entrypoint and args.entrypoint[0] == "--":
        args.entrypoint = args.entrypoint[1:]
    if not args.entrypoint:
        p.error("give the command to run after --, e.g. -- raysl pretrain quickstart data.shards=DIR")
    return args


def _resources(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); e.g. '{{\"on_demand\": 1}}'") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a mapping of resource name to amount > 0, got {text}")
    return value


def runtime_env(path: str | None, working_dir: str | None) -> dict:
    import yaml

    env = {}
    if path:
        with open(path) as f:
            env = yaml.safe_load(f) or {}
        if not isinstance(env, dict):
            sys.exit(f"submit: {path}: expected a mapping (runtime_env keys such as env_vars, excludes)")
        if "pip" in env or "conda" in env or "uv" in env:
            sys.exit(f"submit: {path}: installs packages at run time (pip/conda/uv); bake them into the cluster image instead")
    if working_dir:
        env["working_dir"] = working_dir
    return env


def _name(status) -> str:
    return getattr(status, "value", str(status))


async def _tail(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


async def _follow(client, job_id: str, timeout: float) -> None:
    """Print the job's logs until it ends. The log stream can outlive the job (after a node
    was lost it stayed open until the timeout), so the job's status is polled beside it."""
    tail = asyncio.ensure_future(_tail(client, job_id))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, _ = await asyncio.wait({tail}, timeout=2)
        if done:
            return
        if _name(await asyncio.to_thread(client.get_job_status, job_id)) in TERMINAL:
            await asyncio.wait({tail}, timeout=5)  # its last lines
            break
    tail.cancel()


def placement(address: str, job_id: str) -> dict:
    """Per task name and per actor class of the job: the nodes that ran them, each with
    its custom resources, e.g. {"tasks": {"MapBatches(_augment)": [{"node_id":..., "resources": {...}}]}}."""
    from ray.util.state import list_actors, list_nodes, list_tasks

    nodes = {
        n.node_id: {"node_id": n.node_id, "is_head": bool(n.is_head_node),
                    "resources": {k: v for k, v in (n.resources_total or {}).items()
                                  if not k.startswith("node:") and k not in ("memory", "object_store_memory")}}
        for n in list_nodes(address=address, limit=1000)
    }
    out = {"nodes": list(nodes.values()), "tasks": {}, "actors": {}}
    for t in list_tasks(address=address, filters=[("job_id", "=", job_id)], limit=10_000, raise_on_missing_output=False):
        if t.node_id:
            out["tasks"].setdefault(t.name, set()).add(t.node_id)
    for a in list_actors(address=address, filters=[("job_id", "=", job_id)], limit=10_000, raise_on_missing_output=False):
        if a.node_id:
            out["actors"].setdefault(a.class_name, set()).add(a.node_id)
    for kind in ("tasks", "actors"):
        out[kind] = {name: [nodes.get(i, {"node_id": i}) for i in sorted(ids)] for name, ids in sorted(out[kind].items())}
    return out


def main(argv=None) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    args = parse_args(argv)
    client = JobSubmissionClient(args.address)
    entrypoint = shlex.join(args.entrypoint)
    sub_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(args.runtime_env, args.working_dir),
                               submission_id=args.submission_id, entrypoint_resources=args.entrypoint_resources)
    print(f"submit: job {sub_id} on {args.address}: {entrypoint}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.timeout
    asyncio.run(_follow(client, sub_id, args.timeout))
    status = client.get_job_status(sub_id)
    while _name(status) not in TERMINAL and time.monotonic() < deadline:  # logs can end a moment before the status
        time.sleep(1)
        status = client.get_job_status(sub_id)
    if _name(status) not in TERMINAL:
        client.stop_job(sub_id)
        print(f"submit: job {sub_id} still {status} after {args.timeout:.0f} s: stopped it", file=sys.stderr)
        return 1
    info = client.get_job_info(sub_id)
    print(f"submit: job {sub_id} {status}" + (f": {info.message}" if info.message else ""), file=sys.stderr, flush=True)
    if args.placement and info.job_id:
        with open(args.placement, "w") as f:
            json.dump(placement(args.address, info.job_id), f, indent=1)
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
