"""Heads beyond the seed papers (NetVLAD, NeXtVLAD, attention pooling, a temporal Transformer): shapes and masks,
known answers of their blocks, range checks, and learning with the default recipe on classes that differ only in
the order of their frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.features import VideoFeatures
from pipeline.heads import HEADS
from pipeline.heads.attention_pool import masked_softmax, sinusoidal_table
from pipeline.heads.vlad import ContextGating, MixtureOfExperts, NetVLAD
from pipeline.training import build_head, fit, predict, resolve_configs
from tests.head_contract import check_any_length, check_mixed_lengths, check_padding_changes_nothing, padded_batch

torch.set_num_threads(1)

NEW_HEADS = ["netvlad", "nextvlad", "attention-pool", "transformer"]
STREAMS = (8, 4)
D, C = sum(STREAMS), 5
SMALL = {"netvlad": {"clusters": "4", "hidden": "16", "reduce": "8"},
         "nextvlad": {"clusters": "4", "hidden": "16", "reduce": "8"},
         "attention-pool": {}, "transformer": {"d_model": "32", "ff": "64"}}


def build(name: str, overrides: dict | None = None, input_dim: int = D, num_classes: int = C):
    torch.manual_seed(0)
    cfg = HEADS.make_config(name, {**SMALL[name], **(overrides or {})})
    return HEADS.get(name).builder(cfg, input_dim, num_classes, STREAMS)


# ---------------------------------------------------------------- shapes and masks

@pytest.mark.parametrize("name", NEW_HEADS)
@pytest.mark.parametrize("T", [1, 2, 25, 80])  # 80: past the learned position table (64 rows)
def test_shapes_for_any_length(name, T):
    check_any_length(build(name).eval(), T, D, C)


@pytest.mark.parametrize("name", NEW_HEADS)
def test_mixed_lengths_equal_each_video_alone(name):
    check_mixed_lengths(build(name).eval(), D)


@pytest.mark.parametrize("name", NEW_HEADS)
@pytest.mark.parametrize("train", [False, True])
def test_appending_padding_changes_no_output(name, train):
    # train mode too: BN statistics come from valid frames only, attention never reads a padded key
    check_padding_changes_nothing(build(name, {"dropout": "0"}).train(train), D)


@pytest.mark.parametrize("name, overrides, blind", [
    ("netvlad", {}, True), ("nextvlad", {}, True), ("attention-pool", {"positions": "none"}, True),
    ("transformer", {"positions": "none", "pool": "mean"}, True),
    ("attention-pool", {}, False), ("attention-pool", {"positions": "learned"}, False),
    ("transformer", {}, False), ("transformer", {"positions": "learned"}, False),
])
def test_which_heads_see_frame_order(name, overrides, blind):
    model = build(name, overrides).eval()
    with torch.no_grad():  # a learned table starts near zero: make it large enough to matter
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] == 64:
                p.normal_(0, 1)
    x, _ = padded_batch([10, 10])
    with torch.no_grad():
        same = torch.allclose(model(x), model(x.flip(1)), atol=1e-5, rtol=1e-4)
    assert same == blind


@pytest.mark.parametrize("name", NEW_HEADS)
def test_backward_reaches_every_parameter(name):
    model = build(name, {"classifier": "moe"} if "vlad" in name else {}).train()
    x, mask = padded_batch([7, 5, 3])
    model.loss(x, mask, torch.tensor([0, 1, 4])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


# ---------------------------------------------------------------- known answers of the blocks

def test_netvlad_with_one_cluster_sums_residuals_to_its_centre():
    pool = NetVLAD(3, 1)
    x = torch.tensor([[[1.0, 2, 3], [3, 2, 1], [9, 9, 9]]])
    mask = torch.tensor([[True, True, False]])
    # one cluster: every assignment is 1, so V = sum over valid t of (x_t - c)
    torch.testing.assert_close(pool(x, mask)[0, 0], torch.tensor([4.0, 4, 4]) - 2 * pool.centres[0])


def test_netvlad_assignment_weights_residuals():
    pool = NetVLAD(2, 2)
    with torch.no_grad():
        pool.assign.weight.zero_()
        pool.assign.bias.copy_(torch.tensor([0.0, torch.log(torch.tensor(3.0))]))  # a = (1/4, 3/4) everywhere
        pool.centres.copy_(torch.tensor([[1.0, 0], [0, 1]]))
    x = torch.tensor([[[2.0, 2], [4, 0]]])
    v = pool(x)[0]
    # cluster 0, centre (1, 0): residuals (1, 2) + (3, 0) = (4, 2), weighted 1/4; cluster 1, centre (0, 1):
    # (2, 1) + (4, -1) = (6, 0), weighted 3/4
    torch.testing.assert_close(v, torch.tensor([[1.0, 0.5], [4.5, 0.0]]))


def test_context_gating_known_answer():
    cg = ContextGating(3)
    with torch.no_grad():
        cg.gate.weight.zero_()
        cg.gate.bias.copy_(torch.tensor([0.0, 100.0, -100.0]))
    x = torch.tensor([[2.0, -3.0, 5.0]])
    torch.testing.assert_close(cg(x), torch.tensor([[1.0, -3.0, 0.0]]))  # gates 1/2, 1, 0


def test_mixture_of_experts_is_a_gated_mixture_of_logistic_experts():
    moe = MixtureOfExperts(4, 3, experts=2)
    x = torch.randn(5, 4)
    g = torch.softmax(moe.gates(x).view(5, 3, 3), -1)
    e = torch.sigmoid(moe.experts(x).view(5, 3, 2))
    p = (g[..., :2] * e).sum(-1)  # the dummy third expert adds probability 0
    torch.testing.assert_close(torch.sigmoid(moe(x)), p)
    assert (p < 1).all() and (p > 0).all()


def test_masked_softmax_gives_padding_zero_weight():
    e = torch.tensor([[1.0, 2.0, 50.0]])
    a = masked_softmax(e, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(a, torch.tensor([[1 / (1 + np.e), np.e / (1 + np.e), 0.0]]))


def test_sinusoidal_table_follows_vaswani():
    pe = sinusoidal_table(5, 6)
    t, i = 3, 1
    assert pe[t, 2 * i].item() == pytest.approx(np.sin(t / 10000 ** (2 * i / 6)), abs=1e-6)
    assert pe[t, 2 * i + 1].item() == pytest.approx(np.cos(t / 10000 ** (2 * i / 6)), abs=1e-6)
    assert sinusoidal_table(4, 5).shape == (4, 5)  # odd widths too


def test_parameter_counts_at_ucf101_size():
    # 2 x 1280 two-stream features, 101 classes: the defaults fit a CPU (about 1.5M to 20M parameters)
    counts = {n: sum(p.numel() for p in HEADS.get(n).builder(HEADS.make_config(n), 2560, 101, (1280, 1280))
                     .parameters()) for n in NEW_HEADS}
    # netvlad: reduce 2560*256+256, assign 256*64+64, centres 64*256, FC 16384*1024+1024, BN 2048, CG 1024^2+1024,
    # FC-101 1024*101+101, input BN 2*2560
    expect = (2560 * 256 + 256) + (256 * 64 + 64) + 64 * 256 + (16384 * 1024 + 1024) + 2048 + (1024 ** 2 + 1024) \
        + (1024 * 101 + 101) + 2 * 2560
    assert counts["netvlad"] == expect
    assert 1e6 < counts["transformer"] < 2e6 and 1e6 < counts["attention-pool"] < 2e6, counts
    assert counts["nextvlad"] < 25e6, counts


# ---------------------------------------------------------------- range checks

@pytest.mark.parametrize("name, key, value, words", [
    ("netvlad", "clusters", "0", "clusters=0"),
    ("nextvlad", "groups", "0", "groups=0"),
    ("netvlad", "classifier", "svm", "choose one of linear, moe"),
    ("netvlad", "experts", "0", "experts=0"),
    ("attention-pool", "positions", "relative", "choose one of learned, sinusoidal, none"),
    ("attention-pool", "heads", "0", "heads=0"),
    ("transformer", "dropout", "1.0", "drop probability"),
    ("transformer", "pool", "max", "choose one of cls, mean"),
    ("transformer", "heads", "3", "multiple of heads=3"),
])
def test_settings_out_of_range_are_one_clear_error(name, key, value, words):
    with pytest.raises(UserError, match=words):
        resolve_configs(name, {**SMALL[name], key: value})


def test_reduce_zero_pools_raw_features_and_groups_must_divide():
    resolve_configs("netvlad", {"reduce": "0", "gating_reduction": "0"})
    cfg, _ = resolve_configs("nextvlad", {"groups": "3", "reduce": "8"})
    with pytest.raises(UserError, match="must divide into groups=3"):
        HEADS.get("nextvlad").builder(cfg, D, C, STREAMS)


# ---------------------------------------------------------------- learning: classes that differ only in order

class ArrayStore:
    """The part of a FeatureStore that ``VideoFeatures`` reads, over arrays in memory."""

    def __init__(self, videos: dict[str, np.ndarray]):
        self.videos = videos
        self.streams = {"rgb": next(iter(videos.values())).shape[1]}

    def get(self, video_id: str, stream: str) -> np.ndarray:
        return self.videos[video_id]


def order_only_set(n_per_class: int, seed: int, T: int = 25, dim: int = 16, noise: float = 0.3) -> VideoFeatures:
    """Every video holds the same T prototype frames (plus noise); the class is their order: 0 = as is, 1 = reversed,
    2 = rotated by T/2. A set-based head sees the same distribution of frame sets in all three classes. T = 25: the
    25 equally spaced frames a store holds by default, so the default ``frames=25`` reads every one."""
    protos = np.random.default_rng(1234).normal(0, 1, (T, dim))
    orders = [np.arange(T), np.arange(T)[::-1], np.roll(np.arange(T), T // 2)]
    rng = np.random.default_rng(seed)
    videos, labels = {}, []
    for c, order in enumerate(orders):
        for i in range(n_per_class):
            videos[f"c{c}_{i}"] = (protos[order] + noise * rng.normal(0, 1, (T, dim))).astype(np.float16)
            labels.append(c)
    return VideoFeatures(ArrayStore(videos), list(videos), labels, ("rgb",), frames=25)


_ACC: dict = {}


def order_accuracy(name: str, **overrides) -> float:
    """Test accuracy of ``name`` trained as a user would: the default recipe (converge), only head keys set."""
    key = (name, tuple(sorted(overrides.items())))
    if key not in _ACC:
        head_cfg, cfg = resolve_configs(name, overrides)
        assert cfg.recipe == "converge"
        train, val, test = order_only_set(64, seed=1), order_only_set(16, seed=2), order_only_set(50, seed=3)
        head = build_head(name, head_cfg, 16, 3, (16,), cfg.seed)
        fit(head, train, val, cfg, torch.device("cpu"), progress=False)
        _ACC[key] = float((predict(head, test, torch.device("cpu")).argmax(1) == test.labels).mean())
    return _ACC[key]


CHANCE = 1 / 3  # 150 test videos: at chance the accuracy has a standard deviation of about 0.04


def test_order_blind_pooling_stays_at_chance():
    assert abs(order_accuracy("temporal-pool", segments=1, pool="max") - CHANCE) < 0.15


@pytest.mark.parametrize("name", ["attention-pool", pytest.param("transformer", marks=pytest.mark.slow)])  # ~45 s
def test_heads_with_positions_learn_order(name):
    # expected: both read positions by default, so both must beat order-blind pooling clearly
    acc = order_accuracy(name)
    assert acc > 0.9, acc


@pytest.mark.parametrize("name, overrides", [
    ("attention-pool", {"positions": "none"}),
    # slow under the default recipe (18-19M parameters, 600 steps: 1.5 and 4 minutes on 2 CPU cores); their
    # order-blindness is exact and checked fast by test_which_heads_see_frame_order
    pytest.param("netvlad", {}, marks=[pytest.mark.slow, pytest.mark.demo]),
    pytest.param("nextvlad", {}, marks=[pytest.mark.slow, pytest.mark.demo]),
])
def test_set_poolings_cannot_learn_order(name, overrides):
    # expected: NetVLAD / NeXtVLAD sum over frames, and attention without positions weighs frames by content only,
    # so a video's score is the same in any frame order: chance on these classes, like max pooling
    acc = order_accuracy(name, **overrides)
    assert abs(acc - CHANCE) < 0.15, acc

def test_beyond_sweep_puts_the_new_heads_next_to_the_papers_best():
    from pathlib import Path

    from stages.sweep import expand, load_sweep

    jobs = expand(load_sweep(Path(__file__).parents[1] / "examples" / "beyond.yaml"), "S", "D", "O")
    heads = {j.head for j in jobs}
    assert set(NEW_HEADS) | {"ts-lstm", "temporal-inception"} <= heads
    for j in jobs:  # every setting is a valid key with a valid value
        resolve_configs(j.head, dict(j.overrides))
