"""The demo dataset: UCF101 layout, real decodable videos, determinism, and classes that need the evidence they claim."""

from __future__ import annotations

import cv2
import decord
import numpy as np
import pytest

from pipeline.datasets import load_manifest
from pipeline.demo_data import (
    BAD_VIDEO_FRAMES,
    CLASSES,
    EVIDENCE,
    render_video,
    write_bad_videos,
    write_demo_dataset,
)

SMALL = {"groups": 3, "clips": 2, "frames": 16, "size": (96, 72)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=0, **SMALL)


def _decode(path) -> np.ndarray:
    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy()  # [T, H, W, 3] RGB


def _cv2_count(path) -> int:
    cap, n = cv2.VideoCapture(str(path)), 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_layout_and_splits(demo):
    lists = demo / "ucfTrainTestlist"
    assert (lists / "classInd.txt").read_text().splitlines() == [f"{i} {c}" for i, c in enumerate(CLASSES, 1)]
    for n in (1, 2, 3):
        assert (lists / f"trainlist{n:02d}.txt").is_file() and (lists / f"testlist{n:02d}.txt").is_file()
    assert (demo / "TextureLeft" / "v_TextureLeft_g03_c02.avi").is_file()
    m = load_manifest(demo)
    assert m.source == "ucf101" and m.classes == CLASSES
    assert len(m.videos) == len(CLASSES) * 3 * 2
    assert sorted(m.splits) == [1, 2, 3]
    tested = []
    for n in (1, 2, 3):
        train, test = m.split(n)
        assert len(train) + len(test) == len(m.videos)
        assert not {v.group for v in train} & {v.group for v in test}  # splits hold out whole groups
        assert {m.classes[v.label] for v in test} == set(CLASSES)  # every class is tested
        tested += [v.id for v in test]
    assert sorted(tested) == [v.id for v in m.videos]  # each video is tested in exactly one split
    assert set(EVIDENCE.values()) == {"appearance", "motion", "order"}


def test_videos_decode_with_the_right_frame_count(demo):
    m = load_manifest(demo)
    for v in m.videos:
        vr = decord.VideoReader(str(v.path))
        assert len(vr) == SMALL["frames"], v.id
        assert vr[0].shape == (72, 96, 3)
        assert vr.get_avg_fps() == pytest.approx(25.0)
    for v in m.videos[::7]:
        assert _cv2_count(v.path) == SMALL["frames"], v.id


def test_default_size_video(tmp_path):
    out = write_demo_dataset(tmp_path, classes=["BeachThenForest"], groups=3, clips=1)
    frames = _decode(out / "BeachThenForest" / "v_BeachThenForest_g02_c01.avi")
    assert frames.shape == (48, 120, 160, 3)
    assert len(load_manifest(out).videos) == 3


def test_same_seed_same_bytes(tmp_path, demo):
    small = dict(SMALL, groups=3, clips=1, classes=["StripeDrift", "TextureUp", "ForestThenBeach"])
    a = write_demo_dataset(tmp_path / "a", seed=0, **small)
    b = write_demo_dataset(tmp_path / "b", seed=0, **small)
    c = write_demo_dataset(tmp_path / "c", seed=1, **small)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 3 * 3 + 7 + 1  # videos, list files, demo.json
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # a video does not depend on which others are written
    assert (a / "TextureUp/v_TextureUp_g02_c01.avi").read_bytes() == (
        demo / "TextureUp/v_TextureUp_g02_c01.avi"
    ).read_bytes()
    assert (a / "TextureUp/v_TextureUp_g02_c01.avi").read_bytes() != (
        c / "TextureUp/v_TextureUp_g02_c01.avi"
    ).read_bytes()


def test_second_call_writes_nothing(tmp_path):
    kw = dict(SMALL, groups=3, clips=1, classes=["CheckerDrift"])
    out = write_demo_dataset(tmp_path, **kw)
    video = out / "CheckerDrift" / "v_CheckerDrift_g01_c01.avi"
    stamp = video.stat().st_mtime_ns
    write_demo_dataset(tmp_path, **kw)
    assert video.stat().st_mtime_ns == stamp
    write_demo_dataset(tmp_path, **dict(kw, seed=5))  # other parameters: rewritten
    assert video.stat().st_mtime_ns != stamp


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def _same_multiset(a: np.ndarray, b: np.ndarray, tol: float = 1.0) -> bool:
    """Every frame of a matches a distinct frame of b within tol (mean absolute difference), and vice versa."""
    if len(a) != len(b):
        return False
    cost = np.array([[_mean_abs(x, y) for y in b] for x in a])
    used = set()
    for i in np.argsort(cost.min(1)):
        j = next((j for j in np.argsort(cost[i]) if j not in used), None)
        if j is None or cost[i, j] > tol:
            return False
        used.add(j)
    return True


@pytest.mark.parametrize("g, k", [(1, 1), (3, 2)])
def test_order_classes_hold_the_same_frames(demo, g, k):
    ab = _decode(demo / f"BeachThenForest/v_BeachThenForest_g{g:02d}_c{k:02d}.avi")
    ba = _decode(demo / f"ForestThenBeach/v_ForestThenBeach_g{g:02d}_c{k:02d}.avi")
    assert _same_multiset(ab, ba)  # a bag of frames cannot tell them apart ...
    assert _mean_abs(ab[0], ba[0]) > 20 and _mean_abs(ab[-1], ba[-1]) > 20  # ... but the order differs
    # the beach comes first in AB: bright sky at the top of the first frame, dark forest at the end
    assert ab[0, :10].mean() > ab[-1, :10].mean() + 40 and ba[-1, :10].mean() > ba[0, :10].mean() + 40


