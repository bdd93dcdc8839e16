"""Heads of Ng et al. (feature pooling, deep LSTM) and Karpathy et al. (time fusion over clips), and pipeline.clips."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import pipeline.heads  # noqa: F401  (registers every head)
from pipeline.clips import average_clip_scores, eval_clip_starts, expand_network, gather_clips, random_clip_starts
from pipeline.errors import UserError
from pipeline.heads.deep_lstm import aggregate_steps, gain_weights
from pipeline.heads.ng_pooling import num_windows, window_max
from pipeline.registry import HEADS

torch.set_num_threads(1)

D, C = 12, 5
KARPATHY_SMALL = {"tower_dims": (8, 8, 8), "fc_dim": 16}
SMALL = {
    "conv-pool": {"hidden": 16, "grid": 2},  # D = 3 channels x 2 x 2
    "late-pool": {"hidden": 16},
    "slow-pool": {"hidden": 16},
    "local-pool": {"hidden": 16},
    "time-conv": {"hidden": 16, "kernels": 6, "grid": 2},
    "deep-lstm": {"hidden": 8, "layers": 2},
    "single-frame": KARPATHY_SMALL,
    "early-fusion": KARPATHY_SMALL,
    "late-fusion": KARPATHY_SMALL,
    "slow-fusion": KARPATHY_SMALL,
}


def build(name: str, input_dim: int = D, num_classes: int = C, **overrides):
    torch.manual_seed(0)
    cfg = HEADS.make_config(name, {**SMALL[name], **overrides})
    return HEADS.get(name).builder(cfg, input_dim, num_classes, (input_dim,))


# ----------------------------------------------------------------------------------------------------------------
# every head: shapes, masks, T shorter than a window and not a multiple of it


def test_all_heads_registered():
    assert set(SMALL) <= set(HEADS.names())


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("T", [3, 13, 30])  # shorter than a window, not a multiple of it, a multiple of it
def test_shapes_and_padding_never_changes_the_output(name, T):
    head = build(name).eval()
    g = torch.Generator().manual_seed(T)
    x = torch.randn(3, T, D, generator=g)
    lengths = torch.tensor([T, max(T - 4, 1), 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    with torch.no_grad():
        y = head(x, mask)
        assert y.shape == (3, C) and torch.isfinite(y).all()
        # more padding, filled with garbage, changes nothing
        xp = torch.cat([x, torch.randn(3, 7, D, generator=g)], 1)
        mp = torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], 1)
        xp = xp.masked_fill(~mp[:, :, None], 1e4)
        torch.testing.assert_close(head(xp, mp), y, rtol=1e-5, atol=1e-5)
        # each padded video scores as it does alone and unpadded
        for b in range(3):
            torch.testing.assert_close(head(x[b : b + 1, : lengths[b]]), y[b : b + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_train_mode_loss_backward(name):
    head = build(name).train()
    x, y = torch.randn(4, 13, D), torch.tensor([0, 1, 2, 3])
    mask = torch.ones(4, 13, dtype=torch.bool)
    mask[2, 9:] = False
    loss = head.loss(x, mask, y)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_bad_configs_are_user_errors():
    with pytest.raises(UserError):
        HEADS.make_config("slow-pool", {"stride": "11"})  # stride > window leaves frames out
    with pytest.raises(UserError):
        HEADS.make_config("deep-lstm", {"aggregate": "mean"})
    with pytest.raises(UserError):
        HEADS.make_config("slow-fusion", {"clip_frames": "5"})  # 5 -> 1 after extent 4: extent 2 no longer fits
    with pytest.raises(UserError):
        build("conv-pool", input_dim=10, grid=2)  # 10 is not C x 2 x 2


def test_train_defaults_follow_the_papers():
    ng = HEADS.get("late-pool").config_cls.train_defaults
    assert ng == {"optimizer": "sgd", "lr": 1e-5, "momentum": 0.9, "weight_decay": 5e-4, "frames": 30}
    assert HEADS.get("deep-lstm").config_cls.train_defaults["lr"] == pytest.approx(30e-5)  # N x 1e-5, N = 30
    kp = HEADS.get("slow-fusion").config_cls.train_defaults
    assert kp == {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 32, "frames": 0}
    cfg = HEADS.make_config("deep-lstm")
    assert (cfg.layers, cfg.hidden, cfg.aggregate, cfg.gain) == (5, 512, "weighted", "linear")


# ----------------------------------------------------------------------------------------------------------------
# parameter counts derived from the papers' text (UCF101: 101 classes)

UCF101 = 101
GOOGLENET = 1000  # Ng Sec. 3.1: FC layers "on top of the 1000D output" of GoogLeNet's average pooling layer


def _paper_head(name, input_dim, **overrides):
    cfg = HEADS.make_config(name, overrides)
    return HEADS.get(name).builder(cfg, input_dim, UCF101, (input_dim,))


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fc(i: int, o: int) -> int:
    return i * o + o


def _lstm_eq_3_to_7(i: int, h: int) -> int:
    """One layer of Ng Eq. 3-7: W_x{i,f,c,o} [h, i], W_h{i,f,c,o} [h, h], b_{i,f,c,o} [h], and the diagonal
    peepholes W_ci, W_cf, W_co (one weight per cell)."""
    return 4 * (h * i + h * h + h) + 3 * h


def test_param_counts_of_ng_heads_follow_the_text():
    # "two fully connected layers of size 4096 with ReLU activations on top of the 1000D output but before softmax"
    top = _fc(GOOGLENET, 4096) + _fc(4096, 4096) + _fc(4096, UCF101)
    assert _n(_paper_head("conv-pool", GOOGLENET, grid=1)) == top
    assert _n(_paper_head("late-pool", GOOGLENET)) == top  # the same layers, before the max instead of after
    # Slow Pooling: "each max-pooling layer is then followed by a fully-connected layer" (two stages of 4096)
    assert _n(_paper_head("slow-pool", GOOGLENET)) == top
    # Local Pooling: two shared FC layers, then "a larger softmax layer connected to all towers": 30 frames,
    # windows of 10 every 5 -> towers at 0, 5, 10, 15, 20
    towers = len(range(0, 30 - 10 + 1, 5))
    assert _n(_paper_head("local-pool", GOOGLENET)) == _fc(GOOGLENET, 4096) + _fc(4096, 4096) + _fc(towers * 4096, UCF101)
    # Time-Domain Convolution: "256 kernels of size 3 x 3 across 10 frames" over a C-channel conv map
    channels, grid = 32, 3
    conv = _paper_head("time-conv", channels * grid * grid, grid=grid).conv
    assert _n(conv) == 256 * channels * 10 * 3 * 3 + 256


def test_param_count_of_the_deep_lstm_follows_eq_3_to_7():
    # Sec. 3.2: "five stacked LSTM layers, each with 512 memory cells", then a softmax shared across time steps
    want = _lstm_eq_3_to_7(GOOGLENET, 512) + 4 * _lstm_eq_3_to_7(512, 512) + _fc(512, UCF101)
    assert _n(_paper_head("deep-lstm", GOOGLENET)) == want


# ----------------------------------------------------------------------------------------------------------------
# Ng et al. pooling: window arithmetic


def test_num_windows_known_values():
    L = torch.tensor([1, 3, 10, 11, 12, 15, 16, 30, 120])
    assert num_windows(L, 10, 5).tolist() == [1, 1, 1, 2, 2, 2, 3, 5, 23]


def test_window_max_hand_made():
    x = torch.arange(13.0).view(1, 13, 1)  # frame t holds t
    y, wm = window_max(x, None, 10, 5)  # windows [0,10) and [5,13): the tail is a partial window
    assert y.flatten().tolist() == [9.0, 12.0] and wm.tolist() == [[True, True]]
    mask = torch.arange(13)[None] < 11
    y, wm = window_max(x, mask, 10, 5)  # 11 valid frames: [0,10), [5,11)
    assert y.flatten().tolist() == [9.0, 10.0] and wm.tolist() == [[True, True]]
    mask = torch.arange(13)[None] < 4
    y, wm = window_max(x, mask, 10, 5)  # shorter than a window: one partial window, the other is padding
    assert y.flatten().tolist() == [3.0, 0.0] and wm.tolist() == [[True, False]]


def test_local_pool_softmax_sees_all_towers():
    assert build("local-pool", frames=30).classifier.in_features == 5 * 16
    assert build("local-pool", frames=120).classifier.in_features == 23 * 16
    assert build("local-pool", frames=1).classifier.in_features == 16


def test_time_conv_window_arithmetic():
    head = build("time-conv").eval()
    assert tuple(head.conv.weight.shape) == (6, 3, 10, 3, 3)  # 6 kernels, 3 channels, 10 frames, 3 x 3
    seen = []
    head.conv.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        for T in (3, 13, 30):
            head(torch.randn(1, T, D))
    assert [s[2] for s in seen] == [1, 2, 5]  # windows over time
    # a frame only reaches the windows that contain it: frame 12 of 13 is only in window [5, 13)
    x = torch.randn(1, 13, D, requires_grad=True)
    y = torch.nn.functional.relu(head.conv(x.view(1, 13, 3, 2, 2).permute(0, 2, 1, 3, 4)))
    y[:, :, 0].sum().backward()
    assert x.grad[0, 10:].abs().sum() == 0 and x.grad[0, :10].abs().sum() > 0


def test_conv_pool_keeps_the_spatial_layout():
    head = build("conv-pool").eval()
    x = torch.zeros(1, 4, D)
    x[0, 1, 5] = 2.0  # channel 1, cell (0, 1) in frame 1
    x[0, 3, 0] = 1.0  # channel 0, cell (0, 0) in frame 3
    pooled = None

    def grab(module, inputs, output):
        nonlocal pooled
        pooled = inputs[0]

    head.fc.register_forward_hook(grab)
    with torch.no_grad():
        head(x)
    expected = torch.zeros(1, D)
    expected[0, 5], expected[0, 0] = 2.0, 1.0
    torch.testing.assert_close(pooled, expected)  # max over time, per channel and grid cell


# ----------------------------------------------------------------------------------------------------------------
# Ng et al. deep LSTM: gain and the four aggregations


def test_gain_weights():
    L = torch.tensor([4, 1, 3])
    torch.testing.assert_close(
        gain_weights(L, 5, "linear"), torch.tensor([[0, 1 / 3, 2 / 3, 1, 0], [1, 0, 0, 0, 0], [0, 0.5, 1, 0, 0]])
    )
    assert gain_weights(L, 5, "last").tolist() == [[0, 0, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0]]
    assert gain_weights(L, 5, "uniform").tolist() == [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]


P = torch.tensor(
    [
        [0.04, 0.90, 0.03, 0.03],  # a spike for class 1 at the first step (gain 0)
        [0.05, 0.05, 0.60, 0.30],
        [0.05, 0.05, 0.85, 0.05],
        [0.05, 0.05, 0.05, 0.85],
    ]
)  # the last step says class 3


@pytest.mark.parametrize(
    "how, expected, winner",
    [
        ("last", [0.05, 0.05, 0.05, 0.85], 3),
        ("max", [0.05, 0.90, 0.85, 0.85], 1),
        ("sum", [0.19 / 4, 1.05 / 4, 1.53 / 4, 1.23 / 4], 2),  # sum / T: same arg-max as the sum
        (
            "weighted",
            [
                (0.05 / 3 + 0.1 / 3 + 0.05) / 2,
                (0.05 / 3 + 0.1 / 3 + 0.05) / 2,
                (0.6 / 3 + 1.7 / 3 + 0.05) / 2,
                (0.3 / 3 + 0.1 / 3 + 0.85) / 2,
            ],
            3,
        ),  # g = 0, 1/3, 2/3, 1
    ],
)
def test_aggregations_on_a_hand_made_sequence(how, expected, winner):
    logits = P.log()[None]  # softmax(log p) = p
    out = aggregate_steps(logits, None, how)
    torch.testing.assert_close(out.exp()[0], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert out.argmax(1).item() == winner
    # padded steps (any content) change nothing
    padded = torch.cat([logits, torch.full((1, 3, 4), 50.0)], 1)
    mask = torch.arange(7)[None] < 4
    torch.testing.assert_close(aggregate_steps(padded, mask, how), out)


def test_deep_lstm_loss_is_the_gain_weighted_per_frame_cross_entropy():
    head = build("deep-lstm")
    x, y = torch.randn(2, 5, D), torch.tensor([1, 3])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    logp = head.step_logits(x, mask).log_softmax(-1)
    ce0 = -logp[0, :, 1]
    ce1 = -logp[1, :3, 3]
    v0 = (ce0 * torch.tensor([0, 0.25, 0.5, 0.75, 1.0])).sum() / 2.5
    v1 = (ce1 * torch.tensor([0, 0.5, 1.0])).sum() / 1.5
    torch.testing.assert_close(head.loss(x, mask, y), (v0 + v1) / 2)
    assert head.scores_steps and head.step_logits(x, mask).shape == (2, 5, C)


def test_deep_lstm_peephole_cell_follows_eq_3_to_7():
    head = build("deep-lstm", layers=1, hidden=3)
    cell = head.lstm[0]
    with torch.no_grad():
        cell.peep.copy_(torch.randn(3, 3))
    x = torch.randn(1, 2, D)
    h, c = torch.zeros(3), torch.zeros(3)
    Wx, bx, Wh = cell.x2g.weight, cell.x2g.bias, cell.h2g.weight
    for t in range(2):
        gi, gf, gc, go = (Wx @ x[0, t] + bx + Wh @ h).chunk(4)
        i = torch.sigmoid(gi + cell.peep[0] * c)
        f = torch.sigmoid(gf + cell.peep[1] * c)
        c = f * c + i * torch.tanh(gc)
        o = torch.sigmoid(go + cell.peep[2] * c)
        h = o * torch.tanh(c)
    torch.testing.assert_close(cell(x)[0, -1], h)


def test_deep_lstm_without_peepholes_uses_torch_lstm():
    head = build("deep-lstm", peepholes=False).eval()
    assert isinstance(head.lstm, torch.nn.LSTM) and head.lstm.num_layers == 2
    assert head(torch.randn(2, 6, D)).shape == (2, C)


# ----------------------------------------------------------------------------------------------------------------
# clips: sampling, gathering, averaging


def test_eval_clip_sampling_is_deterministic_under_a_seed():
    L = torch.tensor([50, 12, 200])
    a, ma = eval_clip_starts(L, 10, 20, seed=3)
    b, _ = eval_clip_starts(L, 10, 20, seed=3)
    c, _ = eval_clip_starts(L, 10, 20, seed=4)
    assert a.shape == (3, 20) and ma.all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= 0).all() and (a <= (L - 10)[:, None]).all()
    # a video's clips depend on its length and the seed only, not on its batch
    alone, _ = eval_clip_starts(L[2:], 10, 20, seed=3)
    assert torch.equal(alone[0], a[2])
    # dense: every position
    d, md = eval_clip_starts(torch.tensor([12, 10, 4]), 10, 0)
    assert md.sum(1).tolist() == [3, 1, 1] and d[0].tolist() == [0, 1, 2]


def test_random_training_clips_stay_inside_the_video():
    L = torch.tensor([16, 40, 5])
    g = torch.Generator().manual_seed(0)
    s = torch.cat([random_clip_starts(L, 16, g) for _ in range(200)], 1)  # [3,200]
    assert s[0].eq(0).all() and s[2].eq(0).all()
    assert s[1].min() == 0 and s[1].max() == 24  # every start in [0, 40 - 16] can come out
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(random_clip_starts(L, 10, g1), random_clip_starts(L, 10, g2))


def test_gather_clips_reads_offsets_and_repeats_short_videos_from_the_start():
    x = torch.arange(20.0).view(1, 20, 1).repeat(2, 1, 1)  # frame t holds t
    L = torch.tensor([20, 6])
    clips = gather_clips(x, L, torch.tensor([[2, 4], [0, 1]]), (0, 15))
    assert clips[..., 0].tolist() == [[[2, 17], [4, 19]], [[0, 3], [1, 4]]]  # 15 mod 6 = 3, 16 mod 6 = 4


def test_average_clip_scores():
    logits = torch.tensor([[[0.2, 0.8], [0.6, 0.4], [0.9, 0.1]]]).log()
    torch.testing.assert_close(average_clip_scores(logits).exp(), torch.tensor([[1.7 / 3, 1.3 / 3]]))
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(average_clip_scores(logits, mask).exp(), torch.tensor([[0.4, 0.6]]))
    torch.testing.assert_close(average_clip_scores(logits, mask, "logit"), logits[:, :2].mean(1))


# ----------------------------------------------------------------------------------------------------------------
# Karpathy et al. fusion: temporal connectivity, clips, transfer


def _frames_reached(head, offsets_len: int, T: int) -> list[int]:
    """Frames of a T-frame video whose features reach the scores of clip 0 (eval, start 0 when T = span)."""
    x = torch.randn(1, T, D, requires_grad=True)
    logits, _ = head.clip_logits(x)
    logits[0, 0].sum().backward()
    return x.grad[0].abs().sum(1).nonzero().flatten().tolist()


def test_karpathy_temporal_connectivity():
    slow = build("slow-fusion").eval()
    assert slow.steps == [10, 4, 2, 1]  # "4 responses in time", then 2, then 1
    convs = [m for m in slow.tower if isinstance(m, torch.nn.Conv1d)]
    assert [(m.kernel_size[0], m.stride[0]) for m in convs] == [(4, 2), (2, 2), (2, 2)]
    assert _frames_reached(slow, 10, 10) == list(range(10))

    early = build("early-fusion").eval()
    convs = [m for m in early.tower if isinstance(m, torch.nn.Conv1d)]
    assert [m.kernel_size[0] for m in convs] == [10, 1, 1] and early.steps == [10, 1, 1, 1]

    late = build("late-fusion").eval()
    assert late.span == 16 and late.steps == [2, 2, 2, 2] and late.fc1[1].in_features == 2 * 8
    assert _frames_reached(late, 2, 16) == [0, 15]  # two frames 15 apart, merged at the first FC

    single = build("single-frame").eval()
    assert single.span == 1 and _frames_reached(single, 1, 1) == [0]


def test_karpathy_forward_averages_clip_scores():
    head = build("slow-fusion", num_clips=20, clip_seed=5).eval()
    x = torch.randn(2, 40, D)
    with torch.no_grad():
        logits, cmask = head.clip_logits(x)
        assert logits.shape == (2, 20, C)
        torch.testing.assert_close(head(x), average_clip_scores(logits, cmask))
        torch.testing.assert_close(head(x), head(x))  # evaluation is deterministic
    head.train()
    assert head(x).shape == (2, C) and head.clip_logits(x)[0].shape == (2, 1, C)


@pytest.mark.parametrize(
    "finetune, trained",
    [
        ("all", {"tower", "fc1", "fc2", "classifier"}),
        ("top3", {"fc1", "fc2", "classifier"}),
        ("top", {"classifier"}),
    ],
)
def test_transfer_learning_freezes_all_but_the_top(finetune, trained):
    head = build("slow-fusion", finetune=finetune, dropout=0.9)
    assert {n.split(".")[0] for n, p in head.named_parameters() if p.requires_grad} == trained
    drops = [head.fc1[0].p, head.fc2[0].p, head.classifier[0].p]
    assert drops == {"all": [0.0, 0.9, 0.9], "top3": [0.9, 0.9, 0.9], "top": [0.0, 0.0, 0.9]}[finetune]
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.1)
    head.train()
    head.loss(torch.randn(4, 12, D), None, torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    for n, p in head.named_parameters():
        assert torch.equal(p, before[n]) == (n.split(".")[0] not in trained), n


# ----------------------------------------------------------------------------------------------------------------
# Ng et al. Sec. 3.3: network expansion 1 -> 30 -> 120 frames


def test_network_expansion_transfers_exactly_the_loaded_weights():
    one = build("late-pool")
    with torch.no_grad():
        for p in one.parameters():
            p.add_(torch.randn_like(p))  # "trained" weights, different from any fresh init
    thirty = build("late-pool")
    how = expand_network(one.state_dict(), thirty)
    assert set(how.values()) == {"copied"}
    for name, value in one.state_dict().items():
        assert torch.equal(thirty.state_dict()[name], value), name
    one.eval(), thirty.eval()
    frame = torch.randn(1, 1, D)
    with torch.no_grad():  # max over 30 copies of a frame is that frame: the 30-frame model starts where 1 was
        torch.testing.assert_close(thirty(frame.repeat(1, 30, 1)), one(frame))


def test_network_expansion_of_local_pooling_grows_the_softmax():
    small = build("local-pool", frames=30)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn_like(p))
    large = build("local-pool", frames=120)
    how = expand_network(small.state_dict(), large)
    assert how["classifier.weight"] == "extended" and how["classifier.bias"] == "copied"
    w_small, w_large = small.classifier.weight, large.classifier.weight  # [C, 5*16] -> [C, 23*16]
    assert torch.equal(w_large[:, : 5 * 16], w_small) and w_large[:, 5 * 16 :].eq(0).all()
    for name, value in small.state_dict().items():
        if name != "classifier.weight":
            assert torch.equal(large.state_dict()[name], value), name
    small.eval(), large.eval()
    x = torch.randn(2, 120, D)
    with torch.no_grad():  # the first 5 towers see the same frames in both models
        torch.testing.assert_close(large(x), small(x[:, :30]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        expand_network(small.state_dict(), build("local-pool", input_dim=D + 4))


# ----------------------------------------------------------------------------------------------------------------
# learning: classes that differ only in the order of the same frames


def _order_only(n_per: int, seed: int, dim: int = 8, seg: int = 4, noise: float = 0.3):
    """Six classes = the six orders of three fixed frame vectors, each held for ``seg`` frames, plus noise."""
    protos = torch.randn(3, dim, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c, order in enumerate(itertools.permutations(range(3))):
        seq = protos[list(order)].repeat_interleave(seg, 0)  # [3*seg, dim]
        xs.append(seq[None] + noise * torch.randn(n_per, 3 * seg, dim, generator=g))
        ys += [c] * n_per
    return torch.cat(xs), torch.tensor(ys)


def _fit_and_score(name: str, overrides: dict, steps: int = 100) -> float:
    xtr, ytr = _order_only(40, 0)
    xte, yte = _order_only(20, 1)
    torch.manual_seed(0)
    head = HEADS.get(name).builder(HEADS.make_config(name, overrides), 8, 6, (8,))
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    head.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (64,))
        loss = head.loss(xtr[idx], None, ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        return (head(xte).argmax(1) == yte).float().mean().item()


def test_order_only_classes_need_order():
    chance = 1 / 6
    lstm = _fit_and_score("deep-lstm", {"hidden": 16, "layers": 2})
    slow = _fit_and_score("slow-fusion", {"tower_dims": (16, 16, 16), "fc_dim": 32, "dropout": 0.0})
    late = _fit_and_score("late-pool", {"hidden": 32, "dropout": 0.0})
    assert lstm > 0.8 and slow > 0.8, (lstm, slow)
    assert late < chance + 0.15, late  # max over time sees the same set of frames in every class


def test_clip_heads_read_stored_views():
    """``views=V``: training reads one random view per video, evaluation averages clips over every view."""
    import torch

    from pipeline.registry import HEADS

    torch.manual_seed(0)
    entry = HEADS.get("single-frame")
    cfg = HEADS.make_config("single-frame", {"views": "2", "tower_dims": "8,8,8", "fc_dim": "8", "num_clips": "3"})
    head = entry.builder(cfg, 2 * 5, 4, (10,)).eval()
    x = torch.randn(2, 6, 2, 5)  # [B,T,V,D]
    logits, cmask = head.clip_logits(x.reshape(2, 6, 10))
    assert logits.shape == (2, 6, 4) and cmask.all()  # V * num_clips clips per video
    one = entry.builder(HEADS.make_config("single-frame", {"tower_dims": "8,8,8", "fc_dim": "8", "num_clips": "3"}),
                        5, 4, (5,)).eval()
    one.load_state_dict(head.state_dict())
    for v in range(2):  # each view's clips are the clips of that view alone
        alone, _ = one.clip_logits(x[:, :, v])
        torch.testing.assert_close(logits[:, 3 * v:3 * v + 3], alone)
    head.train()
    assert head(x.reshape(2, 6, 10)).shape == (2, 4)
    with pytest.raises(UserError, match="views"):
        entry.builder(cfg, 11, 4, (11,))


# ----------------------------------------------------------------------------------------------------------------
# through the stage: what the store holds against what a head reads (frames, rate, views, transfer)

FRAMES_25 = {"mode": "frames", "frames": 25, "fps": None, "max_frames": 120}
ALL_FRAMES = {"mode": "all", "frames": None, "fps": None, "max_frames": 120}
FPS_1 = {"mode": "fps", "frames": None, "fps": 1.0, "max_frames": 120}


def _stage_job(root, store, tmp_path, head, *sets, **kw):
    import stages.train as st

    return st.TrainJob(store=str(store), dataset=str(root), head=head, streams=kw.pop("streams", ("rgb",)),
                       overrides=tuple(tuple(s.split("=", 1)) for s in sets), out=str(tmp_path / "runs"), **kw)


def _train(job):
    import stages.train as st

    return st.train(job, progress=False, echo=lambda _: None)


@pytest.fixture(scope="module")
def store_25(tmp_path_factory):
    """A store of 25 equally spaced frames per video (`extract --frames 25`, the default)."""
    from tests.synthetic import write_ucf_store

    return write_ucf_store(tmp_path_factory.mktemp("s25"), ["Alpha", "Beta", "Gamma"], groups=4, T=25,
                           config={"sampling": FRAMES_25})


def test_ng_heads_refuse_more_frames_than_the_store_holds(store_25, tmp_path):
    """Ng's 30-frame models on a 25-frame store would see 5 duplicated frames in every video."""
    from tests.synthetic import data_warnings

    root, store = store_25
    with pytest.raises(UserError, match=r"reads 30 frames per video but the store holds 25 .*--set frames=25"):
        _train(_stage_job(root, store, tmp_path, "late-pool", "hidden=8"))
    with pytest.raises(UserError, match="reads 30 frames"):
        _train(_stage_job(root, store, tmp_path, "deep-lstm", "hidden=8", "layers=1"))
    m = _train(_stage_job(root, store, tmp_path, "late-pool", "hidden=8", "epochs=1", "frames=25")).metrics
    assert data_warnings(m) == [("late-pool follows a paper that sampled 1 / 6 / 30 frames per second; the store holds "
                              "25 equally spaced frames per video")]
    # local-pool sizes its softmax by `frames` too: the refusal's advice sets both, and the head has 4 towers, not 5
    with pytest.raises(UserError, match="reads 30 frames"):
        _train(_stage_job(root, store, tmp_path, "local-pool", "hidden=8"))
    run = _train(_stage_job(root, store, tmp_path, "local-pool", "hidden=8", "epochs=1", "frames=25"))
    config = json.loads((run.path / "config.json").read_text())
    assert config["head_config"]["frames"] == config["train"]["frames"] == 25


