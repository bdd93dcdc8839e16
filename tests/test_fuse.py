"""Score fusion of finished runs: weights by cross-validation on the fusion fold reproduce the better input when the
other is noise; weights by hand; a run directory with metrics; clear refusals; per-run normalisation by run kind;
weights that never look at validation or test scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.errors import UserError
from pipeline.metrics import classification_report
from pipeline.runs import COMPLETE, RunDir
from pipeline.score_fusion import score_metric
from stages.fuse import FuseJob, fuse

CLASSES = ["a", "b", "c", "d"]


def _fake_run(out, name: str, scores_of, split: int = 1, n_val: int = 40, n_test: int = 60, seed: int = 0,
              test_ids=None, n_fusion: int = 40, fold: str | None = "fold-1", head: str | None = None,
              val_scores_of=None, extra_config: dict | None = None):
    """A complete run directory as stages.train writes it, with scores from ``scores_of(labels, rng)`` (validation
    scores from ``val_scores_of`` when given); ``fold``: the fusion fold's digest (None: a run without one)."""
    rng = np.random.default_rng(seed)
    y_val = np.arange(n_val) % len(CLASSES)
    y_test = np.arange(n_test) % len(CLASSES)
    ids_val = [f"v/val{i:03d}.avi" for i in range(n_val)]
    ids_test = test_ids or [f"v/test{i:03d}.avi" for i in range(n_test)]
    config = {"head": head or name, "split": split, "streams": [name], "manifest_fingerprint": "m1",
              "head_config": {}, "train": {"seed": seed},
              "fusion_fold": {"fraction": 0.1, "n": n_fusion, "sha256": fold} if fold else None,
              **(extra_config or {})}
    run = RunDir(out, name, config)
    run.start()
    s_val, s_test = (val_scores_of or scores_of)(y_val, rng), scores_of(y_test, rng)
    run.write_scores("scores_val.npz", ids_val, y_val, s_val, CLASSES)
    run.write_scores("scores_test.npz", ids_test, y_test, s_test, CLASSES)
    if fold:
        y_fold = np.arange(n_fusion) % len(CLASSES)
        run.write_scores("scores_fusion.npz", [f"v/fusion{i:03d}.avi" for i in range(n_fusion)], y_fold,
                         scores_of(y_fold, rng), CLASSES)
    run.write_json("metrics.json", classification_report(s_test, y_test, CLASSES))
    run.mark_complete()
    return run.path


def informative(y, rng):
    s = rng.normal(0, 1, (len(y), len(CLASSES)))
    s[np.arange(len(y)), y] += 1.5  # right most of the time, not always
    return s


def noise(y, rng):
    return 50 * rng.normal(0, 1, (len(y), len(CLASSES)))  # pure noise on a larger scale


