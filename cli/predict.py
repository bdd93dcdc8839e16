"""``twostream predict`` and ``twostream export``: parse, call ``pipeline.predictor`` / ``stages.export``, print."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import click

from pipeline.errors import UserError


def _write_rows(out: Path, rows: list[dict], k: int) -> None:
    """``.jsonl``: one JSON object per video; ``.csv``: video, status, then k (class, probability) pairs."""
    if out.suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif out.suffix == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["video", "status", *[f"{x}{i + 1}" for i in range(k) for x in ("class", "p")], "error"])
        for r in rows:
            pairs = [v for c in r.get("top", []) for v in (c["class"], f"{c['p']:.6f}")]
            w.writerow([r["video"], r["status"], *pairs, *[""] * (2 * k - len(pairs)), r.get("error", "")])
        text = buf.getvalue()
    else:
        raise UserError(f"--out {out}: write .jsonl or .csv")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--top", "k", type=int, default=5, show_default=True, help="Classes shown per video.")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Also write every video's top classes and scores: FILE.jsonl or FILE.csv.")
@click.option("--weights", multiple=True, help="A weights file (or folder) of the stream CNNs, found by sha256 "
                                               "(repeatable; the default backbone's weights are found alone).")
@click.option("--store", default=None, help="The feature store of a run trained before runs recorded their "
                                            "extraction (checked by fingerprint).")
@click.option("--timeline", is_flag=True, help="Slide the model over each video: per-window scores (JSON) and a PNG "
                                               "strip plot of the top classes over time.")
@click.option("--window", type=float, default=None, help="Timeline window in seconds [the training videos' median].")
@click.option("--stride", type=float, default=None, help="Timeline stride in seconds [window / 4].")
@click.option("--timeline-dir", type=click.Path(file_okay=False), default="timeline", show_default=True,
              help="Where --timeline writes <video>.timeline.json and .png.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--workers", type=int, default=1, show_default=True, help="Decode/flow processes (0: in-process).")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per video before it fails.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def predict(model, inputs, k, out, weights, store, timeline, window, stride, timeline_dir, device, workers, timeout,
            quiet):
    """Classify videos with a trained run, a fused run or an exported model: top-k classes per video.

    INPUTS: video files, folders (every video below) or .txt lists of paths. The features are made exactly as
    the run's feature store was (backbone and weights checked by hash, sampling, flow, test-time views).
    """
    from pipeline.predictor import Predictor, list_videos

    if k < 1:
        raise UserError(f"--top must be >= 1; got {k}")
    if out and Path(out).suffix not in (".jsonl", ".csv"):
        raise UserError(f"--out {out}: write .jsonl or .csv")
    predictor = Predictor.load(model, weights=weights, device=device, store=store)
    videos = list_videos(inputs)
    if timeline:
        from stages.timeline import timeline as run_timeline
        from stages.timeline import window_and_stride

        window, stride = window_and_stride(predictor, window, stride)
        predictor.check_weights()
        for v in videos:
            try:
                res = run_timeline(predictor, v, window=window, stride=stride, out_dir=timeline_dir)
            except Exception as e:  # noqa: BLE001 - one video failing does not stop the others
                click.echo(f"{v}: failed ({type(e).__name__}: {e})")
                continue
            click.echo(f"{v}: {len(res['windows'])} windows of {res['window']:g} s every {res['stride']:g} s -> "
                       f"{res['json']}, {res['png']}")
            for seg in res["segments"]:
                click.echo(f"  {seg['start']:7.2f} - {seg['end']:7.2f} s  {seg['class']}")
        return
    from tqdm import tqdm

    say = click.echo if quiet else tqdm.write  # lines above the progress bar
    rows, failed = [], 0
    for p in predictor.predict_videos(videos, workers=workers, timeout=timeout, progress=not quiet):
        if not p.ok:
            failed += 1
            say(f"{p.video}: failed ({p.error})")
            rows.append({"video": p.video, "status": "failed", "error": p.error})
            continue
        top = p.top(k)
        say(f"{p.video}: " + ", ".join(f"{c} {100 * q:.1f}%" for c, q in top))
        rows.append({"video": p.video, "status": "ok", "top": [{"class": c, "p": q} for c, q in top],
                     "scores": [float(x) for x in p.scores], "classes": p.classes, "seconds": p.seconds})
    if out:
        order = {v: i for i, v in enumerate(videos)}
        rows.sort(key=lambda r: order.get(r["video"], 0))
        _write_rows(Path(out), rows, k)
        click.echo(f"wrote {out}")
    click.echo(f"{len(videos) - failed} predicted, {failed} failed")


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="The model folder to write.")
@click.option("--weights", multiple=True, help="A weights file (or folder) of the stream CNNs, found by sha256.")
@click.option("--store", default=None, help="The feature store of a run trained before runs recorded their "
                                            "extraction.")
@click.option("--copy-embedded", is_flag=True, help="Also copy the default backbone's embedded ImageNet weights "
                                                    "(otherwise recorded by hash and origin).")
def export(model, out, weights, store, copy_embedded):
    """Write a self-contained model folder from a run or a fused run: `predict` and `Predictor.load` read it."""
    from stages.export import export_model

    path = export_model(model, out, weights=weights, store=store, copy_embedded=copy_embedded)
    click.echo(f"exported {model} -> {path}")
