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
from stages.fuse import FuseJob, fuse
from stages.report import Row, bar_figure, collect_runs, curves_figure, leaderboard, write_report
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
            vals = np.array([x[key] for x in ms], dtype=np.float64)
            m = float(vals.mean())
            assert float(r[f"{col}_mean"]) == m  # exact: floats written as repr
            if len(ms) > 1:  # the sample std (n - 1) over the config's splits and seeds
                assert float(r[f"{col}_std"]) == float(vals.std(ddof=1))
            else:  # one run: no spread measured
                assert np.isnan(float(r[f"{col}_std"]))
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
    assert md.count("\n") == 2 + 3 + 2 and "sample std (n - 1)" in md
    # one run (the fused one): its value alone, no "± 0.00"; configs on 1 of the 2 splits are marked
    fused = next(line for line in md.splitlines() if "score-fusion" in line)
    assert "±" not in fused and f"{100 * float(by_head['score-fusion']['accuracy_mean']):.2f}" in fused
    assert by_head["lstm"]["fewer_splits"] == "1 of 2 splits" and by_head["temporal-pool"]["fewer_splits"] == ""
    assert "| 1 † |" in next(line for line in md.splitlines() if "| lstm |" in line)
    assert "† run on fewer splits" in md


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


# ---------------------------------------------------------------------------------------------- figure layout


def _extents(fig):
    """Display-space boxes of the bar chart's value labels, bars, error-bar lines and caps."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t.get_window_extent(renderer) for t in ax.texts]
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    errors = []
    for coll in ax.collections:  # the error bars' horizontal lines, one segment per config
        for seg in coll.get_segments():
            (x0, y0), (x1, y1) = ax.transData.transform(seg)
            errors.append(Bbox([[min(x0, x1), min(y0, y1) - 1], [max(x0, x1), max(y0, y1) + 1]]))
    for line in ax.lines:  # caps: one marker per config at each end of its error bar
        half = line.get_markersize() * fig.dpi / 72 / 2 + line.get_markeredgewidth()
        for x, y in ax.transData.transform(np.column_stack(line.get_data())):
            errors.append(Bbox([[x - half, y - half], [x + half, y + half]]))
    return ax, labels, bars, errors


def _row(name: str, mean: float, std: float, fewer: str = "") -> Row:
    row = Row(key=name, head=name, streams="rgb", settings="defaults", fewer_splits=fewer)
    row.stats = {"accuracy_mean": mean, "accuracy_std": std}
    return row


def test_bar_chart_labels_never_overlap_error_bars_bars_or_each_other(runs):
    """Value labels sit right of the error bar's end (computed from the drawn artists' extents), inside the axes;
    single runs draw no error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synthetic = [_row("wide", 0.50, 0.12), _row("narrow", 0.40, 0.01), _row("single", 0.30, float("nan"), "1 of 3"),
                 _row("top", 0.97, 0.08), _row("zero", 0.0, float("nan")), _row("tiny", 0.02, 0.02)]
    for rows in (leaderboard(collect_runs(runs)[0]), synthetic):
        fig = bar_figure(rows)
        ax, labels, bars, errors = _extents(fig)
        assert len(labels) == len(rows) and len(bars) == len(rows)
        assert len(ax.collections) == (1 if any(np.isfinite(r.stats["accuracy_std"]) for r in rows) else 0)
        n_spread = sum(np.isfinite(r.stats["accuracy_std"]) for r in rows)
        assert sum(len(c.get_segments()) for c in ax.collections) == n_spread  # no error bar for one run
        frame = ax.get_window_extent()
        for i, lab in enumerate(labels):
            assert not any(lab.overlaps(e) for e in errors), f"label {i} over an error bar"
            assert not any(lab.overlaps(b) for b in bars if b.width > 0), f"label {i} over a bar"
            assert not any(lab.overlaps(o) for j, o in enumerate(labels) if j != i), f"label {i} over another"
            assert frame.x0 <= lab.x0 and lab.x1 <= frame.x1, f"label {i} outside the axes"
        whole = fig.bbox  # the axis label (which states the std) is not cut off at the figure's edge
        xlabel = ax.xaxis.label.get_window_extent()
        assert whole.x0 <= xlabel.x0 and xlabel.x1 <= whole.x1 and "sample std" in ax.xaxis.label.get_text()
        texts = [t.get_text() for t in ax.texts]
        assert all("±" not in t for t, r in zip(texts, rows) if not np.isfinite(r.stats["accuracy_std"]))
        plt.close(fig)
    assert "50.0 ± 12.0" in texts and "30.0" in texts
    assert any(t.get_text().startswith("† ") for t in ax.get_yticklabels())


def test_learning_curves_have_one_legend_outside_both_panels(runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = leaderboard(collect_runs(runs)[0])
    fig = curves_figure(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    legend = fig.legends[0].get_window_extent(renderer)
    n_series = len(fig.axes[0].lines)
    assert n_series >= 2 and len(fig.legends[0].get_texts()) == n_series  # every curve named, once
    for ax in fig.axes:  # the legend covers neither panel (titles and tick labels included)
        assert not legend.overlaps(ax.get_tightbbox(renderer))
    plt.close(fig)