def test_karpathy_clips_refuse_a_sparse_store_unless_told(store_25, tmp_path):
    """10 of 25 equally spaced frames span 40% of a video, not the paper's third of a second."""
    from tests.synthetic import data_warnings

    root, store = store_25
    small = ("epochs=1", "fc_dim=8", "tower_dims=8,8,8", "num_clips=2")
    with pytest.raises(UserError, match=r"clips of 10 consecutive frames .* --all-frames"):
        _train(_stage_job(root, store, tmp_path, "slow-fusion", *small))
    with pytest.raises(UserError, match="clips of 16 consecutive frames"):
        _train(_stage_job(root, store, tmp_path, "late-fusion", *small))
    m = _train(_stage_job(root, store, tmp_path, "slow-fusion", *small, "any_rate=true")).metrics
    assert len(data_warnings(m)) == 1 and "clips of 10 stored frames" in data_warnings(m)[0]
    assert data_warnings(_train(_stage_job(root, store, tmp_path, "single-frame", *small)).metrics) == []  # 1 frame


def test_check_frames_cases():
    from pipeline.features import check_frames

    slow = HEADS.make_config("slow-fusion", {})
    assert check_frames(ALL_FRAMES, 0, [40, 90], "slow-fusion", slow) == []  # the paper's clips
    assert check_frames({**FPS_1, "fps": 25.0}, 0, [40], "slow-fusion", slow) == ["clips of 10 frames at 25 fps span 0.40 s"]
    with pytest.raises(UserError):
        check_frames(FPS_1, 0, [40], "slow-fusion", slow)  # 10 s clips
    lstm = HEADS.make_config("deep-lstm", {})
    assert check_frames(FPS_1, 30, [45, 12, 30, 7], "deep-lstm", lstm) == [
        "2 of 4 videos have fewer than 30 stored frames; their frames were repeated to make 30"]
    with pytest.raises(UserError, match="holds 20"):  # padded to 20 per video: every video would repeat
        check_frames({**FPS_1, "frames": 20}, 30, [20, 20], "deep-lstm", lstm)
    assert check_frames({**FPS_1, "frames": 120}, 30, [120], "deep-lstm", lstm) == []
    assert check_frames({**FPS_1, "fps": 6.0, "frames": 30}, 30, [30], "deep-lstm", lstm) == []  # UCF-101, Table 6
    assert "sampled 1 / 6 / 30 frames per second" in check_frames({**FPS_1, "fps": 2.0}, 30, [30], "x", lstm)[0]
    ts = HEADS.make_config("ts-lstm", {})  # Ma et al.: 25 of any store with at least 25
    assert check_frames(ALL_FRAMES, 25, [30, 200], "ts-lstm", ts) == []
    with pytest.raises(UserError, match="reads 25 frames per video but the store holds 10"):
        check_frames({**FRAMES_25, "frames": 10}, 25, [10], "ts-lstm", ts)


