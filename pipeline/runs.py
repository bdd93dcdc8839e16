"""Run directories: where a trained head and everything about it is written.

``OUT/<head>-<hash12>/``, the hash taken over the resolved config (head config, train config, streams, split,
seed, store and manifest fingerprints), holds::

    config.json         the resolved config (what the hash is of)
    weights.safetensors torch heads; kernel baselines write weights.npz (their learned numeric arrays, no pickle)
    metrics.json        accuracy, hit@1, hit@5, map, gap@20, per_class_ap, per_class_accuracy (by class name), n_test,
                        confusion, val accuracy, best epoch, fit seconds, parameter count (multi-label data:
                        ``multi_label``, accuracy = Hit@1, no per-class accuracy or confusion)
    scores_val.npz      per-video class scores: ids, labels, scores [N, C] (raw: logits / decision values),
    scores_fusion.npz   classes, of validation, the fusion fold every run of the split holds out, and test.
    scores_test.npz     The input of score fusion: weights are fitted on the fusion fold, never on val or test.
    extraction.json     how the store's features were made (its config, stream dims, training videos' median
                        length): what ``predict`` needs to score new videos; not part of the hash
    train_log.jsonl     one JSON line per epoch
    learning_curve.png  train loss and val accuracy per epoch
    confusion.png       row-normalised test confusion matrix (single-label data)
    COMPLETE            written last; a directory without it is a run that did not finish and is redone

Every file is written to ``NAME.partial`` and renamed, so a reader never sees half a file.

One process at a time writes a run directory: ``RunDir.claim`` takes an exclusive ``fcntl.flock`` on
``OUT/.<head>-<hash12>.lock`` (next to the directory, which ``start`` removes and recreates) and holds it until
``mark_complete``. The kernel drops the lock when its holder dies, however it dies, so a directory without
``COMPLETE`` and without a live holder is a run that did not finish; the next claimant resets it. A second
process that finds the lock held says so and waits; when it gets the lock the run is usually complete (cached).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

__all__ = ["RunDir", "config_hash", "ensure_writable", "write_summary"]

COMPLETE = "COMPLETE"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: dict) -> str:
    """First 12 hex digits of the SHA-256 of the canonical JSON of ``config``."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()[:12]


