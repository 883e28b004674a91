"""`raysl report` on the session's trained run: a self-contained HTML page that a real
headless Chromium renders with every picture decoded; bad runs are one clear error."""

import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image, ImageStat

from raysl.cli import main
from raysl.errors import UserError
from raysl.eval.report import build_report


def _browser(tmp_path) -> list[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        if os.environ.get("RAYSL_REQUIRE_BROWSER") == "1":
            pytest.fail("RAYSL_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("chromium is not installed; set RAYSL_REQUIRE_BROWSER=1 to make this a failure")
    profile = tmp_path / "chromium_profile"
    profile.mkdir()
    return [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
    ]


def _copy_run(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("engine", "*.pt", "tensorboard", "report*"))
    return str(dest)


def test_report_is_self_contained_and_renders_in_chromium(vit_run, tmp_path, capsys):
    run, shards = vit_run
    run = _copy_run(run, tmp_path / "run")
    # what the online kNN monitor and `raysl eval` leave in a run dir
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    for r, acc in zip(rows, (40.0, 55.0, 62.5)):
        r.update(knn_top1=acc, knn_top5=acc + 20)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(run, "eval_linear.json"), "w") as f:
        json.dump({"top1": 71.25, "epochs": 3}, f)
    hists = sorted(os.listdir(os.path.join(run, "score_histograms")))
    assert hists  # method.ft_every drew some

    assert main(["report", run, "--eval", shards]) == 0
    path = capsys.readouterr().out.strip()
    assert path == os.path.join(run, "report.html")
    page = open(path, encoding="utf-8").read()
    titles = re.findall(r'<img alt="([^"]+)"', page)
    assert titles == [
        "Training loss",
        "Training lr",
        "kNN accuracy over steps",
        *(f"Score histograms, step {int(h[5:-4])}" for h in hists),
        "Embedding (PCA)",
        "Attention maps",
        "Patch features (PCA)",
    ]
    assert re.findall(r'src="([a-z]+):', page) == ["data"] * len(titles)
    assert not re.search(r"https?://|href=|@import|url\(", page)  # nothing external
    assert "<td>top1</td><td>71.25</td>" in page and "<td>knn_top1</td><td>62.5</td>" in page
    assert "<td>images_seen</td><td>24</td>" in page

    cmd = _browser(tmp_path)
    dom = subprocess.run([*cmd, "--dump-dom", f"file://{path}"], capture_output=True, text=True, timeout=180)
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-2000:]
    assert f'data-images-total="{len(titles)}"' in body.group(0) and f'data-images-ok="{len(titles)}"' in body.group(0)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*cmd, f"--screenshot={shot}", "--window-size=1100,1600", f"file://{path}"],
        capture_output=True,
        timeout=180,
        check=True,
    )
    stat = ImageStat.Stat(Image.open(shot).convert("L"))
    assert stat.stddev[0] > 10, "the screenshot is blank"


def test_report_bad_input(vit_run, tmp_path):
    run, _ = vit_run
    with pytest.raises(UserError, match="no config.yaml there"):
        build_report(str(tmp_path))
    run = _copy_run(run, tmp_path / "run")
    with open(os.path.join(run, "eval_broken.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="eval_broken.json: not a readable JSON file"):
        build_report(run)
    os.remove(os.path.join(run, "eval_broken.json"))
    with pytest.raises(UserError, match="--eval .*no manifest.json"):
        build_report(run, str(tmp_path / "nowhere"))
