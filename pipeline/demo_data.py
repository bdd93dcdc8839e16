"""The demo dataset: small synthetic videos in the UCF101 layout whose classes each need one kind of evidence.

``write_demo_dataset(DIR)`` writes ``DIR/<Class>/v_<Class>_gGG_cCC.avi`` (Motion-JPEG AVI, 160x120, 48 frames at
25 fps by default) and ``DIR/ucfTrainTestlist/`` with ``classInd.txt``, ``trainlist01..03.txt`` and
``testlist01..03.txt``. As in UCF101 (Soomro et al. 2012, the benchmark of the two-stream papers), clips of
one group share their scene (background, texture, colours), and the three splits hold out disjoint thirds of the
groups, so no scene is seen in both train and test of a split.

The eight classes (``CLASSES``, with the evidence each needs in ``EVIDENCE``):

=================  ==========  ==================================================================================
class              evidence    what it shows
=================  ==========  ==================================================================================
CheckerDrift       appearance  a checkerboard square drifting in a random direction, bouncing off the borders
StripeDrift        appearance  CheckerDrift's video of the same group and clip, with diagonal stripes instead
TextureLeft        motion      the group's random blob texture filling the frame, moving left (a camera panning right)
TextureRight       motion      the TextureLeft video of the same group and clip played backwards
TextureUp          motion      the same group texture (other crops) moving up
TextureDown        motion      the TextureUp video of the same group and clip played backwards
BeachThenForest    order       a beach scene (sky, sea, sand, sun) then a forest scene (trunks), each panning
ForestThenBeach    order       the same two segments as BeachThenForest (same group and clip) in the other order
=================  ==========  ==================================================================================

So a single frame tells the appearance classes apart (a spatial stream suffices; the two classes' motion is
identical); the four motion classes show one texture per group (Left/Right and Up/Down even have exactly the same
frames, reversed) and need optical flow or temporal order; the two order classes contain exactly the same frames,
so any bag of frames (Ng et al. 2015 feature pooling, Sec. 3.1) is at chance on them (a bag of flow fields nearly
so: only the one flow field across the cut differs) and a model of temporal order (an LSTM, Ng et al. Sec. 3.2;
TS-LSTM, Ma et al. Sec. 3.2) is needed to separate them.

Per-video variation (position, speed, direction, colours, texture, segment lengths, pixel noise) comes from a
numpy RNG seeded by ``(seed, class family, group, clip)``: the same seed gives byte-identical files (with the same
numpy and OpenCV builds), and a video does not depend on how many others are written. The writer is OpenCV's built-in MJPEG encoder (no ffmpeg build
differences), which encodes each frame independently, so identical frames decode to identical pixels.

``write_bad_videos(DIR)`` writes broken and unusual files for the robustness tests of extraction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

__all__ = ["BAD_VIDEO_FRAMES", "CLASSES", "EVIDENCE", "render_video", "write_bad_videos", "write_demo_dataset",
           "write_sequence"]

EVIDENCE = {
    "CheckerDrift": "appearance",
    "StripeDrift": "appearance",
    "TextureLeft": "motion",
    "TextureRight": "motion",
    "TextureUp": "motion",
    "TextureDown": "motion",
    "BeachThenForest": "order",
    "ForestThenBeach": "order",
}
CLASSES = list(EVIDENCE)  # classInd order
_FAMILY = {  # class -> (RNG family, variant): classes of one family share every random draw of a (group, clip)
    "CheckerDrift": (1, "checker"),
    "StripeDrift": (1, "stripes"),
    "TextureLeft": (2, "forward"),
    "TextureRight": (2, "reverse"),
    "TextureUp": (3, "forward"),
    "TextureDown": (3, "reverse"),
    "BeachThenForest": (4, "AB"),
    "ForestThenBeach": (4, "BA"),
}
_SCENE = {1: 1, 2: 2, 3: 2, 4: 4}  # family -> group-scene RNG: all four texture classes share a group's texture
_PALETTE = np.array(  # RGB; drawn per video for every textured object, whatever its class
    [
        [230, 60, 50],
        [245, 200, 40],
        [60, 170, 80],
        [40, 110, 220],
        [170, 70, 200],
        [240, 140, 30],
        [30, 190, 200],
        [250, 250, 245],
        [35, 35, 40],
    ],
    dtype=np.float32,
)
_NOISE_SIGMA = 2.0  # per-pixel sensor noise, so no two frames are identical and flow has texture to match
_SPEED = (1.5, 3.0)  # px per frame at 160x120, scaled with the frame width
_MARKER = "demo.json"


# ---------------------------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically. -> [h, w] float32"""
    ch, cw = max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w))
    coarse = rng.random((ch, cw), dtype=np.float32)
    return np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A muted vertical gradient with soft blotches. -> [h, w, 3] float32"""
    top, bottom = rng.uniform(50, 190, 3), rng.uniform(50, 190, 3)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]  # [h, 1, 1]
    img = top * (1 - ramp) + bottom * ramp  # [h, 1, 3]
    img = np.ascontiguousarray(np.broadcast_to(img, (h, w, 3)), dtype=np.float32)
    return img + 40 * (_smooth_noise(rng, h, w, 6)[..., None] - 0.5)


def _colour_ramp(values: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] through a piecewise-linear ramp of K colours. [h, w] -> [h, w, 3]"""
    x = np.clip(values, 0, 1) * (len(colours) - 1)
    i = np.minimum(x.astype(np.int64), len(colours) - 2)
    f = (x - i)[..., None]
    return colours[i] * (1 - f) + colours[i + 1] * f