def test_cross_validated_weights_reproduce_the_better_input(tmp_path):
    good = _fake_run(tmp_path / "in", "good", informative, n_fusion=600, n_test=200, seed=1)
    bad = _fake_run(tmp_path / "in", "bad", noise, n_fusion=600, n_test=200, seed=2)
    res = fuse(FuseJob(runs=(str(bad), str(good)), out=str(tmp_path / "out"), normalize="zscore"),
               echo=lambda m: None)
    m = res.metrics
    # CV on 600 fusion-fold videos: (nearly) all weight on the informative run. A small weight on noise flips few
    # argmaxes and can win a fold by chance, so the check is on the outcome; the next test pins exact weights.
    assert m["weights"][1] >= 0.8 and m["weights_by"].startswith("cross-validation")
    good_m = json.loads((good / "metrics.json").read_text())
    assert m["input_accuracy"][good.name] == good_m["accuracy"] > m["input_accuracy"][bad.name] + 0.2
    assert abs(m["accuracy"] - good_m["accuracy"]) <= 0.05
    with np.load(good / "scores_test.npz", allow_pickle=False) as z:
        good_pred = z["scores"].argmax(1)
    with np.load(res.path / "scores_test.npz", allow_pickle=False) as z:
        assert z["scores"].shape == (200, 4) and list(z["classes"]) == CLASSES
        fused_pred = z["scores"].argmax(1)
        assert (fused_pred == z["labels"]).mean() == m["accuracy"]  # metrics are of the written scores
    assert (fused_pred == good_pred).mean() >= 0.85  # the better input's predictions, reproduced
    # a run directory like any other
    assert res.path.parent == tmp_path / "out" and res.path.name.startswith("score-fusion-")
    for f in ("config.json", "metrics.json", "scores_val.npz", "scores_fusion.npz", "scores_test.npz", "weights.npz",
              "confusion.png", COMPLETE):
        assert (res.path / f).is_file(), f
    with np.load(res.path / "weights.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["weights_"], m["weights"])
    said = []
    again = fuse(FuseJob(runs=(str(bad), str(good)), out=str(tmp_path / "out"), normalize="zscore"),
                 echo=said.append)
    assert again.cached and again.path == res.path
    assert said == [f"cached: {res.path}: weights {', '.join(f'{w:.2f}' for w in m['weights'])} -> accuracy "
                    f"{100 * m['accuracy']:.2f}  hit@5 {100 * m['hit@5']:.2f}  mAP {100 * m['map']:.2f}  (inputs: "
                    + ", ".join(f"{n} {100 * a:.2f}" for n, a in m["input_accuracy"].items()) + ")"]
    # auto (these heads are not torch heads: temperature per run) flattens the noise run to near-uniform
    # log-probabilities, so whatever its weight the fused predictions are the informative run's
    auto = fuse(FuseJob(runs=(str(bad), str(good)), out=str(tmp_path / "out")), echo=lambda m: None).metrics
    assert auto["normalization"][bad.name]["temperature"] > 100 * auto["normalization"][good.name]["temperature"]
    assert abs(auto["accuracy"] - good_m["accuracy"]) <= 0.02


def test_exact_weights_when_noise_hurts_every_mix(tmp_path):
    """The informative run is right on every video by a fixed margin and the noise run is huge where it is
    wrong, so any weight on noise costs fusion-fold accuracy: CV must give exactly (0, 1)."""
    def clean(y, rng):
        s = np.zeros((len(y), len(CLASSES)))
        s[np.arange(len(y)), y] = 1.0
        return s

    def spikes(y, rng):  # a large score on a wrong class for every video
        s = np.zeros((len(y), len(CLASSES)))
        s[np.arange(len(y)), (y + 1 + rng.integers(0, len(CLASSES) - 1, len(y))) % len(CLASSES)] = 30.0
        return s

    good = _fake_run(tmp_path / "in", "good", clean, seed=1)
    bad = _fake_run(tmp_path / "in", "bad", spikes, seed=2)
    m = fuse(FuseJob(runs=(str(bad), str(good)), out=str(tmp_path / "out"), normalize="none"),
             echo=lambda m: None).metrics
    assert m["weights"] == [0.0, 1.0] and m["accuracy"] == 1.0 and m["input_accuracy"][bad.name] == 0.0


def test_weights_by_hand_and_complementary_inputs(tmp_path):
    def half(which):
        def scores(y, rng):  # knows classes `which` perfectly, guesses elsewhere
            s = rng.normal(0, 1, (len(y), len(CLASSES)))
            rows = np.isin(y, which)
            s[np.flatnonzero(rows), y[rows]] += 6.0
            return s
        return scores

    a = _fake_run(tmp_path / "in", "a", half([0, 1]), seed=3)
    b = _fake_run(tmp_path / "in", "b", half([2, 3]), seed=4)
    cv = fuse(FuseJob(runs=(str(a), str(b)), out=str(tmp_path / "out")), echo=lambda m: None).metrics
    assert 0.3 <= cv["weights"][0] <= 0.7  # both are needed
    assert cv["accuracy"] > max(cv["input_accuracy"].values())
    hand = fuse(FuseJob(runs=(str(a), str(b)), out=str(tmp_path / "out"), weights=(1.0, 3.0)), echo=lambda m: None)
    assert hand.metrics["weights"] == [0.25, 0.75] and hand.metrics["weights_by"] == "hand"
    assert hand.path != tmp_path / "out" / cv["inputs"][0]


def test_refuses_runs_of_other_splits_videos_or_unfinished(tmp_path):
    a = _fake_run(tmp_path / "in", "a", informative, seed=1)
    other_split = _fake_run(tmp_path / "in", "b", informative, split=2, seed=2)
    with pytest.raises(UserError, match="different splits"):
        fuse(FuseJob(runs=(str(a), str(other_split)), out=str(tmp_path / "out")))
    other_videos = _fake_run(tmp_path / "in", "c", informative, seed=3,
                             test_ids=[f"v/other{i:03d}.avi" for i in range(60)])
    with pytest.raises(UserError, match="different test videos"):
        fuse(FuseJob(runs=(str(a), str(other_videos)), out=str(tmp_path / "out")))
    (other_videos / COMPLETE).unlink()
    with pytest.raises(UserError, match="not complete"):
        fuse(FuseJob(runs=(str(a), str(other_videos)), out=str(tmp_path / "out")))
    with pytest.raises(UserError, match="at least two"):
        fuse(FuseJob(runs=(str(a),)))
    with pytest.raises(UserError, match="2 runs"):
        fuse(FuseJob(runs=(str(a), str(a)), weights=(1.0,)))


def test_videos_in_another_order_are_aligned(tmp_path):
    a = _fake_run(tmp_path / "in", "a", informative, seed=1)
    b = _fake_run(tmp_path / "in", "b", informative, seed=2)
    path = b / "scores_test.npz"
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    order = np.arange(len(d["ids"]))[::-1]
    np.savez(path, ids=d["ids"][order], labels=d["labels"][order], scores=d["scores"][order], classes=d["classes"])
    res = fuse(FuseJob(runs=(str(a), str(b)), out=str(tmp_path / "out"), weights=(0.0, 1.0)), echo=lambda m: None)
    assert res.metrics["accuracy"] == json.loads((b / "metrics.json").read_text())["accuracy"]


def test_fuse_cli(tmp_path):
    from cli.sweep import fuse as fuse_cmd

    good = _fake_run(tmp_path / "in", "good", informative, seed=1)
    bad = _fake_run(tmp_path / "in", "bad", noise, seed=2)
    res = CliRunner().invoke(fuse_cmd, [str(good), str(bad), "--out", str(tmp_path / "out"), "--weights", "2,1"])
    assert res.exit_code == 0, res.output
    assert "weights 0.67, 0.33" in res.output and "score-fusion-" in res.output
    res = CliRunner().invoke(fuse_cmd, [str(good), str(bad), "--weights", "1,x"])
    assert res.exit_code != 0


def test_weights_on_the_fusion_fold_do_not_favour_the_head_that_chose_its_epoch_on_validation(tmp_path):
    """A torch head whose early stopping made its validation scores look perfect but which is weak elsewhere, and an
    SVM that is honest everywhere (margins on another scale): weights fitted on validation (the old way) go to the
    torch head; weights fitted on the fusion fold go to the SVM and beat both the old fusion and the torch head."""
    from pipeline.score_fusion import ScoreFusion

    def overfit_val(y, rng):  # what model selection on these very videos leaves behind
        s = rng.normal(0, 1, (len(y), len(CLASSES)))
        s[np.arange(len(y)), y] += 4.0
        return s

    def weak(y, rng):
        s = rng.normal(0, 1, (len(y), len(CLASSES)))
        s[np.arange(len(y)), y] += 0.6
        return s

    def margins(y, rng):
        return 0.2 * informative(y, rng)

    kw = {"n_val": 200, "n_test": 400, "n_fusion": 400}
    torch_run = _fake_run(tmp_path / "in", "lstm", weak, head="ts-lstm", val_scores_of=overfit_val, seed=1, **kw)
    svm_run = _fake_run(tmp_path / "in", "svm", margins, head="svm", seed=2, **kw)
    runs = (str(torch_run), str(svm_run))

    def scores(part):
        out = []
        for r in (torch_run, svm_run):
            with np.load(r / f"scores_{part}.npz", allow_pickle=False) as z:
                out.append(z["scores"].astype(np.float64))
                y = z["labels"]
        return out, y

    (val, y_val), (test, y_test) = scores("val"), scores("test")
    old = ScoreFusion(normalize="zscore").fit(val, y_val)
    assert old.weights_[0] > old.weights_[1]  # the old fit: the torch head's spent validation scores win

    m = fuse(FuseJob(runs=runs, out=str(tmp_path / "out")), echo=lambda m: None).metrics
    assert m["weights_by"] == "cross-validation on the fusion fold"
    assert m["normalization"][torch_run.name]["rule"] == "log-softmax"  # logits of a cross-entropy head
    assert m["normalization"][svm_run.name]["rule"] == "temperature"  # margins, scaled on the fusion fold
    assert m["weights"][1] > m["weights"][0]
    old_accuracy = score_metric(old.decision_function(test), y_test)
    svm_accuracy = m["input_accuracy"][svm_run.name]
    assert m["accuracy"] >= svm_accuracy - 0.02 and m["accuracy"] > old_accuracy + 0.05
    assert m["accuracy"] > m["input_accuracy"][torch_run.name] + 0.2


def test_fusion_weights_never_read_validation_or_test_scores(tmp_path):
    """Replacing every validation and test score by noise changes neither the weights nor the normalisation."""
    a = _fake_run(tmp_path / "in", "a", informative, head="ts-lstm", seed=1)
    b = _fake_run(tmp_path / "in", "b", lambda y, rng: 3 * informative(y, rng), head="svm", seed=2)
    first = fuse(FuseJob(runs=(str(a), str(b)), out=str(tmp_path / "one")), echo=lambda m: None).metrics
    rng = np.random.default_rng(7)
    for run in (a, b):
        for part in ("val", "test"):
            path = run / f"scores_{part}.npz"
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
            d["scores"] = rng.normal(0, 100, d["scores"].shape).astype(np.float32)
            np.savez(path, **d)
    second = fuse(FuseJob(runs=(str(a), str(b)), out=str(tmp_path / "two")), echo=lambda m: None).metrics
    assert second["weights"] == first["weights"] and second["normalization"] == first["normalization"]
    assert second["cv_score"] == first["cv_score"]


def test_refuses_runs_without_a_common_fusion_fold_or_fine_tuned_on_another_split(tmp_path):
    a = _fake_run(tmp_path / "in", "a", informative, seed=1)
    no_fold = _fake_run(tmp_path / "in", "b", informative, seed=2, fold=None)
    other_fold = _fake_run(tmp_path / "in", "c", informative, seed=3, fold="fold-2")
    with pytest.raises(UserError, match="holds no fusion fold"):
        fuse(FuseJob(runs=(str(a), str(no_fold)), out=str(tmp_path / "out")))
    with pytest.raises(UserError, match="different fusion folds"):
        fuse(FuseJob(runs=(str(a), str(other_fold)), out=str(tmp_path / "out")))
    # hand weights with a rule that learns nothing need no fold
    hand = fuse(FuseJob(runs=(str(a), str(no_fold)), out=str(tmp_path / "out"), weights=(1.0, 1.0),
                        normalize="log-softmax"), echo=lambda m: None)
    assert hand.metrics["weights"] == [0.5, 0.5]
    leaked = _fake_run(tmp_path / "in", "d", informative, seed=4, extra_config={
        "finetuned": {"rgb": {"checkpoint": "rgb.safetensors", "split": 2, "dataset": "m1"}}})
    with pytest.raises(UserError, match="stream rgb's CNN .rgb.safetensors. was fine-tuned on split 2 but the run "
                                        "tests on split 1"):
        fuse(FuseJob(runs=(str(a), str(leaked)), out=str(tmp_path / "out")))
