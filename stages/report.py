"""Leaderboard and report over finished runs.

``write_report(RUNS, OUT)`` reads every complete run directory under ``RUNS`` (any depth: ``config.json`` plus
``metrics.json`` plus the ``COMPLETE`` marker) and writes::

    OUT/leaderboard.csv   one row per head and config: mean and sample standard deviation (n - 1; empty for a
                          single run) over the config's runs (its splits and seeds) of accuracy (Hit@1 on
                          multi-label data), Hit@5, mAP and GAP@20 (fractions; runs that predate GAP@20 leave it
                          empty), mean fit seconds, parameter count, the splits and seeds, the runs it averages
    OUT/leaderboard.md    the same in percent, for a README or an issue
    OUT/report.html       self-contained (PNG images inline as base64, no script or style from elsewhere):
                          the leaderboard, a bar chart of the heads, per-class AP as a heatmap, validation
                          learning curves from the runs' logs, and each config's learning curve and confusion
                          matrix (the runs' own PNGs)

A config run on fewer splits than the config with the most is marked (``fewer_splits`` in the CSV, a dagger in
the markdown, the HTML and the bar chart): its mean is over other test sets, so its rank is not a like-for-like
comparison.

A "config" is a run's ``config.json`` without its split and seeds (every key named ``split`` or ``seed``, at
any depth), so the runs of one setting over splits and seeds land in one row. Its label lists the settings
that differ from the head's defaults (paper defaults, ``train_defaults``), e.g. ``segments=1, epochs=2``.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.metrics import mean_std
from pipeline.runs import COMPLETE, config_hash

__all__ = ["Row", "RunRecord", "collect_runs", "leaderboard", "write_report"]

METRICS = (("accuracy", "accuracy"), ("hit@5", "hit5"), ("map", "map"), ("gap@20", "gap20"))  # key, column stem
_GROUP_DROP = ("split", "seed")


@dataclass
class RunRecord:
    path: Path
    config: dict
    metrics: dict

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Row:
    """One leaderboard row: the runs of one head and config over splits and seeds."""

    key: str
    head: str
    streams: str
    settings: str
    runs: list[RunRecord] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    fewer_splits: str = ""  # e.g. "1 of 3 splits" when other configs were run on more splits


def _damage(d: Path) -> tuple[dict, dict] | str:
    """(config, metrics) of a complete run directory, or why it cannot be read (a file missing or not valid)."""
    read = {}
    for name in ("config.json", "metrics.json"):
        try:
            read[name] = json.loads((d / name).read_text())
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{name} is not valid JSON ({type(e).__name__}: {e})"
        if not isinstance(read[name], dict):
            return f"{name} does not hold a JSON object"
    accuracy = read["metrics.json"].get("accuracy")
    if not isinstance(accuracy, (int, float)) or not np.isfinite(accuracy):
        return f"metrics.json has no finite accuracy (got {accuracy!r})"
    return read["config.json"], read["metrics.json"]


def collect_runs(root: str | Path) -> tuple[list[RunRecord], list[Path]]:
    """(complete runs, unfinished run directories) under ``root``, sorted by path.

    A directory marked complete whose config.json or metrics.json is missing or unreadable is damaged: it is
    skipped with a warning naming it, so one bad run never hides the others.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of runs")
    runs, unfinished = [], []
    dirs = {p.parent for p in root.rglob("config.json")} | {p.parent for p in root.rglob(COMPLETE)}
    for d in sorted(dirs):
        if not (d / COMPLETE).is_file():
            unfinished.append(d)
            continue
        read = _damage(d)
        if isinstance(read, str):
            warnings.warn(f"skipping damaged run {d}: {read}", stacklevel=2)
            continue
        runs.append(RunRecord(d, *read))
    return runs, unfinished


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "fraction" in obj and "sha256" in obj:  # a fusion fold: its videos follow from the split
            return {"fraction": obj["fraction"]}
        return {k: _strip(v) for k, v in obj.items() if k not in _GROUP_DROP}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _settings(config: dict) -> str:
    """Settings of a run that differ from its head's defaults (``k=v, ...``); ``defaults`` when none do."""
    head = config.get("head", "?")
    if "head_config" in config and "train" in config:
        try:
            import pipeline.baselines  # registers the kernel baselines
            import pipeline.heads  # noqa: F401  (registers every torch head)
            from pipeline.training import resolve_configs

            base_head, base_train = (dataclasses.asdict(c) for c in resolve_configs(head, {}))
        except Exception:  # noqa: BLE001  (a head this install does not have: show the config's hash instead)
            return f"config {config_hash(_strip(config))[:8]}"
        diffs = [f"{k}={_fmt(v)}" for k, v in config["head_config"].items()
                 if _fmt(base_head.get(k)) != _fmt(v)]
        diffs += [f"{k}={_fmt(v)}" for k, v in config["train"].items()
                  if k not in _GROUP_DROP and _fmt(base_train.get(k)) != _fmt(v)]
        return ", ".join(diffs) or "defaults"
    if head == "score-fusion":
        inputs = " + ".join(c.get("head", "?") for c in config.get("inputs", []))
        w = config.get("fusion", {}).get("weights")
        return f"{inputs}, weights {'by hand ' + _fmt(w) if w else 'by cross-validation'}"
    return f"config {config_hash(_strip(config))[:8]}"