def ensure_writable(out: str | os.PathLike) -> Path:
    """Create the runs folder ``out`` if needed and make sure files can be created in it; ``UserError`` (one line)
    otherwise, so a run is refused before any feature is loaded."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)  # a unique name: threads and processes may probe at once
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write runs to {out}: {e.strerror or e}") from None
    return out


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=True)
    _atomic(path, lambda f: f.write(text.encode() + b"\n"))


class RunDir:
    """One run's directory. ``RunDir(out, head, config)``; ``.complete`` tells whether it is done."""

    def __init__(self, out: str | os.PathLike, head: str, config: dict):
        self.config = config
        self.hash = config_hash(config)
        self.name = f"{head}-{self.hash}"
        self.path = Path(out) / self.name
        self.lock_path = Path(out) / f".{self.name}.lock"
        self._lock: int | None = None  # file descriptor holding the flock while this process owns the run

    def claim(self, echo: Callable[[str], None] = print) -> None:
        """Make this process the only writer of the run directory (blocking flock on ``lock_path``).

        When another live process holds the run, says so through ``echo`` and waits for it. Check ``complete``
        afterwards: the other process has usually finished the run. Raises ``UserError`` when ``OUT`` cannot be
        written.
        """
        if self._lock is not None:
            return
        ensure_writable(self.path.parent)
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write runs to {self.path.parent}: {e.strerror or e}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                echo(f"{self.name} is being trained by process {holder}; waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock = fd

    def release(self) -> None:
        """Give up the run's lock (``mark_complete`` does this; the kernel does it when the process ends)."""
        if self._lock is not None:
            fd, self._lock = self._lock, None
            os.close(fd)  # closing the only descriptor of the open file drops the flock

    def __del__(self):
        if getattr(self, "_lock", None) is not None:
            try:
                self.release()
            except OSError:
                pass  # interpreter shutdown: the kernel drops the lock with the process

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE).is_file()

    def start(self) -> None:
        """Create the directory afresh (what an unfinished earlier attempt left is removed) and write config.json.
        Claims the run first if this process has not (only the lock holder may reset a directory)."""
        self.claim()
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        write_json(self.path / "config.json", self.config)
        (self.path / "train_log.jsonl").touch()

    def log(self, row: dict) -> None:
        """Append one epoch's row to train_log.jsonl (appended as it happens, so a long run can be watched)."""
        with open(self.path / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def write_scores(self, name: str, ids, labels, scores, classes) -> None:
        """``ids`` (unicode), ``labels`` [N] int64 (multi-label data: a 0/1 matrix [N, C]), ``scores`` [N, C] float32,
        ``classes``: loads with allow_pickle=False."""
        arrays = {"ids": np.asarray(list(ids), dtype=str), "labels": np.asarray(labels, dtype=np.int64),
                  "scores": np.asarray(scores, dtype=np.float32), "classes": np.asarray(list(classes), dtype=str)}
        _atomic(self.path / name, lambda f: np.savez(f, **arrays))

    def write_torch_weights(self, module, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
        _atomic(self.path / "weights.safetensors", lambda f: f.write(save(tensors, metadata=metadata)))

    def write_sklearn_weights(self, estimator) -> None:
        """The estimator's learned numeric arrays (attributes ending in ``_``, e.g. ``support_``, ``dual_coef_``)
        as an npz that loads with ``allow_pickle=False``; together with config.json they describe the model.
        Non-numeric learned attributes (nested estimators) are left out."""
        arrays = {}
        for k, v in vars(estimator).items():
            if k.endswith("_") and not k.startswith("_"):
                a = np.asarray(v) if isinstance(v, (np.ndarray, int, float, list, tuple)) else None
                if a is not None and a.dtype.kind in "fiub":
                    arrays[k] = a
        _atomic(self.path / "weights.npz", lambda f: np.savez(f, **arrays))

    def plot_learning_curve(self, history: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        if history:
            ep = [r["epoch"] for r in history]
            ax.plot(ep, [r["train_loss"] for r in history], label="train loss", color="tab:blue")
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.ticklabel_format(axis="y", useOffset=False)
            if any("val_accuracy" in r for r in history):
                ax2 = ax.twinx()
                ax2.plot(ep, [r.get("val_accuracy", np.nan) for r in history], label="val accuracy", color="tab:red")
                ax2.set_ylabel("val accuracy")
                ax2.set_ylim(0, 1)
                ax2.legend(loc="upper right")
            ax.legend(loc="upper left")
        else:
            ax.text(0.5, 0.5, "no epochs (fitted in one step)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(self.name)
        self._save_fig(fig, "learning_curve.png")

    def plot_confusion(self, confusion, classes: list[str]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cm = np.asarray(confusion, dtype=np.float64)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # rows: true class
        size = min(16, max(5.0, 3 + 0.12 * len(classes)))
        fig, ax = plt.subplots(figsize=(size, size))
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        if len(classes) <= 40:
            ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{self.name}\ntest confusion (rows normalised)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        self._save_fig(fig, "confusion.png")

    def _save_fig(self, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        fig.tight_layout()
        _atomic(self.path / name, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)

    def mark_complete(self) -> None:
        """Written last: from here on the run is cached (and no longer locked)."""
        _atomic(self.path / COMPLETE, lambda f: f.write(self.hash.encode() + b"\n"))
        self.release()


SUMMARY_KEYS = ("accuracy", "hit@1", "hit@5", "map")


def write_summary(out: str | os.PathLike, head: str, runs: dict[int, tuple[str, dict]]) -> tuple[Path, dict]:
    """Mean +- sample std over splits of the headline metrics: ``OUT/<head>-splits-<hash12>.json`` and ``.md``.

    ``runs`` maps split -> (run directory name, metrics). The hash is of the run names, so the same runs give
    the same summary file.
    """
    from pipeline.metrics import mean_std

    splits = sorted(runs)
    summary: dict[str, Any] = {"head": head, "splits": splits, "runs": {str(s): runs[s][0] for s in splits}}
    for key in SUMMARY_KEYS:
        vals = [runs[s][1][key] for s in splits]
        m, sd = mean_std(vals)
        summary[key] = {"mean": m, "std": sd if np.isfinite(sd) else None, "per_split": vals}
    base = Path(out) / f"{head}-splits-{config_hash(summary['runs'])}"
    write_json(base.with_suffix(".json"), summary)
    lines = [f"# {head}: {len(splits)} splits", "", "| metric | mean | std | " + " | ".join(f"split {s}" for s in splits) + " |",
             "|---|---|---|" + "---|" * len(splits)]
    for key in SUMMARY_KEYS:
        r = summary[key]
        std = "" if r["std"] is None else f"{100 * r['std']:.2f}"
        lines.append(f"| {key} | {100 * r['mean']:.2f} | {std} | "
                     + " | ".join(f"{100 * v:.2f}" for v in r["per_split"]) + " |")
    text = "\n".join(lines) + "\n"
    _atomic(base.with_suffix(".md"), lambda f: f.write(text.encode()))
    return base.with_suffix(".json"), summary
