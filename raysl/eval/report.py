"""`raysl report RUN`: one self-contained HTML page (`RUN/report.html`) with a run's numbers
and pictures: training facts, last metrics, `eval_*.json` results, training curves, kNN over
steps, score histograms, attention (or saliency) maps, a ViT's patch-feature PCA and a PCA
of labeled features. Images are inlined as data: URIs and a Content-Security-Policy forbids
anything external."""

from __future__ import annotations

import argparse
import base64
import glob
import html
import os

from raysl.errors import UserError

REPORT = "report.html"
PICTURES = "report_pictures"  # the PNGs drawn for the report, kept in the run dir as well
MAX_HISTOGRAMS = 8

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; }
figure { display: inline-block; margin: 0 1em 1.5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; } figcaption { max-width: 640px; font-size: 0.9em; color: #555; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; } .note { color: #8a5a00; }
"""
# Marks the body once every image has decoded (a headless browser check reads it back).
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-ok", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
});
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _table(rows, header=("key", "value")) -> str:
    from raysl.eval.model_card import format_value

    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(format_value(v))}</td></tr>" for k, v in rows)
    return f"<table><tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>{body}</table>"


def _figure(title: str, path: str, caption: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption><b>{html.escape(title)}.</b> {html.escape(caption)}</figcaption></figure>"
    )


def _backbone_pictures(
    run_dir: str, cfg, eval_dir: str | None, samples: int, out_dir: str, figures: list, notes: list
) -> None:
    """Attention/saliency maps, a ViT's patch-feature PCA and the feature PCA (needs a checkpoint)."""
    from raysl.eval.export import eval_image_size
    from raysl.eval.labeled import load_labeled
    from raysl.eval.pictures import (
        embedding_figure,
        has_patch_tokens,
        patch_pca_figure,
        saliency_figure,
        sample_images,
    )
    from raysl.eval.weights import load_backbone

    try:
        backbone, cfg, step = load_backbone(run_dir)
    except UserError as exc:
        notes.append(f"No backbone pictures: {exc}")
        return
    size = eval_image_size(cfg)
    labeled = eval_dir or getattr(getattr(cfg, "eval", None), "knn_shards", "")
    images = None
    if labeled:
        try:
            images, labels = load_labeled(labeled, size, what="--eval" if eval_dir else "eval.knn_shards")
        except UserError as exc:
            if eval_dir:
                raise exc if str(exc).startswith("--eval") else UserError(f"--eval {exc}") from exc
            notes.append(f"No embedding plot: {exc}")
    else:
        notes.append("No embedding plot: pass --eval DIR (a labeled shard set) to draw one.")
    if images is not None:
        path = os.path.join(out_dir, "embedding_pca.png")
        figures.append(("Embedding (PCA)", path, embedding_figure(backbone, images, labels, path)))
        images = images[:samples]
    else:
        try:
            from raysl.data.mixture import set_paths

            images = sample_images(set_paths(cfg.data.shards)[0], samples, size)  # a mixture: its first set
        except UserError as exc:
            notes.append(f"No attention maps: {exc}")
            return
    if len(images):
        path = os.path.join(out_dir, "attention.png")
        caption = saliency_figure(backbone, images, path)
        title = "Attention maps" if caption.startswith("ViT") else "Saliency maps (feature norm)"
        figures.append((title, path, f"{caption} Checkpoint of step {step}."))
        if has_patch_tokens(backbone):
            path = os.path.join(out_dir, "patch_pca.png")
            caption = patch_pca_figure(backbone, images, path)
            figures.append(("Patch features (PCA)", path, f"{caption} Checkpoint of step {step}."))
        else:
            notes.append("No patch-feature PCA: the backbone is not a ViT, it has no patch tokens.")


# what the report reads of a run in a bucket, besides config.yaml and the checkpoint's weights
RUN_FILES = ("metrics.jsonl", "eval_*.json", "score_histograms/step_*.png")


def build_report(run_dir: str, eval_dir: str | None = None, *, samples: int = 8) -> str:
    """Write RUN/report.html (see module doc) and return its path. A run in a bucket is read
    through a temporary copy of only the files the report needs (weights.local_run); the page
    and its pictures are written back into the run."""
    from raysl.data.buckets import check_bucket
    from raysl.eval.weights import local_run
    from raysl.train import storage

    run_dir = run_dir.rstrip("/")
    if not storage.is_uri(run_dir):
        return _build_report(run_dir, eval_dir, samples, source=os.path.abspath(run_dir))
    check_bucket(run_dir, "raysl report")
    if not storage.exists(f"{run_dir}/config.yaml"):
        raise UserError(f"raysl report {run_dir}: no config.yaml there; give a run directory written by raysl pretrain")
    with local_run(run_dir, RUN_FILES) as local:
        _build_report(local, eval_dir, samples, source=run_dir)
        storage.upload(os.path.join(local, REPORT), f"{run_dir}/{REPORT}")
        for name in sorted(os.listdir(os.path.join(local, PICTURES))):
            storage.upload(os.path.join(local, PICTURES, name), f"{run_dir}/{PICTURES}/{name}")
    return f"{run_dir}/{REPORT}"


def _build_report(run_dir: str, eval_dir: str | None, samples: int, *, source: str) -> str:
    from raysl.eval.model_card import eval_results, final_metrics, training_facts
    from raysl.eval.pictures import knn_curve
    from raysl.eval.weights import latest_checkpoint, run_config
    from raysl.train.metrics import plot_curves, read_metrics

    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise UserError(f"raysl report {run_dir}: no config.yaml there; give a run directory written by raysl pretrain")
    cfg = run_config(run_dir)
    rows = read_metrics(run_dir)
    out_dir = os.path.join(run_dir, PICTURES)
    os.makedirs(out_dir, exist_ok=True)
    figures: list[tuple[str, str, str]] = []
    notes: list[str] = []
    if not rows:
        notes.append("metrics.jsonl is missing or empty: no training curves.")
    for path in plot_curves(run_dir):
        key = os.path.splitext(os.path.basename(path))[0]
        figures.append((f"Training {key}", path, f"{key} at every logged step."))
    knn_path = os.path.join(out_dir, "knn.png")
    caption = knn_curve(rows, knn_path)
    if caption:
        figures.append(("kNN accuracy over steps", knn_path, caption))
    hists = sorted(glob.glob(os.path.join(run_dir, "score_histograms", "step_*.png")))
    shown = [
        hists[round(i * (len(hists) - 1) / max(MAX_HISTOGRAMS - 1, 1))] for i in range(min(len(hists), MAX_HISTOGRAMS))
    ]
    for path in dict.fromkeys(shown):
        step = int(os.path.splitext(os.path.basename(path))[0].removeprefix("step_"))
        figures.append(
            (
                f"Score histograms, step {step}",
                path,
                "Cosine scores of positive and negative pairs "
                f"(Feature Transformation); {len(shown)} of {len(hists)} steps shown.",
            )
        )
    _backbone_pictures(run_dir, cfg, eval_dir, samples, out_dir, figures, notes)

    sections = [f"<h1>raysl run {html.escape(cfg.train.name)}</h1>", f"<p>{html.escape(source)}</p>"]
    try:
        step, _ = latest_checkpoint(run_dir)
        sections += ["<h2>Training</h2>", _table(training_facts(run_dir, cfg, step).items())]
    except UserError as exc:
        notes.append(str(exc))
    last = final_metrics(rows)
    sections += ["<h2>Last metrics</h2>", _table(last.items(), ("metric", "value")) if last else "<p>none logged</p>"]
    for name, result in eval_results(run_dir).items():
        sections += [f"<h2>{html.escape(name)}</h2>", _table(result.items())]
    sections += ["<h2>Pictures</h2>", *(_figure(*f) for f in figures)]
    sections += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    sections += ["<h2>Recipe</h2>", f"<pre>{html.escape(cfg.to_yaml())}</pre>"]
    page = "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
            f"<title>raysl report: {html.escape(cfg.train.name)}</title><style>{_STYLE}</style></head>",
            '<body data-images-ok="-1">',
            *sections,
            f"<script>{_SCRIPT}</script>",
            "</body></html>",
        ]
    )
    path = os.path.join(run_dir, REPORT)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument("run", type=resolve_path, help="the run directory")
    p.add_argument(
        "--eval", type=resolve_path, help="a labeled shard set for the embedding plot and the attention samples"
    )


def run_from_args(args: argparse.Namespace) -> None:
    print(build_report(args.run, args.eval))
