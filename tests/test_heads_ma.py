"""Heads of Ma et al. 2017 (TS-LSTM and Temporal-Inception): shapes and masks, known answers, parameter counts
from the paper's layer sizes, and learning on synthetic features whose classes differ only in temporal order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.heads import HEADS
from pipeline.heads.temporal_conv import halve_time
from pipeline.heads.temporal_pool import segment_bounds, segment_pool
from pipeline.registry import RegistryError
from tests.head_contract import check_any_length, check_mixed_lengths, check_padding_changes_nothing, padded_batch

torch.set_num_threads(1)

MA_HEADS = ["two-stream", "lstm", "temporal-pool", "ts-lstm", "temporal-vgg", "temporal-inception"]
STREAMS = (8, 4)  # a small "rgb" and "flow" stream, concatenated per frame
D, C = sum(STREAMS), 5


def build(name: str, overrides: dict | None = None, input_dim: int = D, num_classes: int = C,
          stream_dims: tuple[int, ...] = STREAMS):
    torch.manual_seed(0)
    cfg = HEADS.make_config(name, overrides or {})
    return HEADS.get(name).builder(cfg, input_dim, num_classes, stream_dims)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def lstm_params(i: int, h: int) -> int:
    """An LSTM layer of h cells over i inputs: the input, forget and output gates and the cell input each have an
    input matrix [h, i] and a recurrent matrix [h, h]; cuDNN-style LSTMs (Torch's and PyTorch's, what the
    paper's LSTM-512 runs on) carry two bias vectors per gate: 4 * (h * (i + h) + 2 * h)."""
    return 4 * (h * (i + h) + 2 * h)


# ---------------------------------------------------------------- shapes and masks (every head)

@pytest.mark.parametrize("name", MA_HEADS)
@pytest.mark.parametrize("T", [1, 2, 7, 25])
def test_shapes_for_any_length(name, T):
    check_any_length(build(name).eval(), T, D, C)


@pytest.mark.parametrize("name", MA_HEADS)
def test_mixed_lengths_equal_each_video_alone(name):
    check_mixed_lengths(build(name).eval(), D)


@pytest.mark.parametrize("name", MA_HEADS)
@pytest.mark.parametrize("train", [False, True])
def test_appending_padding_changes_no_output(name, train):
    # train mode too: BN statistics come from valid frames only, so padding cannot move them
    check_padding_changes_nothing(build(name, {"dropout": "0"}).train(train), D)


@pytest.mark.parametrize("name", ["two-stream", "lstm"])
def test_step_logits(name):
    model = build(name).eval()
    x, mask = padded_batch([5, 2])
    with torch.no_grad():
        steps = model.step_logits(x, mask)
        alone = model.step_logits(x[1:, :2])
    assert model.scores_steps and steps.shape == (2, 5, C)
    torch.testing.assert_close(steps[1:, :2], alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- segments: T < segments and known answers

def test_segment_bounds_known_answers():
    start, end = segment_bounds(torch.tensor([25, 2, 1]), 3)
    assert start.tolist() == [[0, 8, 16], [0, 0, 1], [0, 0, 0]]
    assert end.tolist() == [[8, 16, 25], [1, 1, 2], [1, 1, 1]]  # every segment holds at least one frame


def test_segment_pool_known_answer_with_padding():
    x = torch.tensor([[1., 5, 2, 8, 3, 0], [4, 7, 9, 9, 9, 9]])[..., None]  # [2,6,1]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).bool()
    assert segment_pool(x, mask, 3, "max")[..., 0].tolist() == [[5, 8, 3], [4, 4, 7]]
    assert segment_pool(x, mask, 3, "mean")[..., 0].tolist() == [[3, 5, 1.5], [4, 4, 7]]


@pytest.mark.parametrize("name", ["temporal-pool", "ts-lstm"])
def test_fewer_frames_than_segments(name):
    model = build(name, {"segments": "5"}).eval()
    x, mask = padded_batch([2, 7])
    with torch.no_grad():
        out = model(x, mask)
        # a 2-frame video with 5 segments is the 5-frame video that repeats frames as the segments dictate
        start, _ = segment_bounds(torch.tensor([2]), 5)
        repeated = model(x[:1, start[0]])
    assert out.shape == (2, C)
    torch.testing.assert_close(out[:1], repeated, atol=1e-5, rtol=1e-5)


def test_halve_time_is_ceil_mode_masked_max():
    h = torch.tensor([[3., 1, 4, 1, 5], [2, 7, 1, 8, 2]])[:, None, None, :]  # [2,1,1,5]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    out, m = halve_time(h, mask)
    assert out[:, 0, 0].tolist() == [[3, 4, 5], [7, 1, 0]]  # 8 is padding; an all-padding window is zero
    assert m.tolist() == [[True, True, True], [True, True, False]]


# ---------------------------------------------------------------- known answers for the two-stream baseline

def test_two_stream_averages_stream_probabilities():
    model = build("two-stream").eval()
    x, mask = padded_batch([3, 2])
    rgb, flow = x[..., :8], x[..., 8:]
    p_rgb = F.softmax(model.classifiers[0](rgb), -1)
    p_flow = F.softmax(model.classifiers[1](flow), -1)
    p = (p_rgb + p_flow) / 2  # [B,T,C]
    want = torch.stack([p[0, :3].mean(0), p[1, :2].mean(0)]).log()
    torch.testing.assert_close(model(x, mask), want)
    # each stream is trained on its own frames: mean frame-level cross-entropy over valid frames and streams
    y = torch.tensor([1, 3])
    ce = [F.cross_entropy(fc(s[b, :n]), y[b].expand(n), reduction="sum")
          for fc, s in zip(model.classifiers, (rgb, flow)) for b, n in enumerate([3, 2])]
    torch.testing.assert_close(model.loss(x, mask, y), sum(ce) / (2 * 5))


def test_two_stream_one_stream_and_bad_dims():
    assert build("two-stream", stream_dims=(D,))(torch.randn(2, 3, D)).shape == (2, C)
    assert build("two-stream", stream_dims=())(torch.randn(2, 3, D)).shape == (2, C)
    with pytest.raises(ValueError):
        build("two-stream", stream_dims=(8, 8))


# ---------------------------------------------------------------- parameter counts of the paper's configurations

NS = NT = 2048  # ResNet-101 spatial and temporal features (Sec. 3.1)
PAPER_D, PAPER_C = NS + NT, 101  # 4096-d input, UCF101


def paper(name, overrides=None):
    return build(name, overrides, PAPER_D, PAPER_C, (NS, NT))


def test_param_count_ts_lstm():
    # BN(4096) -> 3 segments max -> LSTM-512 -> BN(512) -> FC-101 (Table 7: "3 BN Max + 512 BN FC-101")
    want = 2 * 4096 + lstm_params(4096, 512) + 2 * 512 + (512 * 101 + 101)
    assert n_params(paper("ts-lstm")) == want
    stacked = 2 * 4096 + lstm_params(4096, 1024) + lstm_params(1024, 512) + 2 * 512 + (512 * 101 + 101)
    assert n_params(paper("ts-lstm", {"hidden": "1024,512"})) == stacked


def test_param_count_vanilla_lstm():
    assert n_params(paper("lstm", {"bn": "false"})) == lstm_params(4096, 512) + 512 * 101 + 101
    assert n_params(paper("lstm")) == 2 * 4096 + lstm_params(4096, 512) + 2 * 512 + 512 * 101 + 101


def test_param_count_temporal_pool():
    # "3 BN Max BN FC-101": BN(4096), concat of 3 pooled segments, BN(3*4096), FC-101
    assert n_params(paper("temporal-pool")) == 2 * 4096 + 2 * 3 * 4096 + 3 * 4096 * 101 + 101
    # "3 BN 512 Max BN FC-101": FC-512 on every frame before pooling
    want = 2 * 4096 + (4096 * 512 + 512) + 2 * 3 * 512 + 3 * 512 * 101 + 101
    assert n_params(paper("temporal-pool", {"fc": "512"})) == want


def tcl(cin, cout, k):
    # a TCL: "1D kernels" along time (1 x k) with bias, then "a batch normalization layer right before each ReLU
    # layer" (Sec. 4.3): gamma and beta per channel
    return cin * cout * k + cout + 2 * cout


# "G maps the output of the final TCL to a 1024-dimension vector", BN, then the softmax H over UCF101's 101 classes
G = 4096 * 1024 + 1024 + 2 * 1024 + 1024 * 101 + 101


def test_param_count_temporal_inception():
    # TemConv(x) = H(G(F(F(F(F(x, W1), W2), W3), W4))), F(x, Wi) = (TCL1(x; Wi1), TCL2(x; Wi2)) with "kernel sizes of
    # 5 and 7"; the 4096 x N feature matrix enters as one channel and every module's concatenation doubles the
    # filter dimension: each flow as wide as the module input, 1 -> 2 -> 4 -> 8 -> 16 channels
    modules = sum(tcl(c, c, 5) + tcl(c, c, 7) for c in (1, 2, 4, 8))
    fusion = sum(cin * cout + cout + 2 * cout for cin, cout in ((16, 4), (4, 2), (2, 1)))  # Conv1,4 Conv1,2 Conv1,1
    assert n_params(paper("temporal-inception")) == modules + fusion + G


def test_param_count_temporal_vgg():
    assert n_params(paper("temporal-vgg")) == 4 * tcl(1, 1, 5) + G
    # multi-flow: one {T,T,T,T} tower per kernel, each with its own FC-1024 + BN, concatenated into FC-101
    def tower(k):
        return 4 * tcl(1, 1, k) + 4096 * 1024 + 1024 + 2 * 1024

    assert n_params(paper("temporal-vgg", {"kernels": "5,7"})) == tower(5) + tower(7) + 2048 * 101 + 101


def test_param_count_two_stream():
    assert n_params(paper("two-stream")) == 2 * (2048 * 101 + 101)


# ---------------------------------------------------------------- configs: ablation rows, --set parsing, defaults

def test_ablation_rows_build_and_run():
    rows = [
        ("temporal-inception", {"downsample": "stride"}),
        ("temporal-inception", {"factorize": "true"}),
        ("temporal-inception", {"reduce": "avg"}),
        ("temporal-inception", {"reduce_per_module": "true", "reduce": "conv", "reduce_dims": "1"}),
        ("temporal-inception", {"fc": "0", "bn": "false"}),
        ("temporal-inception", {"kernels": "3,9", "reduce_dims": "8,4,2,1"}),
        ("temporal-vgg", {"kernels": "5,7", "fc": "512"}),
        ("ts-lstm", {"segments": "5", "hidden": "512,512,512", "pool": "mean"}),
        ("temporal-pool", {"segments": "1", "pool": "max", "bn_in": "false", "bn_out": "false"}),
        ("lstm", {"average_steps": "true"}),
    ]
    x, mask = padded_batch([9, 3])
    for name, overrides in rows:
        model = build(name, overrides).eval()
        with torch.no_grad():
            batched = model(x, mask)
            alone = model(x[1:, :3])
        assert batched.shape == (2, C), (name, overrides)
        torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=1e-5)


def test_flatten_rows_need_the_fixed_length():
    # Table 8 "1L (T,T)": one multi-flow module, the remaining ceil(25/2)=13 frames flattened into the FC
    model = build("temporal-inception", {"layers": "1", "time_reduce": "flatten"}).eval()
    fusion = sum(cin * cout + cout + 2 * cout for cin, cout in ((2, 4), (4, 2), (2, 1)))
    fc_in = 1 * D * 13
    want = tcl(1, 1, 5) + tcl(1, 1, 7) + fusion + fc_in * 1024 + 1024 + 2 * 1024 + 1024 * C + C
    assert n_params(model) == want
    assert model(torch.randn(2, 25, D)).shape == (2, C)
    with pytest.raises(ValueError):
        model(torch.randn(2, 24, D))


def test_set_overrides_and_errors():
    cfg = HEADS.make_config("temporal-pool", {"segments": "1", "pool": "max"})
    assert (cfg.segments, cfg.pool) == (1, "max")
    assert HEADS.make_config("ts-lstm", {"hidden": "1024,512"}).hidden == (1024, 512)
    with pytest.raises(RegistryError):
        HEADS.make_config("ts-lstm", {"segmentz": "3"})
    with pytest.raises(ValueError):
        build("temporal-pool", {"pool": "median"})(torch.randn(2, 3, D))
    with pytest.raises(ValueError):
        build("temporal-inception", {"kernels": "4,6"})


def test_paper_training_defaults():
    d = HEADS.get("ts-lstm").config_cls.train_defaults
    assert (d["optimizer"], d["lr"], d["frames"]) == ("adam", 5e-5, 25)
    for name in ("temporal-vgg", "temporal-inception"):
        d = HEADS.get(name).config_cls.train_defaults
        assert (d["optimizer"], d["lr"], d["weight_decay"], d["frames"]) == ("adam", 1e-4, 1e-1, 25)
    assert HEADS.get("lstm").config_cls.train_defaults["lr"] == 5e-5


# ---------------------------------------------------------------- learning: classes that differ only in order

def order_only_data(n_per_class: int, seed: int, T: int = 12, dim: int = 16, noise: float = 0.3):
    """Every video holds the same T prototype frame vectors (plus noise); the class is their order:
    0 = as is, 1 = reversed, 2 = rotated by T/2. A set-based model (temporal max pooling) sees identical
    distributions for all three classes."""
    protos = torch.randn(T, dim, generator=torch.Generator().manual_seed(1234))
    orders = [torch.arange(T), torch.arange(T).flip(0), torch.arange(T).roll(T // 2)]
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c, order in enumerate(orders):
        xs.append(protos[order].expand(n_per_class, T, dim) + noise * torch.randn(n_per_class, T, dim, generator=g))
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def train_and_score(name, overrides, steps=120, lr=3e-3):
    xtr, ytr = order_only_data(64, seed=1)
    xte, yte = order_only_data(50, seed=2)
    model = build(name, overrides, input_dim=16, num_classes=3, stream_dims=(16,))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (32,), generator=g)
        loss = model.loss(xtr[idx], None, ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item()


def test_order_is_learned_by_ts_lstm_and_temporal_inception_but_not_by_max_pooling():
    chance = 1 / 3
    acc_ts = train_and_score("ts-lstm", {"hidden": "32"})
    acc_ti = train_and_score("temporal-inception", {"fc": "32", "dropout": "0"})
    acc_max = train_and_score("temporal-pool", {"segments": "1", "pool": "max"})
    assert acc_ts > 0.9, acc_ts
    assert acc_ti > 0.9, acc_ti
    # 150 test videos: at chance the accuracy has a standard deviation of about 0.04
    assert abs(acc_max - chance) < 0.15, acc_max