def leaderboard(runs: list[RunRecord]) -> list[Row]:
    """Rows over groups of runs with one config (up to split and seed), best mean accuracy first."""
    rows: dict[str, Row] = {}
    for r in runs:
        key = config_hash(_strip(r.config))
        if key not in rows:
            streams = r.config.get("streams") or r.metrics.get("streams") or []
            rows[key] = Row(key, r.config.get("head", r.metrics.get("head", "?")), "+".join(streams),
                            _settings(r.config))
        rows[key].runs.append(r)
    out = list(rows.values())
    labels = [(row.head, row.streams, row.settings) for row in out]
    for row in out:
        if labels.count((row.head, row.streams, row.settings)) > 1:  # e.g. two stores: tell the rows apart
            row.settings += f" #{row.key[:6]}"
        for src, stem in METRICS:
            vals = [r.metrics.get(src) for r in row.runs]
            vals = [float(v) for v in vals if v is not None]
            row.stats[f"{stem}_mean"], row.stats[f"{stem}_std"] = mean_std(vals)
        fit = [float(r.metrics["fit_seconds"]) for r in row.runs if r.metrics.get("fit_seconds") is not None]
        row.stats["fit_seconds"] = float(np.mean(fit)) if fit else float("nan")
        row.stats["params"] = row.runs[0].metrics.get("params")
        row.settings += ", did not learn" * any(r.metrics.get("did_not_learn") for r in row.runs)
    n_splits = {row.key: len(set(_splits_seeds(row)[0].split(",")) - {""}) for row in out}
    most = max(n_splits.values(), default=0)
    for row in out:
        if 0 < n_splits[row.key] < most:
            row.fewer_splits = f"{n_splits[row.key]} of {most} splits"
    out.sort(key=lambda row: (-np.nan_to_num(row.stats["accuracy_mean"], nan=-1.0), row.head, row.settings))
    return out


def _splits_seeds(row: Row) -> tuple[str, str]:
    splits = sorted({r.config.get("split") for r in row.runs if r.config.get("split") is not None})
    seeds = sorted({r.config.get("train", {}).get("seed") for r in row.runs
                    if r.config.get("train", {}).get("seed") is not None})
    return ",".join(map(str, splits)), ",".join(map(str, seeds))


