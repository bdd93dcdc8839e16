"""End to end on real videos: every torch head, trained with its default recipe, learns the demo.

The demo (pipeline/demo_data.py) has eight classes, each needing one kind of evidence. On RGB features alone:
CheckerDrift and StripeDrift differ in appearance only, so any head that learns at all tells them apart;
BeachThenForest and ForestThenBeach hold the same frames in the other order, so a head that pools features over
time without order (max or mean pooling, single frames) cannot tell them apart, while heads that read the order
(LSTMs, Ng et al. 3.2 / Ma et al. 3.2; temporal convolutions, Ma et al. 3.3; segment pooling, Ma et al. Table 7)
must. Every head is trained as a user would run it: `twostream train --head H --streams rgb`, nothing tuned per head.

Slow: it extracts the 96 demo videos (RGB, 25 frames) with the real backbone, then trains every head. Set
``TWOSTREAM_DEMO_DATA`` and ``TWOSTREAM_DEMO_STORE`` to reuse a demo dataset and a store extracted from it (e.g.
data/demo and data/demo-store of `make extract`) instead, and ``TWOSTREAM_DEMO_RUNS`` to a runs directory whose
finished runs of the same configs are read back instead of trained again (bench/recipes.py --runs makes them: its
seed-0 `converge` runs on rgb are this test's runs).
"""

import math
import os
from pathlib import Path

import pytest

import pipeline.heads  # noqa: F401
from pipeline.demo_data import EVIDENCE, write_demo_dataset
from pipeline.registry import HEADS
from pipeline.sampling import Sampling
from stages.extract import ExtractConfig, RunOptions, extract
from stages.train import TrainJob, train

APPEARANCE = [c for c, e in EVIDENCE.items() if e == "appearance"]
ORDER = [c for c, e in EVIDENCE.items() if e == "order"]
TORCH_HEADS = [n for n in HEADS.names() if HEADS.get(n).kind == "torch"]
# What the store forces, not tuning: conv-pool reads conv maps unless told its per-frame input is a 1x1 map; the
# store holds 25 equally spaced frames, so Ng et al.'s heads read those 25 (not 30 at a fixed rate) and Karpathy
# et al.'s clip heads count their clips in stored frames (train refuses both unless told; README "Frames a head reads").
NG = ("conv-pool", "late-pool", "slow-pool", "local-pool", "time-conv", "deep-lstm")
KARPATHY_CLIPS = ("early-fusion", "late-fusion", "slow-fusion")
STORE_SETTINGS = {**{h: ("frames=25",) for h in NG}, **{h: ("any_rate=true",) for h in KARPATHY_CLIPS}}
STORE_SETTINGS["conv-pool"] += ("grid=1",)
# Heads whose score depends on frame order (Ma et al. 3.2-3.3, Ng et al. 3.2, Wu et al. 3.2) and order-blind poolings
# (Ng et al. 3.1 Late Pooling, Karpathy's Single-Frame, Ma et al.'s temporal max pooling over one segment).
# Beyond the papers: attention pooling and the Transformer read positions by default, so they must see order;
# NetVLAD and attention without positions sum over frames, so they are expected not to.
ORDER_HEADS = ["lstm", "ts-lstm", "deep-lstm", "stream-lstm", "temporal-vgg", "temporal-inception", "temporal-pool",
               "attention-pool", "transformer"]
BLIND = [("late-pool", ()), ("single-frame", ()), ("temporal-pool", ("segments=1", "pool=max")), ("netvlad", ()),
         ("attention-pool", ("positions=none",))]
# CI trains these (minutes on 2 CPU cores); `make test-demo` (marker `demo`) trains every head, which takes hours
# on such a machine (Ng et al.'s 4096-wide FC stacks run the full step budget) and minutes on a GPU.
CI_HEADS = {"ts-lstm", "temporal-pool", "temporal-inception", "single-frame"}


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    runs = Path(os.environ.get("TWOSTREAM_DEMO_RUNS") or tmp_path_factory.mktemp("runs"))
    if os.environ.get("TWOSTREAM_DEMO_STORE"):
        return Path(os.environ["TWOSTREAM_DEMO_DATA"]), Path(os.environ["TWOSTREAM_DEMO_STORE"]), runs
    tmp = tmp_path_factory.mktemp("demo")
    root = write_demo_dataset(tmp / "data")
    store = tmp / "store"
    s = extract(root, store, ExtractConfig(streams=("rgb",), sampling=Sampling("frames", 25)),
                RunOptions(workers=1, progress=False), log=lambda *_: None)
    assert s.failed == 0 and s.done == 96
    return root, store, runs


_RESULTS: dict = {}


def _train(demo_store, head, *sets, seed=0):
    key = (head, sets, seed)
    if key not in _RESULTS:
        root, store, runs = demo_store
        job = TrainJob(store=str(store), dataset=str(root), head=head, streams=("rgb",), out=str(runs), seed=seed,
                       overrides=tuple(tuple(s.split("=", 1)) for s in (*STORE_SETTINGS.get(head, ()), *sets)))
        _RESULTS[key] = train(job, progress=False, echo=lambda _: None).metrics
    return _RESULTS[key]


def _class_accuracy(metrics, classes):
    return sum(metrics["per_class_accuracy"][c] for c in classes) / len(classes)


@pytest.mark.slow
@pytest.mark.parametrize("head", [h if h in CI_HEADS else pytest.param(h, marks=pytest.mark.demo) for h in TORCH_HEADS])
def test_every_head_learns_the_demo_with_its_default_recipe(demo_store, head):
    m = _train(demo_store, head)
    assert m["recipe"] == "converge" and not m["did_not_learn"], m["warnings"]
    assert m["lowest_loss"] < 0.5 * m["start_loss"], (m["start_loss"], m["lowest_loss"])
    if not head.startswith(("fusion-net", "nn-")):  # Wu et al.'s networks minimise a squared loss (Eq. 1), not CE
        assert m["lowest_loss"] < 0.5 * math.log(8), m["lowest_loss"]
    assert _class_accuracy(m, APPEARANCE) >= 0.75, m["per_class_accuracy"]  # 8 test videos; chance 1/8
    assert m["accuracy"] > 2 / 8, m["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("order_heads, blind_heads, seeds", [
    ([h for h in ORDER_HEADS if h in CI_HEADS], [b for b in BLIND if b[0] in CI_HEADS], (0,)),
    pytest.param(ORDER_HEADS, BLIND, (0, 1, 2), marks=pytest.mark.demo, id="every-head"),
], ids=["ci-heads", "every-head"])
def test_heads_that_model_order_beat_order_blind_pooling(demo_store, order_heads, blind_heads, seeds):
    """Accuracy on the order-only classes, mean over ``seeds``. With 8 test videos one seed is a noisy measure (a
    blind head reaches 6/8 at some seed, deep-lstm falls to 6/8 at another), so every head is measured over the
    three seeds of the README's table; the CI subset over seed 0 only (its order heads got 7 or 8 of 8 at each seed)."""
    def order_accuracy(head, *sets):
        return sum(_class_accuracy(_train(demo_store, head, *sets, seed=s), ORDER) for s in seeds) / len(seeds)

    blind = {f"{h} {' '.join(s)}": order_accuracy(h, *s) for h, s in blind_heads}
    order = {h: order_accuracy(h) for h in order_heads}  # temporal-pool: 3 segments
    assert max(blind.values()) <= 0.75, blind  # 8 test videos, chance 0.5: the same frames in any order
    assert min(order.values()) > max(blind.values()) and min(order.values()) >= 0.875, (order, blind)
