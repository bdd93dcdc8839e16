"""The evaluation protocol of stage two: a split whose test videos a fine-tuned CNN saw is refused (train, sweep,
fuse), validation and the fusion fold are carved from videos no CNN trained on, every run of a split holds out the
same fusion fold, the three-split protocol with one store per split, and late fusion of per-stream runs as one
command.

Synthetic UCF101-layout stores (tests/synthetic.py): 3 classes x 7 groups x 2 clips, split 1 tests groups 1-2.
A fine-tuned store gets the record extraction writes (``stages.finetune.checkpoint_provenance`` on a checkpoint
whose metadata is written as ``finetune`` writes it; the CNN itself does not matter to stage two).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.datasets import load_manifest
from pipeline.errors import UserError
from pipeline.features import carve_validation
from pipeline.provenance import PROVENANCE_FILE, seen_record
from pipeline.store import config_hash
from stages.extract import ExtractConfig
from stages.finetune import CKPT_FORMAT, checkpoint_provenance
from stages.train import TrainJob, train, train_splits
from tests.synthetic import write_ucf_store

CLASSES = ["Alpha", "Beta", "Gamma"]
ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "echo": lambda _: None}


def _write_split(root: Path, n: int, test_groups: set[int]) -> None:
    """Split ``n`` of the synthetic dataset: ``test_groups`` tested, the other groups trained on."""
    train, test = [], []
    for c, name in enumerate(CLASSES):
        for video in sorted((root / name).iterdir()):
            rel, g = f"{name}/{video.name}", int(video.name.split("_g")[1][:2])
            (test if g in test_groups else train).append(rel if g in test_groups else f"{rel} {c + 1}")
    (root / "splits" / f"trainlist{n:02d}.txt").write_text("\n".join(train) + "\n")
    (root / "splits" / f"testlist{n:02d}.txt").write_text("\n".join(test) + "\n")


def _fine_tune_record(store: Path, root: Path, split: int, ckpt_dir: Path, val_fraction: float = 0.4) -> dict:
    """Record in ``store`` what extraction records for rgb (and, by cross-modality init, flow) CNNs fine-tuned on
    ``split``: finetune's own carve of the split's training list into train and val."""
    manifest = load_manifest(root)
    train_items, _ = manifest.split(split)
    ft_train, ft_val = carve_validation(train_items, val_fraction, 0)
    record = {"format": CKPT_FORMAT, "stream": "rgb", "backbone": "synthetic", "config": {"split": split},
              "dataset": manifest.fingerprint(), "split": split,
              "seen": seen_record([v.id for v in ft_train], [v.id for v in ft_val])}
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "rgb.safetensors"
    save_file({"w": torch.zeros(1)}, str(ckpt), metadata={"twostream": json.dumps(record, sort_keys=True)})
    summary, lists = checkpoint_provenance(ExtractConfig(streams=("rgb", "flow"), weights=str(ckpt)))
    header = json.loads((store / "store.json").read_text())
    header["config"]["finetuned"] = summary
    header["config_hash"] = config_hash(header["config"])
    (store / "store.json").write_text(json.dumps(header))
    (store / PROVENANCE_FILE).write_text(json.dumps(lists))
    return {"train": {v.id for v in ft_train}, "val": {v.id for v in ft_val}}


@pytest.fixture
def finetuned(tmp_path):
    """A store whose CNNs were fine-tuned on split 1; split 2 tests groups 3-4 (training videos of those CNNs)."""
    root, store = write_ucf_store(tmp_path, CLASSES, T=6)
    _write_split(root, 2, {3, 4})
    seen = _fine_tune_record(store, root, 1, tmp_path / "ckpt")
    return root, store, seen


def _job(root, store, tmp_path, head="temporal-pool", **kw):
    kw.setdefault("overrides", (("epochs", "3"),))
    return TrainJob(store=str(store), dataset=str(root), head=head, out=str(tmp_path / "runs"), **kw)


def _ids(run: Path, part: str) -> list[str]:
    with np.load(run / f"scores_{part}.npz", allow_pickle=False) as z:
        return z["ids"].tolist()


def test_train_and_sweep_refuse_a_split_whose_test_videos_a_finetuned_cnn_saw(finetuned, tmp_path, run_cli):
    root, store, _ = finetuned
    for streams in ("rgb", "flow"):  # the flow CNN started from the fine-tuned rgb weights: it inherits them
        code, text = run_cli("train", store, "--dataset", root, "--split", 2, "--head", "lstm", "--streams", streams,
                             "--out", tmp_path / "runs")
        lines = text.strip().splitlines()
        assert code == 2 and len(lines) == 1, text
        assert f"stream {streams}'s CNN (rgb.safetensors) was fine-tuned on split 1" in lines[0]
        assert "saw 12 of the 12 test videos of split 2" in lines[0]
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    from stages.sweep import run_sweep

    with pytest.raises(UserError, match="fine-tuned on split 1 and saw 12 of the 12 test videos of split 2"):
        run_sweep([_job(root, store, tmp_path, split=1), _job(root, store, tmp_path, split=2)], progress=False)
    assert not (tmp_path / "runs").exists()  # refused before the split-1 run started
    # a store without the id lists its config promises cannot be checked: refused, not trusted
    (store / PROVENANCE_FILE).unlink()
    with pytest.raises(UserError, match="finetune.json"):
        train(_job(root, store, tmp_path, split=1), **QUIET)


def test_the_finetuning_split_holds_out_only_videos_no_cnn_trained_on(finetuned, tmp_path):
    root, store, seen = finetuned
    res = train(_job(root, store, tmp_path, head="temporal-pool", split=1, streams=("rgb",),
                     overrides=(("epochs", "2"),)), **QUIET)
    val, fold, test = (set(_ids(res.path, p)) for p in ("val", "fusion", "test"))
    assert fold and val  # both carved from the CNN's own validation groups ...
    assert fold | val <= seen["val"] and not (fold | val) & seen["train"]  # ... never from its training videos
    assert not test & (seen["train"] | seen["val"])
    config = json.loads((res.path / "config.json").read_text())
    assert config["finetuned"]["rgb"] == {"checkpoint": "rgb.safetensors", "split": 1,
                                          "dataset": load_manifest(root).fingerprint()}
    assert res.metrics["n_train"] + len(val) + len(fold) == 30


def test_every_run_of_a_split_holds_out_the_same_fusion_fold(tmp_path):
    root, store = write_ucf_store(tmp_path, CLASSES, T=6)
    a = train(_job(root, store, tmp_path, head="temporal-pool", streams=("rgb",), overrides=(("val_fraction", "0"),
                                                                                             ("epochs", "2"))), **QUIET)
    b = train(_job(root, store, tmp_path, head="lstm", streams=("flow",), seed=1,
                   overrides=(("epochs", "1"), ("val_fraction", "0.3"), ("hidden", "8"))), **QUIET)
    fold = _ids(a.path, "fusion")
    assert fold and fold == _ids(b.path, "fusion")  # whatever the head, streams, seed or validation share
    ca, cb = (json.loads((r.path / "config.json").read_text())["fusion_fold"] for r in (a, b))
    assert ca == cb and ca["n"] == len(fold)
    groups = {v.split("_g")[1][:2] + v.split("/")[0] for v in fold}
    assert len(groups) * 2 == len(fold)  # whole groups (2 clips each)
    for r in (a, b):
        val, test = set(_ids(r.path, "val")), set(_ids(r.path, "test"))
        assert not set(fold) & (val | test)
        assert r.metrics["n_train"] + r.metrics["n_val"] + r.metrics["n_fusion"] == 30  # 5 groups x 2 x 3 classes
    assert a.metrics["n_train"] == 30 - len(fold)  # no validation: the fold is still held out


def test_a_split_too_small_for_a_fusion_fold_says_how_to_train_without_one(tmp_path):
    """One training group per class: the fold cannot be carved, and the refusal names the way out."""
    root, store = write_ucf_store(tmp_path, CLASSES, groups=3, T=4)
    with pytest.raises(UserError, match="too few training groups per class .* --fusion-fold 0"):
        train(_job(root, store, tmp_path, streams=("rgb",)), **QUIET)
    run = train(_job(root, store, tmp_path, streams=("rgb",), fusion_fold=0.0), **QUIET)
    assert run.metrics["n_fusion"] == 0 and json.loads((run.path / "config.json").read_text())["fusion_fold"] is None


def test_three_split_protocol_with_one_store_per_split(tmp_path):
    """`train 'STORE-{split}' --splits 1,2`: each split on the store fine-tuned on it; the mean over splits. One
    store fine-tuned on split 1 for both splits is refused."""
    root, store1 = write_ucf_store(tmp_path / "a", CLASSES, T=6)
    _, store2 = write_ucf_store(tmp_path / "b", CLASSES, T=6, seed=1)
    _write_split(root, 2, {3, 4})
    for n, s in ((1, store1), (2, store2)):
        shutil.move(s, tmp_path / f"store-{n}")
        _fine_tune_record(tmp_path / f"store-{n}", root, n, tmp_path / f"ckpt-{n}")
    job = _job(root, tmp_path / "store-{split}", tmp_path, streams=("rgb",))
    results, path, summary = train_splits(job, [1, 2], **QUIET)
    assert summary["splits"] == [1, 2] and len(summary["accuracy"]["per_split"]) == 2 and path.is_file()
    fps = [json.loads((r.path / "config.json").read_text())["finetuned"]["rgb"]["split"] for r in results]
    assert fps == [1, 2]
    with pytest.raises(UserError, match="fine-tuned on split 1 and saw"):
        train_splits(_job(root, tmp_path / "store-1", tmp_path, streams=("rgb",)), [1, 2], **QUIET)


def test_late_fusion_is_one_command_and_early_fusion_says_so(tmp_path, run_cli):
    root, store = write_ucf_store(tmp_path, CLASSES, T=6)
    code, text = run_cli("train", store, "--dataset", root, "--head", "temporal-pool", "--streams", "rgb,flow",
                         "--late-fusion", "--out", tmp_path / "runs", "--quiet")
    assert code == 0, text
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))  # not the run locks
    assert [r.split("-")[0] for r in runs] == ["score", "temporal", "temporal"], runs
    fused = tmp_path / "runs" / runs[0]
    m = json.loads((fused / "metrics.json").read_text())
    inputs = [json.loads((tmp_path / "runs" / r / "config.json").read_text()) for r in m["inputs"]]
    assert [c["streams"] for c in inputs] == [["rgb"], ["flow"]]  # one run per stream
    assert m["weights_by"] == "cross-validation on the fusion fold" and m["n_fusion"] == 6
    assert {v["rule"] for v in m["normalization"].values()} == {"log-softmax"}  # torch heads: logits
    single = [json.loads((tmp_path / "runs" / r / "metrics.json").read_text()) for r in m["inputs"]]
    assert not any(s["did_not_learn"] for s in single)  # the default recipe learns both streams
    assert m["accuracy"] >= min(s["accuracy"] for s in single)  # weights fitted on held-out videos do no harm
    # without --late-fusion one head sees both streams concatenated, and the run says so
    code, text = run_cli("train", store, "--dataset", root, "--head", "temporal-pool", "--streams", "rgb,flow",
                         "--set", "epochs=1", "--out", tmp_path / "early", "--quiet")
    assert code == 0 and "early fusion" in text and "--late-fusion" in text
    (early,) = [p for p in (tmp_path / "early").iterdir() if not p.name.startswith(".")]
    assert "--late-fusion" in json.loads((early / "metrics.json").read_text())["stream_fusion"]
    code, text = run_cli("heads", "temporal-pool")
    assert code == 0 and "--late-fusion" in text
    code, text = run_cli("train", store, "--dataset", root, "--streams", "rgb", "--late-fusion")
    assert code == 2 and "two or more streams" in text


def test_make_protocol_fine_tunes_extracts_and_trains_per_split():
    out = subprocess.run(["make", "-n", "protocol", "SPLITS=1 2", "TS=twostream", "PROTO=p", "DATA=d"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for stream in ("rgb", "flow"):
        assert f"finetune d --stream {stream} --split $s" in out
        assert f"--{stream}-checkpoint p/ckpt-$s/{stream}.safetensors" in out
    assert "--out p/ckpt-$s" in out and "extract d --out p/store-$s" in out and "for s in 1 2" in out
    assert "train 'p/store-{split}' --dataset d" in out and "--late-fusion" in out and "1 2" in out


def test_runs_of_one_setting_on_two_splits_share_a_leaderboard_row(tmp_path):
    """Each split carves its own fusion fold; the report still groups a setting's runs over splits."""
    from stages.report import collect_runs, leaderboard

    root, store = write_ucf_store(tmp_path, CLASSES, T=6)
    _write_split(root, 2, {3, 4})
    results, _, _ = train_splits(_job(root, store, tmp_path, streams=("rgb",)), [1, 2], **QUIET)
    folds = [json.loads((r.path / "config.json").read_text())["fusion_fold"]["sha256"] for r in results]
    assert folds[0] != folds[1]
    runs, _ = collect_runs(tmp_path / "runs")
    (row,) = leaderboard(runs)
    assert len(row.runs) == 2