CSV_COLUMNS = ("rank", "head", "streams", "settings", "n_runs", "splits", "seeds", "fewer_splits",
               "accuracy_mean", "accuracy_std", "hit5_mean", "hit5_std", "map_mean", "map_std", "gap20_mean", "gap20_std",
               "fit_seconds", "params", "runs")
STD_NOTE = "mean ± sample std (n - 1) over a config's runs (its splits and seeds); one run: its value alone"
DAGGER = "†"


def _csv_rows(rows: list[Row]) -> list[dict]:
    out = []
    for rank, row in enumerate(rows, start=1):
        splits, seeds = _splits_seeds(row)
        out.append({"rank": rank, "head": row.head, "streams": row.streams, "settings": row.settings,
                    "n_runs": len(row.runs), "splits": splits, "seeds": seeds, "fewer_splits": row.fewer_splits,
                    **row.stats,
                    "runs": ";".join(str(r.path) for r in row.runs)})
    return out


def _pm(row: Row, stem: str) -> str:
    """``68.75 ± 4.42`` over several runs; a single run's value alone (no spread is measured from one run)."""
    m, sd = row.stats[f"{stem}_mean"], row.stats[f"{stem}_std"]
    if not np.isfinite(m):
        return "n/a"
    return f"{100 * m:.2f} ± {100 * sd:.2f}" if np.isfinite(sd) else f"{100 * m:.2f}"


def _splits_cell(row: Row) -> str:
    return _splits_seeds(row)[0] + (f" {DAGGER}" if row.fewer_splits else "")


def _markdown(rows: list[Row]) -> str:
    lines = ["| # | head | streams | settings | runs | splits | accuracy | Hit@5 | mAP | GAP@20 | fit s | params |",
             "|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for rank, row in enumerate(rows, start=1):
        params = row.stats["params"]
        lines.append(f"| {rank} | {row.head} | {row.streams} | {row.settings.replace('|', '/')} | {len(row.runs)} | "
                     f"{_splits_cell(row)} | {_pm(row, 'accuracy')} | {_pm(row, 'hit5')} | {_pm(row, 'map')} | "
                     f"{_pm(row, 'gap20')} | "
                     f"{row.stats['fit_seconds']:.1f} | {params if params is not None else ''} |")
    lines.append("")
    lines.append(f"Accuracy, Hit@5, mAP and GAP@20 in %: {STD_NOTE}."
                 + (f" {DAGGER} run on fewer splits than other configs: its mean is over other test sets."
                    if any(row.fewer_splits for row in rows) else ""))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- figures


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _label(row: Row, width: int = 60) -> str:
    text = f"{row.head} [{row.streams}] {row.settings}"
    return text if len(text) <= width else text[: width - 1] + "…"


def bar_figure(rows: list[Row]):
    """The accuracy bar chart (a matplotlib figure): a bar per config, an error bar (sample std) only where a config
    has more than one run, and each value written right of its error bar, never over it."""
    import matplotlib.pyplot as plt

    shown = rows[:40]
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.32 * len(shown)))
    y = np.arange(len(shown))
    means = np.array([100 * np.nan_to_num(r.stats["accuracy_mean"]) for r in shown])
    stds = np.array([100 * r.stats["accuracy_std"] for r in shown])  # NaN: one run, no error bar
    ax.barh(y, means, color="tab:blue", alpha=0.8)
    spread = np.isfinite(stds)
    if spread.any():
        ax.errorbar(means[spread], y[spread], xerr=stds[spread], fmt="none", ecolor="black", elinewidth=1, capsize=3)
    ax.set_yticks(y, [(f"{DAGGER} " if r.fewer_splits else "") + _label(r) for r in shown], fontsize=8)
    ax.invert_yaxis()
    ends = means + np.where(spread, stds, 0.0)
    right = max(100.0, float(ends.max(initial=0.0))) + 22  # room for the widest label right of the longest bar
    ax.set_xlim(0, right)
    ax.set_xticks(np.arange(0, 101, 20))
    ax.set_xlabel("test accuracy (%): mean ± sample std over a config's splits and seeds\n(no error bar: one run"
                  + (f"; {DAGGER} fewer splits than other configs)" if any(r.fewer_splits for r in shown) else ")"),
                  fontsize=8)
    for yi, m, sd, end in zip(y, means, stds, ends):
        text = f"{m:.1f} ± {sd:.1f}" if np.isfinite(sd) else f"{m:.1f}"
        ax.annotate(text, (end, yi), xytext=(6, 0), textcoords="offset points", va="center", fontsize=7)
    return fig