def _crop(canvas: np.ndarray, x: float, y: float, w: int, h: int) -> np.ndarray:
    """A w x h window with its top-left corner at (x, y), bilinear at sub-pixel offsets. -> [h, w, 3]"""
    return cv2.getRectSubPix(canvas, (w, h), (x + (w - 1) / 2, y + (h - 1) / 2))


def _drift(rng, n, w, h, s, speed):
    """Top-left corners of an s x s square moving in a random direction, bouncing off the frame borders."""
    pos = np.array([rng.uniform(0, w - s), rng.uniform(0, h - s)])
    angle = rng.uniform(0, 2 * np.pi)
    vel = speed * np.array([np.cos(angle), np.sin(angle)])
    out = []
    for _ in range(n):
        out.append(pos.copy())
        pos += vel
        for k, hi in ((0, w - s), (1, h - s)):
            if pos[k] < 0 or pos[k] > hi:
                vel[k] = -vel[k]
                pos[k] = np.clip(pos[k], 0, hi)
    return out


def _appearance_clip(group_rng, clip_rng, variant, n, w, h):
    """CheckerDrift / StripeDrift: one textured square, same size, colour and motion distributions."""
    bg = _background(group_rng, h, w)
    s = int(clip_rng.integers(h // 4, h // 3 + 1))
    ci = clip_rng.choice(len(_PALETTE), size=2, replace=False)
    c0, c1 = _PALETTE[ci[0]], _PALETTE[ci[1]]
    cell = max(2, round(clip_rng.uniform(0.18, 0.26) * s))
    yy, xx = np.mgrid[0:s, 0:s]
    if variant == "checker":
        mask = ((xx // cell + yy // cell) % 2).astype(bool)
    else:
        mask = (((xx + yy) // cell) % 2).astype(bool)
    tile = np.where(mask[..., None], c0, c1).astype(np.float32)  # [s, s, 3]
    speed = clip_rng.uniform(*_SPEED) * w / 160
    frames = []
    for x, y in _drift(clip_rng, n, w, h, s, speed):
        img = bg.copy()
        xi, yi = round(x), round(y)
        img[yi : yi + s, xi : xi + s] = tile
        frames.append(img)
    return frames


def _motion_clip(group_rng, clip_rng, n, w, h, axis):
    """TextureLeft/Up (forward): a blob texture seen through a window moving right/down, so content moves left/up."""
    travel = int(np.ceil(_SPEED[1] * w / 160 * n)) + 2
    ch, cw = h + travel, w + travel  # the group's canvas is large enough for any clip's path
    base = 0.65 * _smooth_noise(group_rng, ch, cw, 10) + 0.35 * _smooth_noise(group_rng, ch, cw, 40)
    colours = _PALETTE[group_rng.choice(len(_PALETTE), size=3, replace=False)]
    canvas = _colour_ramp((base - base.min()) / (np.ptp(base) + 1e-6), colours).astype(np.float32)
    speed = clip_rng.uniform(*_SPEED) * w / 160
    span = speed * (n - 1)
    start = clip_rng.uniform(0, travel - 1 - span)  # along the motion axis
    across = clip_rng.uniform(0, travel - 1)
    frames = []
    for t in range(n):
        along = start + speed * t
        x, y = (along, across) if axis == "x" else (across, along)
        frames.append(_crop(canvas, x, y, w, h))
    return frames


def _beach(rng, h, w):
    horizon = int(h * rng.uniform(0.4, 0.5))
    shore = horizon + int(h * rng.uniform(0.12, 0.2))
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]  # [h, 1, 1]
    sky = np.array([70, 140, 225]) + rng.uniform(-15, 15, 3)
    img = np.ascontiguousarray(np.broadcast_to(sky * (1 - 0.6 * ramp) + 0.6 * ramp * 240, (h, w, 3)), dtype=np.float32)
    sea = np.array([25, 105, 150]) + rng.uniform(-15, 15, 3)
    waves = 18 * np.sin(np.arange(shore - horizon, dtype=np.float32) * rng.uniform(0.8, 1.4))[:, None, None]
    img[horizon:shore] = sea + waves
    sand = np.array([222, 196, 140]) + rng.uniform(-15, 15, 3)
    img[shore:] = sand + 30 * (_smooth_noise(rng, h - shore, w, 12)[..., None] - 0.5)
    r = max(2, int(h * rng.uniform(0.07, 0.1)))
    cx, cy = int(rng.uniform(r, w - r)), int(horizon * rng.uniform(0.3, 0.7))
    cv2.circle(img, (cx, cy), r, (255, 228, 110), -1)
    return img


def _forest(rng, h, w):
    ground = int(h * rng.uniform(0.75, 0.85))
    leaf = np.array([35, 95, 40]) + rng.uniform(-12, 12, 3)
    img = np.ascontiguousarray(np.broadcast_to(leaf, (h, w, 3)), dtype=np.float32) + 60 * (
        _smooth_noise(rng, h, w, 14)[..., None] - 0.5
    )
    img[ground:] = np.array([75, 55, 35]) + rng.uniform(-10, 10, 3)
    trunk = np.array([95, 62, 36]) + rng.uniform(-10, 10, 3)
    for _ in range(int(rng.integers(w // 24, w // 12 + 2))):
        x, tw = int(rng.uniform(0, w)), max(1, int(rng.uniform(0.025, 0.06) * w))
        img[int(h * rng.uniform(0, 0.2)) : ground + 2, x : x + tw] = trunk
    return img


def _order_clip(group_rng, clip_rng, variant, n, w, h):
    """BeachThenForest (AB) / ForestThenBeach (BA): two panning segments, the same frames in either order."""
    travel = int(np.ceil(1.5 * w / 160 * n)) + 2
    beach = _beach(group_rng, h, w + travel)  # a group shares its two scenes, clips differ in pan and cut
    forest = _forest(group_rng, h, w + travel)
    n_a = int(clip_rng.integers(max(1, 2 * n // 5), min(n - 1, 3 * n // 5) + 1))
    n_b = n - n_a
    pan = clip_rng.uniform(0.5, 1.5) * w / 160
    x_a, x_b = clip_rng.uniform(0, travel - 1 - pan * n, 2)
    beach_frames = [_crop(beach, x_a + pan * t, 0, w, h) for t in range(n_a)]
    forest_frames = [_crop(forest, x_b + pan * (n_b - t), 0, w, h) for t in range(n_b)]  # pans the other way
    return beach_frames + forest_frames, n_a


def render_video(cls: str, seed: int, group: int, clip: int, frames: int = 48, size: tuple[int, int] = (160, 120)):
    """RGB uint8 frames ``[frames, h, w, 3]`` of one demo video; ``size`` is (width, height)."""
    if cls not in _FAMILY:
        raise ValueError(f"unknown demo class {cls!r}; classes: {', '.join(CLASSES)}")
    w, h = size
    family, variant = _FAMILY[cls]
    group_rng = np.random.default_rng([seed, _SCENE[family], group])
    clip_rng = np.random.default_rng([seed, family, group, clip])
    if family == 1:
        seq = _appearance_clip(group_rng, clip_rng, variant, frames, w, h)
    elif family in (2, 3):
        seq = _motion_clip(group_rng, clip_rng, frames, w, h, "x" if family == 2 else "y")
    else:
        seq, n_a = _order_clip(group_rng, clip_rng, variant, frames, w, h)
    noise_rng = np.random.default_rng([seed, family, group, clip, 1])  # drawn per frame, so it travels with it
    out = np.stack([np.clip(f + noise_rng.normal(0, _NOISE_SIGMA, f.shape), 0, 255) for f in seq])  # [T, h, w, 3]
    out = np.round(out).astype(np.uint8)
    if variant == "reverse":
        out = out[::-1]
    elif variant == "BA":
        out = np.concatenate([out[n_a:], out[:n_a]])
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------------------------- files


def _write_avi(path: Path, frames: np.ndarray, fps: float, quality: int = 85) -> None:
    """Write Motion-JPEG AVI atomically with OpenCV's own encoder. frames: [T, h, w, 3] RGB or [T, h, w] gray."""
    color = frames.ndim == 4
    h, w = frames.shape[1:3]
    tmp = path.with_name(f".{path.stem}.partial.avi")  # hidden, so a crash leaves nothing a manifest picks up
    for q in (quality, 75, 60):  # OpenCV's encoder can fail an assertion on some gray content at high quality
        writer = cv2.VideoWriter(str(tmp), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h), color)
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write {tmp}")
        writer.set(cv2.VIDEOWRITER_PROP_QUALITY, q)
        try:
            for f in frames:
                writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR) if color else f)
        except cv2.error:
            continue
        finally:
            writer.release()
        os.replace(tmp, path)
        return
    tmp.unlink(missing_ok=True)
    raise OSError(f"OpenCV's MJPEG encoder failed on {path}")


def write_sequence(path: str | os.PathLike, classes: list[str], seed: int = 0, group: int = 1, frames: int = 48,
                   size: tuple[int, int] = (160, 120), fps: float = 25.0) -> Path:
    """One video of several actions in a row: a demo clip of each class in ``classes`` (``frames`` each, same
    ``group``), concatenated, so that where each action happens is known (``frames / fps`` seconds apiece)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clips = [render_video(c, seed, group, 1, frames, size) for c in classes]  # [frames, h, w, 3] each
    _write_avi(path, np.concatenate(clips), fps)
    return path


def _split_of_group(group: int, groups: int) -> int:
    """The split (1..3) whose test set holds this group: three contiguous thirds, as UCF101's g01-07 / g08-14 / g15-21."""
    return 1 + (group - 1) * 3 // groups


def write_demo_dataset(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    groups: int = 6,
    clips: int = 2,
    frames: int = 48,
    size: tuple[int, int] = (160, 120),
    fps: float = 25.0,
    classes: list[str] | None = None,
) -> Path:
    """Write the demo dataset (module docstring) to ``out_dir`` and return it.

    ``groups`` x ``clips`` videos per class (default 6 x 2 = 12, 96 videos in all); ``size`` is (width, height).
    A second call with the same arguments finds ``demo.json`` and the files in place and writes nothing.
    """
    out = Path(out_dir)
    classes = list(CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in EVIDENCE]
    if unknown:
        raise ValueError(f"unknown demo classes {unknown}; choose from {', '.join(CLASSES)}")
    if groups < 3 or clips < 1 or frames < 2:
        raise ValueError("need groups >= 3 (three splits by group), clips >= 1 and frames >= 2")
    if size[0] < 32 or size[1] < 24:
        raise ValueError(f"size (width, height) must be at least (32, 24), got {tuple(size)}")
    params = {
        "seed": seed,
        "groups": groups,
        "clips": clips,
        "frames": frames,
        "size": list(size),
        "fps": fps,
        "classes": classes,
        "format": 1,
    }
    names = {
        c: [f"{c}/v_{c}_g{g:02d}_c{k:02d}.avi" for g in range(1, groups + 1) for k in range(1, clips + 1)]
        for c in classes
    }
    marker = out / _MARKER
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = None
        if done == params and all((out / n).is_file() for ns in names.values() for n in ns):
            return out
        marker.unlink()  # rewriting: an interrupted rewrite must not look complete

    for c in classes:
        (out / c).mkdir(parents=True, exist_ok=True)
        for g in range(1, groups + 1):
            for k in range(1, clips + 1):
                _write_avi(out / f"{c}/v_{c}_g{g:02d}_c{k:02d}.avi", render_video(c, seed, g, k, frames, size), fps)

    lists = out / "ucfTrainTestlist"
    lists.mkdir(exist_ok=True)
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    for split in (1, 2, 3):
        train, test = [], []
        for i, c in enumerate(classes, 1):
            for name in names[c]:
                group = int(name.rsplit("_g", 1)[1][:2])
                (test if _split_of_group(group, groups) == split else train).append((name, i))
        (lists / f"trainlist{split:02d}.txt").write_text("".join(f"{n} {i}\n" for n, i in train))
        (lists / f"testlist{split:02d}.txt").write_text("".join(f"{n}\n" for n, _ in test))
    marker.write_text(json.dumps(params, indent=1) + "\n")
    return out


BAD_VIDEO_FRAMES = {"good": 16, "one_frame": 1, "odd_size": 10, "grayscale": 10}  # decodable ones, true frame counts


def write_bad_videos(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Broken and unusual files for extraction's robustness tests; returns kind -> path.

    ``good`` (64x48, 16 frames), ``zero_byte`` (empty .avi), ``not_video`` (text named .avi), ``truncated``
    (a 30-frame video cut to 40% of its bytes: the index is gone and the last frame is cut in half),
    ``one_frame`` (1 frame), ``odd_size`` (33x17, 10 frames), ``grayscale`` (single-channel MJPEG, 10 frames).
    Pass ``ROOT/<Class>`` to get them as a one-class folder-per-class dataset.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "good": out / "good.avi",
        "zero_byte": out / "zero_byte.avi",
        "not_video": out / "not_video.avi",
        "truncated": out / "truncated.avi",
        "one_frame": out / "one_frame.avi",
        "odd_size": out / "odd_size_33x17.avi",
        "grayscale": out / "grayscale.avi",
    }
    _write_avi(paths["good"], render_video("CheckerDrift", 7, 1, 1, BAD_VIDEO_FRAMES["good"], (64, 48)), 25)
    paths["zero_byte"].write_bytes(b"")
    paths["not_video"].write_text("this is a text file with a video extension\n")
    _write_avi(paths["truncated"], render_video("TextureLeft", 7, 1, 1, 30, (64, 48)), 25)
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: int(len(data) * 0.4)])
    _write_avi(paths["one_frame"], render_video("StripeDrift", 7, 1, 1, 1, (64, 48)), 25)
    _write_avi(paths["odd_size"], render_video("TextureUp", 7, 1, 1, 10, (33, 17)), 25)
    gray = render_video("BeachThenForest", 7, 1, 1, 10, (64, 48)).mean(axis=-1).round().astype(np.uint8)  # [T, h, w]
    _write_avi(paths["grayscale"], gray, 25)
    return paths
