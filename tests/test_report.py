"""Leaderboard and HTML report: numbers equal the runs' metrics.json, the HTML is self-contained and
renders in headless Chromium (skipped, with the reason, when chromium is not installed)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.errors import UserError
from pipeline.metrics import mean_std
from stages.fuse import FuseJob, fuse
from stages.report import collect_runs, leaderboard, write_report
from stages.sweep import dedupe, expand, run_sweep
from tests.synthetic import write_ucf_store

torch.set_num_threads(1)

CLASSES = ["Alpha", "Beta", "Gamma"]


def _dataset(tmp_path: Path):
    """Synthetic UCF101-layout dataset and store (tests/synthetic.py), splits 1 and 2 with the same lists."""
    return write_ucf_store(tmp_path, CLASSES, groups=6, T=6, dims=(5, 3), splits=(1, 2), seed=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two configs x (2 splits or 2 seeds), plus one fused run and one unfinished directory."""
    tmp = tmp_path_factory.mktemp("report")
    root, store = _dataset(tmp)
    out = tmp / "runs"
    spec = {"set": {"epochs": 3, "batch_size": 8, "frames": 4},
            "runs": [{"head": "temporal-pool", "streams": ["rgb"], "splits": [1, 2], "grid": {"segments": [1]}},
                     {"head": "lstm", "streams": ["rgb", "flow"], "seeds": [0, 1], "set": {"hidden": 8}}]}
    outcomes = run_sweep(dedupe(expand(spec, str(store), str(root), str(out))), progress=False)
    assert [o.status for o in outcomes] == ["trained"] * 4
    tp, ls = outcomes[0].info["path"], outcomes[2].info["path"]
    fuse(FuseJob(runs=(tp, ls), out=str(out)), echo=lambda m: None)
    (out / "lstm-unfinished").mkdir()
    (out / "lstm-unfinished" / "config.json").write_text("{}")
    return out


def _metrics(path: str) -> dict:
    return json.loads((Path(path) / "metrics.json").read_text())


def test_leaderboard_numbers_equal_the_runs_metrics(runs, tmp_path):
    complete, unfinished = collect_runs(runs)
    assert len(complete) == 5 and [p.name for p in unfinished] == ["lstm-unfinished"]
    rows = leaderboard(complete)
    assert sorted((r.head, len(r.runs)) for r in rows) == [("lstm", 2), ("score-fusion", 1), ("temporal-pool", 2)]
    paths = write_report(runs, tmp_path / "rep")
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3
    accs = [float(r["accuracy_mean"]) for r in table]
    assert accs == sorted(accs, reverse=True) and [int(r["rank"]) for r in table] == [1, 2, 3]
    for r in table:
        ms = [_metrics(p) for p in r["runs"].split(";")]
        for col, key in (("accuracy", "accuracy"), ("hit5", "hit@5"), ("map", "map")):
            m, sd = mean_std([x[key] for x in ms])
            assert float(r[f"{col}_mean"]) == m and float(r[f"{col}_std"]) == sd  # exact: floats written as repr
        assert float(r["fit_seconds"]) == pytest.approx(np.mean([x["fit_seconds"] for x in ms]))
        assert int(r["params"]) == ms[0]["params"] and int(r["n_runs"]) == len(ms)
    by_head = {r["head"]: r for r in table}
    assert by_head["temporal-pool"]["splits"] == "1,2" and by_head["temporal-pool"]["seeds"] == "0"
    assert by_head["lstm"]["splits"] == "1" and by_head["lstm"]["seeds"] == "0,1"
    # three epochs on a tiny set may leave the verdict ", did not learn" on the row: it has tests of its own
    assert by_head["temporal-pool"]["settings"].removesuffix(", did not learn") == "segments=1, batch_size=8, epochs=3, frames=4, min_steps=0"
    assert by_head["lstm"]["streams"] == "rgb+flow"
    assert "by cross-validation" in by_head["score-fusion"]["settings"]
    md = paths["md"].read_text()
    tp = by_head["temporal-pool"]
    assert f"{100 * float(tp['accuracy_mean']):.2f} ± {100 * float(tp['accuracy_std']):.2f}" in md
    assert md.count("\n") == 2 + 3


def test_html_is_self_contained(runs, tmp_path):
    html = write_report(runs, tmp_path / "rep")["html"].read_text()
    assert html.startswith("<!DOCTYPE html>") and 'id=leaderboard' in html
    n_img = html.count("<img ")
    assert n_img >= 3 + 2 * 3 and html.count('src="data:image/png;base64,') == n_img  # every image inline
    for ref in ("http://", "https://", "src=\"file", "href=", "<link", "src=\"/"):
        assert ref not in html
    assert "1 unfinished run directories" in html


def test_report_cli_and_errors(runs, tmp_path):
    from cli.sweep import report

    res = CliRunner().invoke(report, [str(runs), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"leaderboard.csv", "leaderboard.md", "report.html"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no complete runs"):
        write_report(tmp_path / "empty", tmp_path / "r2")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; CI installs it)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    page = write_report(runs, tmp_path / "rep")["html"]
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-dev-shm-usage", "--no-first-run", "--virtual-time-budget=5000", "--dump-dom",
           page.resolve().as_uri()]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert 'id="leaderboard"' in dom and "temporal-pool" in dom
    # set by the page's own check once loaded: every image decoded
    n = dom.count("<img ")
    assert f'data-images="{n}"' in dom and 'data-images-broken="0"' in dom, dom[-500:]
