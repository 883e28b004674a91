"""The `raysl` command. Thin: it parses arguments and calls the library."""

# Wiring only: the command tree, --address and --verbose, and how errors end the process.
# Each command's options and work live in its module (`add_arguments(parser)`,
# `run_from_args(args)`), imported only when that command runs or shows its help, so
# `raysl --help` imports none of them.

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from raysl.errors import RunFailed, UserError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str  # where add_arguments and run_from_args live
    ray: bool = False  # starts or joins Ray: also takes --address after its name
    add: str = "add_arguments"
    run: Callable | None = None  # run(module, args); default: module.run_from_args(args)


@dataclass(frozen=True)
class Group:
    name: str
    help: str
    commands: tuple[Command, ...]


# The benchmarks' run_from_args return their result; the command prints it.


def _print_json(module, args) -> None:
    print(json.dumps(module.run_from_args(args)))


def _bench_data(module, args) -> None:
    from raysl.runtime import init_ray

    print(init_ray(args.address), file=sys.stderr)
    _print_json(module, args)


def _bench_methods(module, args) -> None:
    result = module.run_from_args(args, address=args.address)
    print(result.pop("table"))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"} | {"json": f"{args.out}/bench_methods.json"}))


def _bench_step(module, args) -> None:
    print(json.dumps(module.run_from_args(args, address=args.address)))


def _bench_memory(module, args) -> int:
    rows = module.run_from_args(args)  # each row is printed as it is measured
    return 1 if any("error" in r for r in rows) else 0


TREE: tuple[Command | Group, ...] = (
    Command("demo", "build shards from real bundled images and stream views through Ray Data", "raysl.demo", ray=True),
    Command(
        "doctor", "check this machine: versions, GPUs, 8-bit kernels, Ray cluster, free disk", "raysl.doctor", ray=True
    ),
    Command(
        "pretrain", "self-supervised pretraining from a recipe on Ray Train + DeepSpeed", "raysl.pretrain", ray=True
    ),
    Command(
        "tune", "Ray Tune over any config key of a recipe (ASHA or PBT, optional Optuna)", "raysl.tune.search", ray=True
    ),
    Command(
        "eval",
        "evaluate a run's backbone on labeled shards: knn, linear probe, few-shot, fine-tune",
        "raysl.eval.run",
        ray=True,
    ),
    Command(
        "export", "a run's backbone for timm.create_model, with a model card and attributions", "raysl.eval.export"
    ),
    Command(
        "report", "one self-contained HTML page of a run's numbers and pictures (RUN/report.html)", "raysl.eval.report"
    ),
    Group(
        "shards",
        "build and inspect image shard sets",
        (
            Command(
                "build",
                "turn folders, WebDataset tars or img2dataset parquet into shards",
                "raysl.data.build",
                ray=True,
            ),
            Command("inspect", "counts, bytes, resolutions, licenses; optional contact sheet", "raysl.data.inspect"),
            Command(
                "migrate",
                "rewrite an old shard set (every shard listed in manifest.json) in the current format",
                "raysl.data.legacy",
            ),
        ),
    ),
    Group(
        "curate",
        "embed, dedup, decontaminate and balance a shard set into a selection",
        (
            Command(
                "embed", "embed every image (eval views) as a Ray Data job; resumable", "raysl.curate.embed", ray=True
            ),
            Command(
                "dedup",
                "SemDeDup: k-means, then drop all but one of each group above a cosine threshold",
                "raysl.curate.steps",
                ray=True,
                add="add_dedup_arguments",
            ),
            Command(
                "decontaminate",
                "drop images whose nearest eval image is above a cosine threshold",
                "raysl.curate.steps",
                ray=True,
                add="add_decontaminate_arguments",
            ),
            Command(
                "balance",
                "hierarchical k-means, then a balanced top-down sample of --target images",
                "raysl.curate.steps",
                ray=True,
                add="add_balance_arguments",
            ),
        ),
    ),
    Group(
        "bench",
        "benchmarks, each against a baseline measured in the same run",
        (
            Command(
                "data",
                "raysl view pipeline vs plain DataLoaders (torchvision, lightly)",
                "raysl.bench.data",
                ray=True,
                run=_bench_data,
            ),
            Command(
                "optim", "optimizer state bytes/param: fp32 AdamW vs AdamW8bit", "raysl.bench.optim", run=_print_json
            ),
            Command(
                "methods",
                "each SSL method: short CPU pretraining, kNN top-1 on real digits vs random init",
                "raysl.bench.methods",
                ray=True,
                run=_bench_methods,
            ),
            Command(
                "step",
                "seconds per training step: raysl (Ray Train + DeepSpeed) vs a bare PyTorch loop",
                "raysl.bench.step",
                ray=True,
                run=_bench_step,
            ),
            Command(
                "memory",
                "peak memory per worker (2 workers): ZeRO 0/2/3 x adamw/adamw8bit (x offload)",
                "raysl.bench.memory",
                run=_bench_memory,
            ),
            Command(
                "plan",
                "manifest bytes, write, read and planning seconds at N shards: index vs the old JSON list",
                "raysl.bench.plan",
                run=_print_json,
            ),
            Command(
                "curate",
                "dedup recall/precision on planted near-duplicates, balance entropy, k-means + dedup at scale",
                "raysl.bench.curate",
                ray=True,
                run=_print_json,
            ),
            Command(
                "checkpoint",
                "checkpoints on a bucket: step seconds during sync vs background uploads, bytes per worker to resume",
                "raysl.bench.checkpoint",
                ray=True,
                run=_bench_step,
            ),
            Command(
                "reshard",
                "seconds and bytes for a new worker to resume a ZeRO-2 AdamW8bit checkpoint of another worker count",
                "raysl.bench.reshard",
                run=_print_json,
            ),
            Command(
                "elastic",
                "an elastic run on a local multi-node cluster: seconds and steps a spot reclaim (2 -> 1) and a "
                "grow (1 -> 2) cost",
                "raysl.bench.elastic",
                run=_print_json,
            ),
            Command(
                "e2e",
                "wall time of a SimCLR run: raysl pretrain (Ray start included) vs a plain DataLoader loop",
                "raysl.bench.e2e",
                run=_print_json,
            ),
            Command(
                "parity",
                "kNN after raysl pretrain vs a plain lightly loop with the same recipe, over seeds; ingredient swaps",
                "raysl.bench.parity",
                run=_print_json,
            ),
        ),
    ),
)

