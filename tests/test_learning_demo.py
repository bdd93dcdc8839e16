"""End to end on real videos: the demo's order-only classes, through extraction and training.

BeachThenForest and ForestThenBeach hold the same frames in the other order, so a head that pools RGB features
over time without order (temporal max pooling) cannot tell them apart, while heads that read the order
(TS-LSTM, Temporal-Inception; Ma et al. Section 3) must. Slow: it extracts 24 videos with the real backbone.
"""

import shutil

import pytest

import pipeline.heads  # noqa: F401
from pipeline.demo_data import write_demo_dataset
from pipeline.sampling import Sampling
from stages.extract import ExtractConfig, RunOptions, extract
from stages.train import TrainJob, train

ORDER_CLASSES = ["BeachThenForest", "ForestThenBeach"]


@pytest.fixture(scope="module")
def order_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("order")
    demo = write_demo_dataset(tmp / "demo")
    root = tmp / "data"
    (root / "ucfTrainTestlist").mkdir(parents=True)
    for c in ORDER_CLASSES:
        shutil.copytree(demo / c, root / c)
    lists = demo / "ucfTrainTestlist"
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(ORDER_CLASSES)))
    for name in ("trainlist01.txt", "testlist01.txt"):
        keep = []
        for line in (lists / name).read_text().splitlines():
            parts = line.split()
            if parts and parts[0].split("/")[0] in ORDER_CLASSES:
                cls = parts[0].split("/")[0]
                keep.append(parts[0] + (f" {ORDER_CLASSES.index(cls) + 1}" if len(parts) > 1 else ""))
        (root / "ucfTrainTestlist" / name).write_text("\n".join(keep) + "\n")
    store = tmp / "store"
    s = extract(root, store, ExtractConfig(streams=("rgb",), sampling=Sampling("frames", 25)),
                RunOptions(workers=1, progress=False), log=lambda *_: None)
    assert s.failed == 0 and s.done == 24
    return root, store, tmp / "runs"


def _accuracy(order_store, head, *sets):
    root, store, runs = order_store
    job = TrainJob(store=str(store), dataset=str(root), head=head, streams=("rgb",), out=str(runs),
                   overrides=tuple(tuple(s.split("=", 1)) for s in sets),
                   fusion_fold=0.0)  # nothing is fused here: 16 training videos are few enough without a fold out
    return train(job, progress=False, echo=lambda _: None).metrics["accuracy"]


@pytest.mark.slow
def test_order_heads_beat_chance_where_max_pooling_cannot(order_store):
    fast = ("lr=1e-3", "epochs=60", "patience=60", "weight_decay=0")
    ts_lstm = _accuracy(order_store, "ts-lstm", *fast)
    inception = _accuracy(order_store, "temporal-inception", "epochs=100", "patience=100")  # paper's Adam settings
    max_pool = _accuracy(order_store, "temporal-pool", "segments=1", "pool=max", *fast)
    segment_pool = _accuracy(order_store, "temporal-pool", "segments=3", "pool=max", *fast)
    assert ts_lstm >= 0.9, ts_lstm
    assert inception >= 0.9, inception
    assert max_pool <= 0.75, max_pool  # 8 test videos, chance 0.5: the same frames, in any order, look alike
    assert segment_pool >= 0.9, segment_pool  # Ma et al. 3.2: pooling per temporal segment keeps coarse order


@pytest.mark.slow
def test_deep_lstm_and_slow_fusion_beat_pooling_on_order(order_store):
    """Ng et al. 3.2 and Karpathy et al. 3.1 read temporal order; Late Pooling (max over time) cannot."""
    # the store holds 25 frames per video: Ng's heads read those 25, Slow Fusion counts its clips in them
    fast = ("optimizer=adam", "lr=1e-3", "epochs=60", "patience=60", "weight_decay=0")
    deep_lstm = _accuracy(order_store, "deep-lstm", *fast, "layers=2", "frames=25")
    slow_fusion = _accuracy(order_store, "slow-fusion", *fast, "fc_dim=256", "tower_dims=128,128,128", "any_rate=true")
    late_pool = _accuracy(order_store, "late-pool", *fast, "hidden=256", "frames=25")
    assert deep_lstm >= 0.9, deep_lstm
    assert slow_fusion >= 0.9, slow_fusion
    assert late_pool <= 0.75, late_pool