def _shift(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Image translation from frame a to frame b (dx, dy) by phase correlation."""
    ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float32)
    (dx, dy), _ = cv2.phaseCorrelate(ga, gb)
    return dx, dy


def test_motion_classes_share_frames_and_differ_in_direction(demo):
    for g, k in [(1, 1), (2, 2)]:
        vids = {
            c: _decode(demo / f"{c}/v_{c}_g{g:02d}_c{k:02d}.avi")
            for c in ("TextureLeft", "TextureRight", "TextureUp", "TextureDown")
        }
        # Right is Left played backwards and Down is Up backwards: the same frames, the same appearance
        assert np.abs(vids["TextureRight"].astype(int) - vids["TextureLeft"][::-1]).max() == 0
        assert np.abs(vids["TextureDown"].astype(int) - vids["TextureUp"][::-1]).max() == 0
        shifts = {c: np.median([_shift(v[t], v[t + 1]) for t in range(len(v) - 1)], axis=0) for c, v in vids.items()}
        speed = (1.5 * 96 / 160, 3.0 * 96 / 160)
        (lx, ly), (rx, ry) = shifts["TextureLeft"], shifts["TextureRight"]
        (ux, uy), (dx, dy) = shifts["TextureUp"], shifts["TextureDown"]
        assert -speed[1] - 0.3 < lx < -speed[0] + 0.3 and abs(ly) < 0.3, shifts  # content moves left
        assert speed[0] - 0.3 < rx < speed[1] + 0.3 and abs(ry) < 0.3, shifts
        assert -speed[1] - 0.3 < uy < -speed[0] + 0.3 and abs(ux) < 0.3, shifts  # content moves up
        assert speed[0] - 0.3 < dy < speed[1] + 0.3 and abs(dx) < 0.3, shifts


def _histogram(frames: np.ndarray) -> np.ndarray:
    h = np.histogramdd(frames.reshape(-1, 3) // 32, bins=8, range=[(0, 8)] * 3)[0].ravel()
    return h / h.sum()


def test_motion_classes_look_alike(demo):
    """Horizontal and vertical classes of one group pan over the same texture; another group's texture differs."""
    left1, up1, left2 = (
        _decode(demo / f"{c}/v_{c}_g{g:02d}_c01.avi")
        for c, g in (("TextureLeft", 1), ("TextureUp", 1), ("TextureLeft", 2))
    )
    assert left1.std() > 20 and up1.std() > 20  # textured, not flat
    same = np.abs(_histogram(left1) - _histogram(up1)).sum()
    other = np.abs(_histogram(left1) - _histogram(left2)).sum()
    assert same < 0.5 < other, (same, other)


def test_appearance_classes_differ_only_in_the_square():
    """CheckerDrift and StripeDrift of one (group, clip): same background, motion and noise; only the pattern differs."""
    a = render_video("CheckerDrift", 0, 2, 1, frames=24, size=(160, 120)).astype(np.int16)
    b = render_video("StripeDrift", 0, 2, 1, frames=24, size=(160, 120)).astype(np.int16)
    assert a.shape == b.shape == (24, 120, 160, 3)
    boxes = []
    for fa, fb in zip(a, b):
        ys, xs = np.nonzero(np.abs(fa - fb).max(-1))
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    boxes = np.array(boxes)
    sizes = boxes[:, 2:] - boxes[:, :2]
    assert (sizes <= 40).all() and (sizes.max(0) >= 28).all()  # the difference is confined to one square
    steps = np.linalg.norm(np.diff(boxes[:, :2], axis=0), axis=1)
    assert 1.0 < np.median(steps) < 3.5  # which drifts (px/frame)
    x0, y0, x1, y1 = boxes[0]
    s = min(x1 - x0, y1 - y0)
    ta, tb = a[0, y0 : y0 + s, x0 : x0 + s], b[0, y0 : y0 + s, x0 : x0 + s]
    # diagonal stripes are constant along anti-diagonals, a checkerboard is not
    stripes, checker = (float(np.abs(t[1:, :-1] - t[:-1, 1:]).mean()) for t in (tb, ta))
    assert stripes < 4 and checker > 15, (stripes, checker)


def test_render_and_write_reject_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown demo class"):
        render_video("Nope", 0, 1, 1)
    with pytest.raises(ValueError, match="groups >= 3"):
        write_demo_dataset(tmp_path, groups=2)
    with pytest.raises(ValueError, match="at least"):
        write_demo_dataset(tmp_path, size=(16, 16))
    with pytest.raises(ValueError, match="unknown demo classes"):
        write_demo_dataset(tmp_path, classes=["Nope"])


def test_bad_videos(tmp_path):
    paths = write_bad_videos(tmp_path / "Bad")
    assert set(paths) == {"good", "zero_byte", "not_video", "truncated", "one_frame", "odd_size", "grayscale"}
    assert paths["zero_byte"].stat().st_size == 0
    assert paths["not_video"].read_text().startswith("this is a text file")
    for kind, n in BAD_VIDEO_FRAMES.items():
        assert len(decord.VideoReader(str(paths[kind]))) == n, kind
        assert _cv2_count(paths[kind]) == n, kind
    assert decord.VideoReader(str(paths["odd_size"]))[0].shape == (17, 33, 3)
    gray = _decode(paths["grayscale"]).astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 2 and gray.std() > 10  # one channel, real content
    for kind in ("zero_byte", "not_video"):
        with pytest.raises((RuntimeError, decord.DECORDError)):
            decord.VideoReader(str(paths[kind]))
    assert _cv2_count(paths["truncated"]) < 30  # the tail is gone
    # as a dataset: one class folder, every file listed
    m = load_manifest(tmp_path)
    assert m.source == "folders" and m.classes == ["Bad"] and len(m.videos) == 7
