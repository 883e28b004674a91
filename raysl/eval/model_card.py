"""The model card (`README.md`) written beside exported weights: the recipe, how long it
trained, its final numbers, and where every training image came from (manifest counts,
images per license, and `ATTRIBUTIONS.csv` listing key, source, license and attribution of
every image), so the weights can be published the way PASS publishes its images."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

from raysl.config import Config
from raysl.data.schema import SKIP_REASONS
from raysl.errors import UserError

CARD = "README.md"
ATTRIBUTIONS = "ATTRIBUTIONS.csv"
ATTRIBUTION_COLUMNS = ["key", "source", "license", "attribution"]


def final_metrics(rows: list[dict]) -> dict:
    """The last logged value of every numeric metric (kNN keys are logged at some steps only)."""
    last: dict = {}
    for row in rows:
        last.update({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return last


def eval_results(run_dir: str) -> dict[str, dict]:
    """`eval_*.json` files in the run dir (written by `raysl eval ...`), by file name."""
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "eval_*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a readable JSON file ({exc}); fix or remove it") from exc
        out[os.path.basename(path)] = data if isinstance(data, dict) else {"value": data}
    return out


def training_facts(run_dir: str, cfg: Config, step: int) -> dict:
    """Steps, global batch and images seen, from the checkpoint's world size."""
    from raysl.eval.weights import latest_checkpoint
    from raysl.train import checkpoint
    from raysl.train.steps import global_batch

    _, directory = latest_checkpoint(run_dir)
    with open(os.path.join(directory, checkpoint.RUN_STATE)) as f:
        world = int(json.load(f).get("world_size", cfg.train.max_workers))
    images_per_step = global_batch(cfg, world)
    return {
        "method": cfg.method.name,
        "backbone": cfg.model.backbone,
        "steps": step,
        "workers": world,
        "global_batch": images_per_step,
        "images_seen": step * images_per_step,
    }


def write_attributions(shards: str | list[str], out_csv: str) -> tuple[int, Counter]:
    """ATTRIBUTIONS.csv of a shard set (or of every set of a mixture), shard by shard, reading
    only the text columns (never the image bytes). Returns (rows, images per license)."""
    import pyarrow.csv as pacsv

    from raysl.data.mixture import set_paths
    from raysl.data.schema import read_manifest, read_shard, shard_files
    from raysl.progress import bar

    sets = [(s, read_manifest(s)) for s in set_paths(shards)]
    paths = [pm for s, m in sets for pm in shard_files(s, m)]
    licenses: Counter = Counter()
    rows = 0
    total = sum(m.rows for _, m in sets)
    with pacsv.CSVWriter(out_csv, _schema()) as writer, bar(total, "export: attributions") as progress:
        for path, mask in paths:
            table = read_shard(path, mask, ATTRIBUTION_COLUMNS)
            writer.write_table(table)
            rows += table.num_rows
            licenses.update(table.column("license").to_pylist())
            progress.update(table.num_rows)
    return rows, licenses


def _schema():
    import pyarrow as pa

    return pa.schema([(c, pa.string()) for c in ATTRIBUTION_COLUMNS])


def lineage(shards: str | list[str], out_dir: str) -> dict:
    from raysl.data.mixture import set_paths
    from raysl.data.schema import read_manifest

    try:
        manifests = [read_manifest(s) for s in set_paths(shards)]
    except UserError as exc:
        raise UserError(
            f"data.shards in the run's config.yaml: {exc}; pass --shards DIR where that shard set "
            "lives now, so the card can list where the training images came from"
        ) from exc
    rows, licenses = write_attributions(shards, os.path.join(out_dir, ATTRIBUTIONS))
    skipped: Counter = Counter()
    for m in manifests:
        skipped.update(m.skipped)
    return {
        "shards": ", ".join(set_paths(shards)),  # a mixture: every set it read from
        "written": sum(m.written for m in manifests),
        "rows": rows,
        "skipped": dict(skipped),
        "sources": [s for m in manifests for s in m.sources],
        "licenses": dict(sorted(licenses.items(), key=lambda kv: -kv[1])),
        "curation": [m.curation for m in manifests if m.curation],  # sets made by raysl curate
    }