_ADDRESS_HELP = "Ray cluster to join, e.g. auto or ray://host:10001 (default: $RAY_ADDRESS, else a local Ray)"


class _Parser(argparse.ArgumentParser):
    """Every command and subcommand takes --verbose, before or after its name (SUPPRESS:
    a later parser does not overwrite an earlier --verbose with False).
    A command's own arguments are added by `fill` when they are first needed: when its
    arguments are parsed or its help is shown."""

    def __init__(self, *args, fill: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fill = fill
        self.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show every library's log lines (Ray, Ray Data, DeepSpeed, bitsandbytes); "
            "default: raysl's own progress, results and warnings",
        )

    def fill(self) -> None:
        fill, self._fill = self._fill, None
        if fill is not None:
            fill(self)

    def parse_known_args(self, args=None, namespace=None):
        self.fill()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.fill()
        return super().format_help()

    def format_usage(self) -> str:
        self.fill()
        return super().format_usage()


def _filler(command: Command) -> Callable[[argparse.ArgumentParser], None]:
    def fill(parser: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(command.module), command.add)(parser)

    return fill


def _runner(command: Command) -> Callable[[argparse.Namespace], int | None]:
    def run(args: argparse.Namespace) -> int | None:
        module = importlib.import_module(command.module)
        return command.run(module, args) if command.run else module.run_from_args(args)

    return run


def _add(sub, command: Command, parsers: list[_Parser]) -> None:
    parser = sub.add_parser(command.name, help=command.help, description=command.help, fill=_filler(command))
    if command.ray:
        # `raysl pretrain R --address auto`; SUPPRESS keeps a top-level
        # `raysl --address auto pretrain R` from being overwritten with None
        parser.add_argument("--address", default=argparse.SUPPRESS, help=_ADDRESS_HELP)
    parser.set_defaults(func=_runner(command))
    parsers.append(parser)


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """The whole `raysl` parser. `lazy`: each command's arguments are added only when that
    command is parsed or its help shown (what `main` uses); otherwise all of them now."""
    from raysl import __version__

    p = _Parser(prog="raysl", description=__doc__)
    p.add_argument("--version", action="version", version=f"raysl {__version__}")
    p.add_argument("--address", default=None, help=_ADDRESS_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    leaves: list[_Parser] = []
    for entry in TREE:
        if isinstance(entry, Command):
            _add(sub, entry, leaves)
            continue
        group = sub.add_parser(entry.name, help=entry.help, description=entry.help)
        group_sub = group.add_subparsers(dest=f"{entry.name}_cmd", required=True)
        for command in entry.commands:
            _add(group_sub, command, leaves)
    if not lazy:
        for leaf in leaves:
            leaf.fill()
    return p


def main(argv: list[str] | None = None) -> int:
    from raysl.runtime import set_verbose

    args = build_parser(lazy=True).parse_args(argv)
    set_verbose(getattr(args, "verbose", False))
    try:
        code = args.func(args)
    except UserError as exc:
        print(f"raysl: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"raysl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raysl: interrupted", file=sys.stderr)
        return 130
    return code or 0


def run() -> NoReturn:
    """The `raysl` command: `main`, then the process ends without Python's teardown."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End the process as a normal exit does, less Python's teardown of every module, which
    takes about 2 s once torch, timm and Ray are loaded, after the command's work is done:
    threads still running are waited for and the exit handlers (Ray's shutdown, logging,
    temporary folders) run first, in the order Python's own exit runs them."""
    threading._shutdown()  # type: ignore[attr-defined]  # tells idle thread pools to end, joins the threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`raysl ... | head`) or stream
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
