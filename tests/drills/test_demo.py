"""`raysl demo` end to end in a fresh process: the kNN table at its end, and the commands it
prints work as printed."""

import os

# Lines of third-party noise that `raysl demo` used to print
NOISE = {
    "bitsandbytes": "Failed to load CPU gemm_4bit_forward",
    "numpy": "array is not writable",
    "ray data": "execution finished",
    "setuptools": "project.license",
    "raylet": "maximum expected startup concurrency",
    "ray train": "PlacementGroupCleaner",
    "ray": "Found multiple active Ray instances",  # under make test, the integration tier's Ray runs beside it
    "torch": "all_gather_into_tensor",
}
NOISE_STDOUT_ONLY = {"ray core": "PreemptionWatcher"}  # Ray Train's C++ line on stderr: see raysl.runtime


def test_demo_ends_with_a_knn_table_and_commands_that_work_as_printed(tmp_path):
    """The whole `raysl demo` (one real local Ray, about 2 minutes), run from a working
    directory with a relative --out, as a new user would."""
    import json
    import shlex
    import subprocess
    import sys

    from raysl.cli import build_parser

    proc = subprocess.run(
        [sys.executable, "-m", "raysl.cli", "demo", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()

    # the two-row table holds what `raysl eval knn --baseline` measured and wrote to RUN/eval_knn.json
    with open(tmp_path / "out" / "runs" / "demo" / "eval_knn.json") as f:
        knn = json.load(f)
    start = out.index(next(line for line in out if line.startswith("backbone ")))
    header, random_row, trained_row = out[start : start + 3]
    assert header.split()[1:] == ["kNN", "top-1", "k=20", "kNN", "top-1", "k=200"]
    assert random_row.startswith("random init") and trained_row.startswith(f"pretrained, {knn['step']} steps")
    assert random_row.split()[-2:] == [f"{knn['random_init'][f'knn_top1_k{k}']:.1f}" for k in (20, 200)]
    assert trained_row.split()[-2:] == [f"{knn[f'knn_top1_k{k}']:.1f}" for k in (20, 200)]
    assert knn["random_init"] != {k: v for k, v in knn.items() if k.startswith("knn_")}  # two backbones, two results
    assert out[start + 3] == "report: out/runs/demo/report.html" and (tmp_path / "out/runs/demo/report.html").is_file()

    # the next commands parse, and every path in them is there (relative to where the demo ran)
    commands = [shlex.split(line.split("#")[0]) for line in out[start + 4 :] if line.startswith("raysl ")]
    assert [c[1] for c in commands] == ["eval", "export", "pretrain", "doctor"]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ev, ex, pre = (build_parser().parse_args(c[1:]) for c in commands[:3])
    finally:
        os.chdir(cwd)
    for path in (ev.ckpt, ev.train, ev.val, ex.ckpt, os.path.dirname(ex.out)):
        assert path.startswith(str(tmp_path)) and os.path.isdir(path), path
    shards = next(o.split("=", 1)[1] for o in pre.overrides if o.startswith("data.shards="))
    assert (tmp_path / shards / "manifest.json").is_file()

    for name, text in {**NOISE, **NOISE_STDOUT_ONLY}.items():
        assert text not in proc.stdout, name
    for name, text in NOISE.items():
        assert text not in proc.stderr, name