def _bar_chart(rows: list[Row]) -> str:
    return _png(bar_figure(rows))


def _ap_heatmap(rows: list[Row], classes: list[str]) -> str:
    import matplotlib.pyplot as plt

    shown = rows[:40]
    ap = np.full((len(shown), len(classes)), np.nan)
    for i, row in enumerate(shown):
        for j, c in enumerate(classes):
            vals = [r.metrics.get("per_class_ap", {}).get(c) for r in row.runs]
            vals = [v for v in vals if v is not None]
            if vals:
                ap[i, j] = float(np.mean(vals))
    fig, ax = plt.subplots(figsize=(min(18, max(8, 4 + 0.18 * len(classes))), 2 + 0.3 * len(shown)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(ap), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(shown)), [_label(r, 45) for r in shown], fontsize=7)
    if len(classes) <= 120:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
    ax.set_xlabel("class")
    ax.set_title("per-class AP, mean over a config's runs (grey: no test video)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _png(fig)


def _log_rows(run: RunRecord) -> list[dict]:
    p = run.path / "train_log.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def curves_figure(rows: list[Row]):
    """Training loss and validation accuracy per epoch of each config's first run, one legend for both panels
    below them (a legend inside a panel hides the curves), or ``None`` when no run logged validation."""
    import matplotlib.pyplot as plt

    series = []
    for row in rows[:12]:
        log = _log_rows(row.runs[0])
        if any("val_accuracy" in e for e in log):
            series.append((row, log))
    if not series:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.18 * len(series)), layout="constrained")
    x_key = "step" if all("step" in e for _, log in series for e in log) else "epoch"  # converge logs by step
    for row, log in series:
        x = [e[x_key] for e in log]
        marker = "o" if len(x) < 4 else None  # a run logged once or twice is a point, not an invisible line
        (line,) = a1.plot(x, [e.get("train_loss", np.nan) for e in log], marker=marker, label=_label(row, 60))
        a2.plot(x, [e.get("val_accuracy", np.nan) for e in log], marker=marker, color=line.get_color())
    a1.set(xlabel=x_key, ylabel="train loss", title="training loss (first run of each config)")
    a2.set(xlabel=x_key, ylabel="val accuracy", ylim=(0, 1.05), title="validation accuracy (same colours)")
    fig.legend(loc="outside lower center", ncol=2, fontsize=7, frameon=False)
    return fig


def _curves(rows: list[Row]) -> str | None:
    fig = curves_figure(rows)
    return None if fig is None else _png(fig)