def test_transfer_needs_a_source_run(store_25, tmp_path):
    """Karpathy 4.2 retrains the top of a trained network: without --init-from the frozen layers are random."""
    root, store = store_25
    small = ("fc_dim=8", "tower_dims=8,8,8", "num_clips=2")
    for ft in ("top", "top3"):
        with pytest.raises(UserError, match="--init-from"):
            _train(_stage_job(root, store, tmp_path, "single-frame", *small, f"finetune={ft}", "epochs=1"))
    source = _train(_stage_job(root, store, tmp_path, "single-frame", *small, "epochs=1"))
    top = _train(_stage_job(root, store, tmp_path, "single-frame", *small, "finetune=top", "epochs=2",
                            init_from=str(source.path)))
    from safetensors.torch import load_file

    a, b = load_file(str(source.path / "weights.safetensors")), load_file(str(top.path / "weights.safetensors"))
    for k in a:  # the frozen layers are the source's, only the classifier moved
        assert torch.equal(a[k], b[k]) == (not k.startswith("classifier")), k


def test_transfer_to_other_classes_keeps_a_fresh_classifier():
    source = build("slow-fusion", num_classes=7)
    target = build("slow-fusion", num_classes=C)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    how = expand_network(source.state_dict(), target)
    assert how["classifier.1.weight"] == how["classifier.1.bias"] == "fresh"
    for k, v in target.state_dict().items():
        assert torch.equal(v, fresh[k] if k.startswith("classifier") else source.state_dict()[k]), k
    with pytest.raises(ValueError):  # any other layer must fit
        expand_network(build("slow-fusion", input_dim=D + 2).state_dict(), build("slow-fusion"))