def curation_section(curations: list[dict]) -> list[str]:
    """The card's account of the selections made by `raysl curate` (nothing for other sets)."""
    lines: list[str] = []
    for curation in curations:
        lines += _one_curation(curation)
    return lines


def _one_curation(curation: dict) -> list[str]:
    lines = [
        "## Curation",
        "",
        f"The training set is a selection (`raysl curate`) of `{curation.get('source')}`, embedded with "
        f"`{curation.get('model')}`; every image's decision is in `{curation.get('lineage')}`.",
        "",
        _table(("step", "settings and counts"), [(s.get("step"), s) for s in curation.get("steps", [])]),
        "",
        _table(("images", "count"), curation.get("counts", {}).items()),
        "",
    ]
    return lines


def _table(header: tuple[str, str], items) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {format_value(v)} |" for k, v in items]
    return "\n".join(lines)


def format_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v) if v != "" else "(empty)"


def write_card(
    out_dir: str, run_dir: str, cfg: Config, step: int, *, create_call: str, timm_cfg: dict, shards: str | None = None
) -> dict:
    """Write README.md and ATTRIBUTIONS.csv into out_dir; returns their paths and the facts."""
    from raysl.train.metrics import read_metrics

    facts = training_facts(run_dir, cfg, step)
    data = lineage(shards or cfg.data.shards, out_dir)
    metrics = final_metrics(read_metrics(run_dir))
    shown = {k: v for k, v in metrics.items() if k in ("step", "loss", "embedding_std") or k.startswith("knn_")}
    evals = eval_results(run_dir)
    pre = timm_cfg["pretrained_cfg"]
    skipped = {reason: data["skipped"].get(reason, 0) for reason in SKIP_REASONS}
    skipped.update(data["skipped"])
    parts = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-feature-extraction",
        f"tags: [self-supervised, raysl, {cfg.method.name}]",
        "---",
        f"# {cfg.model.backbone} pretrained with {cfg.method.name} (raysl)",
        "",
        "A self-supervised backbone (no classifier: `num_classes=0`; the forward pass gives pooled "
        f"features of size {timm_cfg.get('num_features')}). Load it with timm, no network needed:",
        "",
        "```python",
        "import timm",
        create_call,
        "```",
        "",
        f"Input: RGB {pre['input_size'][1]}x{pre['input_size'][2]}, scaled to [0, 1], normalised with mean "
        f"{list(pre['mean'])} and std {list(pre['std'])}. `config.json` holds timm's pretrained cfg with these "
        'values and the model\'s arguments: `timm.create_model("local-dir:DIR", pretrained=True)` (DIR: this '
        "folder) builds the same model from it, and `timm.data.resolve_data_config(model=model)` then gives "
        "this preprocessing.",
        "",
        "## Training",
        "",
        _table(
            ("", ""),
            [
                ("method", facts["method"]),
                ("backbone", facts["backbone"]),
                ("steps", facts["steps"]),
                ("workers", facts["workers"]),
                ("global batch", facts["global_batch"]),
                ("images seen (steps x global batch)", facts["images_seen"]),
                ("precision", cfg.deepspeed.precision),
                ("ZeRO stage", cfg.deepspeed.zero_stage),
            ],
        ),
        "",
        "## Final metrics",
        "",
        _table(("metric", "value"), shown.items()) if shown else "No metrics were logged.",
        "",
    ]
    for name, result in evals.items():
        parts += [f"### {name}", "", _table(("key", "value"), result.items()), ""]
    parts += [
        "## Training data",
        "",
        f"Shard set: `{data['shards']}` (sources: {', '.join(data['sources']) or 'not recorded'}).",
        "",
        _table(("manifest", "images"), [("written", data["written"]), ("rows in shards", data["rows"])]),
        "",
        "Inputs skipped while building the shards, by reason:",
        "",
        _table(("reason", "inputs"), skipped.items()),
        "",
        "Training images per license:",
        "",
        _table(("license", "images"), data["licenses"].items()),
        "",
        f"`{ATTRIBUTIONS}` lists every training image: {', '.join(ATTRIBUTION_COLUMNS)}.",
        "",
        *curation_section(data["curation"]),
        "## Recipe",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
        "",
    ]
    path = os.path.join(out_dir, CARD)
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return {"card": path, "attributions": os.path.join(out_dir, ATTRIBUTIONS), **facts, "licenses": data["licenses"]}
