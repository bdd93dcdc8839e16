"""Which videos a store's CNNs were trained on, and the check that stage two never evaluates on them.

Ma et al. (Sec. 3.1) fine-tune both stream CNNs on the target dataset's training split before extracting
features. Features of a video the CNN was trained on are training-set features: scoring it as a test video (or
choosing an epoch or fusion weights on it) measures memory, not generalisation. So:

- a fine-tuned checkpoint (``stages.finetune``) records the dataset fingerprint, the split and the sorted ids of
  the videos its CNN took gradient steps on (``train``) and of those that only chose its epoch (``val``);
- extraction copies a summary into the store's config (``config["finetuned"][stream]``: checkpoint, split, dataset,
  counts and SHA-256 digests of both id lists) and the lists themselves into ``STORE/finetune.json``;
- stage two (``seen_by_cnns`` + ``check_split``) refuses a split whose test videos a CNN saw (train or val), and
  keeps every video a CNN trained on in training, so validation and the fusion fold are carved only from
  videos no CNN trained on (``pinned``). ImageNet-only stores carry no record and pass.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.errors import UserError

__all__ = ["PROVENANCE_FILE", "check_split", "ids_digest", "seen_by_cnns", "seen_record"]

PROVENANCE_FILE = "finetune.json"


def ids_digest(ids: Iterable[str]) -> str:
    """SHA-256 of the sorted ids, one per line: the same set of videos gives the same digest."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def seen_record(train_ids: Iterable[str], val_ids: Iterable[str]) -> dict:
    """What a checkpoint records of its videos: sorted id lists with their digests."""
    train, val = sorted(train_ids), sorted(val_ids)
    return {"train": train, "val": val, "train_sha256": ids_digest(train), "val_sha256": ids_digest(val)}


def seen_by_cnns(store) -> dict[str, dict]:
    """Per fine-tuned stream of ``store``: ``{"checkpoint", "split", "dataset", "train": set, "val": set}``.

    Empty for a store whose CNNs are ImageNet-only. A store whose config names fine-tuned CNNs but whose id
    lists are missing or do not match the recorded digests is refused: its provenance cannot be checked.
    """
    summary = (store.config or {}).get("finetuned") or {}
    if not summary:
        return {}
    path = Path(store.path) / PROVENANCE_FILE
    try:
        lists = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{store.path} was extracted with fine-tuned CNNs but {PROVENANCE_FILE} (the videos they "
                        "were trained on) is missing or unreadable; rerun the same `twostream extract` to rewrite it"
                        ) from None
    out = {}
    for stream, rec in summary.items():
        ids = lists.get(stream) or {}
        train, val = ids.get("train", []), ids.get("val", [])
        if ids_digest(train) != rec.get("train_sha256") or ids_digest(val) != rec.get("val_sha256"):
            raise UserError(f"{path}: the {stream} video lists do not match the digests in the store's config; "
                            "rerun the same `twostream extract` to rewrite it")
        out[stream] = {**{k: rec.get(k) for k in ("checkpoint", "split", "dataset")},
                       "train": set(train), "val": set(val)}
    return out


def check_split(seen: Mapping[str, dict], streams: Iterable[str], split: int, test_ids: Iterable[str],
                held_out: Mapping[str, Iterable[str]]) -> None:
    """Refuse in one line when a CNN of ``streams`` saw a test video (train or val of its fine-tuning), or trained
    on a held-out video (``held_out``: name -> ids, e.g. validation, fusion fold)."""
    test = set(test_ids)
    for stream in streams:
        rec = seen.get(stream)
        if rec is None:
            continue
        where = f"stream {stream}'s CNN ({rec['checkpoint']}) was fine-tuned on split {rec['split']}"
        n = len(test & (rec["train"] | rec["val"]))
        if n:
            raise UserError(f"{where} and saw {n} of the {len(test)} test videos of split {split}: use a store "
                            f"extracted with CNNs fine-tuned on split {split} (`make protocol`), or ImageNet weights")
        for name, ids in held_out.items():
            ids = set(ids)
            n = len(ids & rec["train"])
            if n:
                raise UserError(f"{where} and trained on {n} of the {len(ids)} {name} videos of split {split}; "
                                "carve them from videos it did not train on")
