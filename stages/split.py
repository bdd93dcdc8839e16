"""A train/test split for a dataset that has none (a folder per class, or a CSV without a split column).

``write_split(root)`` reads the dataset as every command does (``pipeline.datasets.load_manifest``), sends whole
groups of each class to test (``Manifest.with_group_split``: UCF101-style ``_gNN_`` names keep a group on one side;
other videos are each their own group) and writes ``ROOT/manifest.csv`` (``path,label,split``), which
``extract``, ``train`` and ``sweep`` then read as split 1. The file is plain CSV: edit it to move videos.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pipeline.datasets import load_manifest
from pipeline.errors import UserError
from pipeline.store import atomic_write_text

__all__ = ["write_split"]


def write_split(root: str | Path, test_fraction: float = 0.3, seed: int = 0, force: bool = False) -> dict:
    """Write ``ROOT/manifest.csv`` with split 1; returns what was written (path, counts)."""
    root = Path(root).expanduser()
    manifest = load_manifest(root)
    out = root / "manifest.csv"
    if manifest.splits:
        where = "manifest.csv" if manifest.source == "csv" else f"its {manifest.source} list files"
        raise UserError(f"{root} already defines split(s) {', '.join(map(str, sorted(manifest.splits)))} in {where}; "
                        "nothing written")
    if out.exists() and not force:
        raise UserError(f"{out} exists (a CSV without a split column); --force replaces it with one that has splits")
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must be in (0, 1); got {test_fraction}")
    split = manifest.with_group_split(test_fraction, seed=seed).splits[1]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split"])
    for v in manifest.videos:
        w.writerow([v.id, manifest.classes[v.label], split[v.id]])
    try:
        atomic_write_text(out, buf.getvalue())
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    n_test = sum(s == "test" for s in split.values())
    return {"path": out, "videos": len(manifest.videos), "classes": len(manifest.classes), "train": len(split) - n_test,
            "test": n_test, "groups": len({v.group for v in manifest.videos})}