def test_views_are_averaged_as_scores_only_on_stored_views(store_25, tmp_path):
    """`views=V` splits a frame into V views: on an averaged stream that would cut features into fake views."""
    from pipeline.backbones import view_record

    root, store = store_25
    small = ("fc_dim=8", "tower_dims=8,8,8", "num_clips=2", "epochs=1")
    with pytest.raises(UserError, match="needs a stream of stored views"):  # rgb has 6 dims: 2 "views" of 3
        _train(_stage_job(root, store, tmp_path, "single-frame", *small, "views=2"))
    m = _train(_stage_job(root, store, tmp_path, "single-frame", *small)).metrics
    assert m["test_views"] == {"tta": "center", "views": 1, "averaged": "none"}

    ten = {"tta": "10crop", "keep_views": True}
    assert view_record(ten, ["rgb_views"], 10) == {"tta": "10crop", "views": 10, "averaged": "scores"}
    assert view_record(ten, ["rgb", "flow"], None) == {"tta": "10crop", "views": 10, "averaged": "features"}
    assert view_record(ten, ["rgb"], 1)["averaged"] == "features"
    assert view_record({}, ["rgb"], None) == {"tta": "center", "views": 1, "averaged": "none"}
    with pytest.raises(UserError, match="needs a stream of stored views"):
        view_record(ten, ["rgb"], 10)
    with pytest.raises(UserError, match="--set views=10"):
        view_record(ten, ["rgb_views"], 1)
    with pytest.raises(UserError, match="alone"):
        view_record(ten, ["rgb_views", "flow_views"], 10)
    with pytest.raises(UserError, match="only heads with a views key"):
        view_record(ten, ["rgb_views"], None)