def _file_b64(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td.l{text-align:left}tr:nth-child(even){background:#fafafa}
img{max-width:100%;height:auto}details{margin:.4em 0}summary{cursor:pointer;font-weight:600}
.pair{display:flex;gap:1em;flex-wrap:wrap}.pair img{max-width:48%}.muted{color:#777}
"""

# Marks the page once every image has decoded, so a headless browser check can read the result from the DOM.
_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-images-broken', String(broken));
});
</script>"""


def _img(b64: str | None, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""


def _html(rows: list[Row], unfinished: list[Path], figures: dict[str, str | None], root: Path) -> str:
    e = html.escape
    head = ("<tr><th>#</th><th>head</th><th>streams</th><th>settings</th><th>runs</th><th>splits</th><th>seeds</th>"
            "<th>accuracy</th><th>Hit@5</th><th>mAP</th><th>GAP@20</th><th>fit s</th><th>params</th></tr>")
    body = []
    for rank, row in enumerate(rows, start=1):
        seeds = _splits_seeds(row)[1]
        params = row.stats["params"]
        body.append(
            f"<tr><td>{rank}</td><td class=l>{e(row.head)}</td><td class=l>{e(row.streams)}</td>"
            f"<td class=l>{e(row.settings)}</td><td>{len(row.runs)}</td><td>{e(_splits_cell(row))}</td>"
            f"<td>{e(seeds)}</td>"
            f"<td>{e(_pm(row, 'accuracy'))}</td><td>{e(_pm(row, 'hit5'))}</td><td>{e(_pm(row, 'map'))}</td>"
            f"<td>{e(_pm(row, 'gap20'))}</td>"
            f"<td>{row.stats['fit_seconds']:.1f}</td><td>{'' if params is None else params}</td></tr>")
    details = []
    for rank, row in enumerate(rows, start=1):
        first = row.runs[0]
        details.append(
            f"<details><summary>#{rank} {e(_label(row, 200))}</summary>"
            f"<p class=muted>runs: {e(', '.join(r.name for r in row.runs))}; images from {e(first.name)}</p>"
            f"<div class=pair>{_img(_file_b64(first.path / 'learning_curve.png'), 'learning curve')}"
            f"{_img(_file_b64(first.path / 'confusion.png'), 'confusion matrix')}</div></details>")
    n_runs = sum(len(r.runs) for r in rows)
    note = (f"<p class=muted>{len(unfinished)} unfinished run directories are not in the leaderboard.</p>"
            if unfinished else "")
    sections = [
        (f"<h1>twostream report</h1><p>{n_runs} runs in {len(rows)} configs under <code>{e(str(root))}</code>, "
         f"written {e(time.strftime('%Y-%m-%d %H:%M'))}. Test videos; {e(STD_NOTE)}."
         + (f" {DAGGER} marks configs run on fewer splits than others: their mean is over other test sets, so "
            "their rank is not like for like." if any(r.fewer_splits for r in rows) else "")
         + f"</p>{note}"),
        f"<h2>Leaderboard</h2><table id=leaderboard>{head}{''.join(body)}</table>",
        f"<h2>Heads</h2>{_img(figures['bars'], 'accuracy per config')}",
        f"<h2>Per-class AP</h2>{_img(figures['ap'], 'per-class AP heatmap')}",
    ]
    if figures.get("curves"):
        sections.append(f"<h2>Learning curves</h2>{_img(figures['curves'], 'learning curves')}")
    sections.append(f"<h2>Learning curve and confusion matrix per config</h2>{''.join(details)}")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>twostream report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(sections)}{_CHECK}</body></html>\n")


def write_report(runs_dir: str | Path, out: str | Path) -> dict[str, Path]:
    """Write leaderboard.csv, leaderboard.md and report.html for the complete runs under ``runs_dir``."""
    import matplotlib

    matplotlib.use("Agg")

    runs_dir, out = Path(runs_dir), Path(out)
    runs, unfinished = collect_runs(runs_dir)
    if not runs:
        raise UserError(f"no complete runs under {runs_dir}")
    rows = leaderboard(runs)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "leaderboard.csv", "md": out / "leaderboard.md", "html": out / "report.html"}

    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(_csv_rows(rows))  # floats as repr: they read back equal to the runs' metrics
    paths["md"].write_text(_markdown(rows))

    classes = runs[0].config.get("classes") or list(runs[0].metrics.get("per_class_ap", {}))  # dataset order
    figures = {"bars": _bar_chart(rows), "ap": _ap_heatmap(rows, classes) if classes else None,
               "curves": _curves(rows)}
    paths["html"].write_text(_html(rows, unfinished, figures, runs_dir))
    return paths
