"""Where in the video: slide a trained model over a long video and score every window.

Each window (``window`` seconds, every ``stride`` seconds) is treated as the model's training videos were: its frames
are sampled with the store's sampling over the window alone, flow stacks start at those frames, and the head scores
the window's features as it scored a test video (``pipeline.predictor``). The video is decoded once; each sampled
frame's CNN features and each frame pair's flow are computed once, however many windows share them. The window
defaults to the median length of the model's training videos, the context the head learned from.

Writes ``<video>.timeline.json`` (per window: start, end, class scores and probabilities; the segments where the
top class holds) and ``<video>.timeline.png`` (a strip plot: probability of the top classes over time).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

__all__ = ["segments", "timeline", "window_and_stride", "windows"]

MAX_TIMELINE_BYTES = 4 << 30  # decoded frames held at once


def windows(n_frames: int, fps: float, window: float, stride: float) -> list[tuple[int, int]]:
    """``[(first, stop), ...]`` frame ranges of windows of ``window`` seconds every ``stride`` seconds covering a
    video of ``n_frames`` at ``fps``; the last window ends at the video's end (one window when it is shorter)."""
    w = max(1, round(window * fps))
    step = max(1, round(stride * fps))
    if n_frames <= w:
        return [(0, n_frames)]
    starts = list(range(0, n_frames - w + 1, step))
    if starts[-1] + w < n_frames:
        starts.append(n_frames - w)
    return [(a, a + w) for a in starts]


def segments(centres: np.ndarray, top: list[str], duration: float) -> list[dict]:
    """Runs of windows with the same top class as time spans; a boundary is halfway between the centres of the
    last window of one run and the first of the next."""
    out: list[dict] = []
    for i, cls in enumerate(top):
        if out and out[-1]["class"] == cls:
            continue
        t = 0.0 if i == 0 else float((centres[i - 1] + centres[i]) / 2)
        if out:
            out[-1]["end"] = t
        out.append({"class": cls, "start": t, "end": float(duration)})
    return out


def _plot(path: Path, centres: np.ndarray, probs: np.ndarray, classes: list[str], title: str, window: float,
          cut_segments: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-probs.max(0), kind="stable")[: min(5, len(classes))]  # the classes that ever lead
    fig, (ax, bar) = plt.subplots(2, 1, figsize=(10, 1.2 + 0.45 * len(order) + 0.6), sharex=True,
                                  gridspec_kw={"height_ratios": [len(order), 1]})
    half = (centres[1] - centres[0]) / 2 if len(centres) > 1 else window / 2
    extent = (centres[0] - half, centres[-1] + half, len(order) - 0.5, -0.5)
    im = ax.imshow(probs[:, order].T, aspect="auto", cmap="viridis", vmin=0, vmax=1, extent=extent,
                   interpolation="nearest")
    ax.set_yticks(range(len(order)), [classes[i] for i in order], fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=[ax, bar], fraction=0.03, label="probability")
    colours = plt.get_cmap("tab10")
    names = sorted({s["class"] for s in cut_segments})
    for s in cut_segments:
        bar.axvspan(s["start"], s["end"], color=colours(names.index(s["class"]) % 10), alpha=0.8)
        bar.text((s["start"] + s["end"]) / 2, 0.5, s["class"], ha="center", va="center", fontsize=7)
    bar.set_yticks([])
    bar.set_xlabel("seconds")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def window_and_stride(pred, window: float | None, stride: float | None) -> tuple[float, float]:
    """The window (default: the shortest median training-video length among the model's heads) and the stride
    (default: a quarter window), checked."""
    if window is None:
        known = [s for s in (h.record.get("video_seconds") for h in pred.heads()) if s]
        if not known:
            raise UserError("the run does not record how long its training videos were: pass --window SECONDS")
        window = float(min(known))
    stride = window / 4 if stride is None else stride
    if not (window > 0 and stride > 0):
        raise UserError(f"--window and --stride must be > 0 seconds; got {window:g}, {stride:g}")
    return window, stride


def timeline(pred, video: str | Path, window: float | None = None, stride: float | None = None,
             out_dir: str | Path | None = "timeline") -> dict:
    """Scores of every window of ``video`` under ``pred`` (a ``pipeline.predictor.Predictor``); writes the JSON and PNG
    into ``out_dir`` (None: nothing written). Returns the JSON's content plus ``json`` / ``png`` paths."""
    from pipeline.extraction import flow_stacks_for, flow_task
    from pipeline.predictor import probabilities
    from pipeline.sampling import Sampling, sample_indices
    from pipeline.video import count_frames, decode

    window, stride = window_and_stride(pred, window, stride)
    video = Path(video)
    per_key: dict[str, list] = {}
    spans = None
    for key, cfg in pred.extractions.items():
        n, fps, (h, w) = count_frames(video, cfg.get("decoder", "auto"))
        if n * h * w * 3 > MAX_TIMELINE_BYTES:
            raise MemoryError(f"{n} frames of {w}x{h} do not fit in memory for a timeline; cut the video into parts")
        dec = decode(video, cfg.get("decoder", "auto"))
        frames, n, fps = dec.frames, dec.n_frames, dec.fps
        spans = windows(n, fps, window, stride) if spans is None else spans
        sampling = Sampling(**cfg["sampling"])
        idx = [a + sample_indices(b - a, fps, sampling) for a, b in spans]
        uniq = np.unique(np.concatenate(idx))
        streams = pred.needed_streams(key)
        prepared = {"rgb": frames[uniq] if "rgb" in streams else None}
        if "flow" in streams:
            prepared["flow"] = flow_stacks_for(frames, uniq, flow_task(cfg, str(pred.device)))
        feats = pred.embed(key, prepared)
        per_key[key] = [{s: a[np.searchsorted(uniq, i)] for s, a in feats.items()} for i in idx]
    assert spans is not None
    videos = [{key: per_key[key][j] for key in per_key} for j in range(len(spans))]
    scores = pred.scores(videos)
    probs = probabilities(scores, pred.multi_label)
    classes = pred.classes
    centres = np.array([(a + b) / 2 / fps for a, b in spans])
    top = [classes[i] for i in probs.argmax(1)]
    result = {
        "video": str(video), "model": pred.model.path.name, "window": window, "stride": stride, "fps": fps,
        "n_frames": n, "duration": n / fps, "classes": classes,
        "windows": [{"start": a / fps, "end": b / fps, "top": t, "scores": [float(x) for x in s],
                     "probabilities": [float(x) for x in p]} for (a, b), t, s, p in zip(spans, top, scores, probs)],
    }
    result["segments"] = segments(centres, top, n / fps)
    if out_dir is not None:
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            base = out / f"{video.name}.timeline"
            result["json"], result["png"] = str(base) + ".json", str(base) + ".png"
            Path(result["json"]).write_text(json.dumps(result, indent=1) + "\n")
        except OSError as e:
            raise UserError(f"cannot write the timeline to {out}: {e.strerror or e}") from None
        _plot(Path(result["png"]), centres, probs, classes,
              f"{video.name}: {pred.model.path.name}, windows of {window:g} s every {stride:g} s", window,
              result["segments"])
    return result
