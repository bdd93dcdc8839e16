"""Leaderboard and report over finished runs.

``write_report(RUNS, OUT)`` reads every complete run directory under ``RUNS`` (any depth: ``config.json`` plus
``metrics.json`` plus the ``COMPLETE`` marker) and writes::

    OUT/leaderboard.csv   one row per head and config: mean and std (population, as pipeline.metrics.mean_std)
                          over splits and seeds of accuracy (Hit@1 on multi-label data), Hit@5, mAP and GAP@20
                          (fractions; runs that predate GAP@20 leave it empty), mean fit seconds,
                          parameter count, the runs it averages
    OUT/leaderboard.md    the same in percent, for a README or an issue
    OUT/report.html       self-contained (PNG images inline as base64, no script or style from elsewhere):
                          the leaderboard, a bar chart of the heads, per-class AP as a heatmap, validation
                          learning curves from the runs' logs, and each config's learning curve and confusion
                          matrix (the runs' own PNGs)

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
            m, sd = mean_std(vals) if vals else (float("nan"), float("nan"))
            row.stats[f"{stem}_mean"], row.stats[f"{stem}_std"] = m, sd
        fit = [float(r.metrics["fit_seconds"]) for r in row.runs if r.metrics.get("fit_seconds") is not None]
        row.stats["fit_seconds"] = float(np.mean(fit)) if fit else float("nan")
        row.stats["params"] = row.runs[0].metrics.get("params")
        row.settings += ", did not learn" * any(r.metrics.get("did_not_learn") for r in row.runs)
    out.sort(key=lambda row: (-np.nan_to_num(row.stats["accuracy_mean"], nan=-1.0), row.head, row.settings))
    return out


def _splits_seeds(row: Row) -> tuple[str, str]:
    splits = sorted({r.config.get("split") for r in row.runs if r.config.get("split") is not None})
    seeds = sorted({r.config.get("train", {}).get("seed") for r in row.runs
                    if r.config.get("train", {}).get("seed") is not None})
    return ",".join(map(str, splits)), ",".join(map(str, seeds))


CSV_COLUMNS = ("rank", "head", "streams", "settings", "n_runs", "splits", "seeds",
               "accuracy_mean", "accuracy_std", "hit5_mean", "hit5_std", "map_mean", "map_std", "gap20_mean", "gap20_std",
               "fit_seconds", "params", "runs")


def _csv_rows(rows: list[Row]) -> list[dict]:
    out = []
    for rank, row in enumerate(rows, start=1):
        splits, seeds = _splits_seeds(row)
        out.append({"rank": rank, "head": row.head, "streams": row.streams, "settings": row.settings,
                    "n_runs": len(row.runs), "splits": splits, "seeds": seeds, **row.stats,
                    "runs": ";".join(str(r.path) for r in row.runs)})
    return out


def _pm(row: Row, stem: str) -> str:
    m, sd = row.stats[f"{stem}_mean"], row.stats[f"{stem}_std"]
    return "n/a" if not np.isfinite(m) else f"{100 * m:.2f} ± {100 * sd:.2f}"


def _markdown(rows: list[Row]) -> str:
    lines = ["| # | head | streams | settings | runs | accuracy | Hit@5 | mAP | GAP@20 | fit s | params |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rank, row in enumerate(rows, start=1):
        params = row.stats["params"]
        lines.append(f"| {rank} | {row.head} | {row.streams} | {row.settings.replace('|', '/')} | {len(row.runs)} | "
                     f"{_pm(row, 'accuracy')} | {_pm(row, 'hit5')} | {_pm(row, 'map')} | {_pm(row, 'gap20')} | "
                     f"{row.stats['fit_seconds']:.1f} | {params if params is not None else ''} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- figures


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _label(row: Row, width: int = 60) -> str:
    text = f"{row.head} [{row.streams}] {row.settings}"
    return text if len(text) <= width else text[: width - 1] + "…"


def _bar_chart(rows: list[Row]) -> str:
    import matplotlib.pyplot as plt

    shown = rows[:40]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(shown)))
    y = np.arange(len(shown))
    means = [100 * np.nan_to_num(r.stats["accuracy_mean"]) for r in shown]
    stds = [100 * np.nan_to_num(r.stats["accuracy_std"]) for r in shown]
    ax.barh(y, means, xerr=stds, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(y, [_label(r) for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%), mean ± std over splits and seeds")
    ax.set_xlim(0, 100)
    for yi, m in zip(y, means):
        ax.text(min(m + 1, 92), yi, f"{m:.1f}", va="center", fontsize=7)
    return _png(fig)


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


def _curves(rows: list[Row]) -> str | None:
    import matplotlib.pyplot as plt

    series = []
    for row in rows[:12]:
        log = _log_rows(row.runs[0])
        if any("val_accuracy" in e for e in log):
            series.append((row, log))
    if not series:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row, log in series:
        ep = [e["epoch"] for e in log]
        a1.plot(ep, [e.get("train_loss", np.nan) for e in log], label=_label(row, 40))
        a2.plot(ep, [e.get("val_accuracy", np.nan) for e in log], label=_label(row, 40))
    a1.set(xlabel="epoch", ylabel="train loss", title="training loss (first run of each config)")
    a2.set(xlabel="epoch", ylabel="val accuracy", ylim=(0, 1), title="validation accuracy")
    a2.legend(fontsize=6, loc="lower right")
    return _png(fig)


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
        splits, seeds = _splits_seeds(row)
        params = row.stats["params"]
        body.append(
            f"<tr><td>{rank}</td><td class=l>{e(row.head)}</td><td class=l>{e(row.streams)}</td>"
            f"<td class=l>{e(row.settings)}</td><td>{len(row.runs)}</td><td>{e(splits)}</td><td>{e(seeds)}</td>"
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
         f"written {e(time.strftime('%Y-%m-%d %H:%M'))}. Mean ± std over splits and seeds; test videos.</p>{note}"),
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
