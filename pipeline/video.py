"""Video decoding: decord on the CPU by default, PyAV as the fallback, torchcodec (NVDEC) on CUDA.

Every backend returns RGB uint8 frames ``[N, H, W, 3]`` and the true number of decoded frames: a container's
header count is never trusted (truncated files and variable frame rates make it wrong), so the count is what
the decoder actually produced. Decoding is sequential: seeking is slow and inexact in most containers.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

BACKENDS = ("auto", "decord", "pyav", "torchcodec")
# Above this many bytes of decoded frames, only the sampled frames are kept (two passes over the file).
MAX_DECODED_BYTES = 1 << 30


class DecodeError(RuntimeError):
    """A video that cannot be decoded (empty, not a video, no frames)."""


@dataclass
class Decoded:
    frames: np.ndarray        # [N, H, W, 3] uint8, RGB, the frames asked for (all when indices is None)
    n_frames: int             # true count of decodable frames in the file
    fps: float
    backend: str


def available_backends() -> list[str]:
    return [b for b in ("decord", "pyav", "torchcodec") if importlib.util.find_spec(_MODULE[b]) is not None]


_MODULE = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec"}


def choose_backend(requested: str = "auto", device: str = "cpu", available: list[str] | None = None) -> str:
    """The decoder for ``device``: torchcodec on CUDA when installed, else decord, else PyAV."""
    available = available_backends() if available is None else available
    if requested not in BACKENDS:
        raise UserError(f"unknown decoder {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        if requested not in available:
            raise UserError(f"decoder {requested!r} is not installed (pip install {_MODULE[requested]})")
        return requested
    if str(device).startswith("cuda") and "torchcodec" in available:
        return "torchcodec"
    for b in ("decord", "pyav"):
        if b in available:
            return b
    raise UserError("no video decoder installed: pip install decord or av")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DecodeError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise DecodeError("empty file (0 bytes)")


def _to_rgb(frames: np.ndarray) -> np.ndarray:
    if frames.ndim == 3:  # grayscale decoders
        frames = frames[..., None]
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3])


def _decode_pyav(path: Path, indices: np.ndarray | None) -> Decoded:
    import av

    try:
        container = av.open(str(path))
    except Exception as e:  # noqa: BLE001 - av raises many error classes for non-videos
        raise DecodeError(f"not a readable video ({type(e).__name__}: {e})") from None
    with container:
        if not container.streams.video:
            raise DecodeError("file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        wanted = None if indices is None else {int(i) for i in indices}
        kept: dict[int, np.ndarray] = {}
        n = 0
        try:
            for frame in container.decode(stream):
                if wanted is None or n in wanted:
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
        except av.error.FFmpegError:
            pass  # a truncated tail: keep the frames decoded so far
    if n == 0:
        raise DecodeError("no decodable frames")
    if indices is None:
        return Decoded(np.stack([kept[i] for i in range(n)]), n, fps, "pyav")
    return Decoded(np.stack([kept[int(i)] for i in indices]), n, fps, "pyav")


def _decode_decord(path: Path, indices: np.ndarray | None) -> Decoded:
    import decord

    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # noqa: BLE001 - decord raises its own DECORDError and others
        raise DecodeError(f"not a readable video ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    n = len(vr)
    if n == 0:
        raise DecodeError("no decodable frames")
    fps = float(vr.get_avg_fps() or 0) or 25.0
    # decord's count comes from the packet index; decoding every frame verifies it (a truncated file raises).
    frames = vr.get_batch(list(range(n))).asnumpy() if indices is None else vr.get_batch(list(indices)).asnumpy()
    return Decoded(_to_rgb(frames), n, fps, "decord")


def _decode_torchcodec(path: Path, indices: np.ndarray | None, device: str) -> Decoded:
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(str(path), device=device, seek_mode="exact")  # exact: counts frames by scanning
    n = int(dec.metadata.num_frames)
    if n == 0:
        raise DecodeError("no decodable frames")
    fps = float(dec.metadata.average_fps or 25.0)
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    batch = dec.get_frames_at(indices=idx).data  # [N, 3, H, W] uint8 on device
    return Decoded(batch.permute(0, 2, 3, 1).cpu().numpy(), n, fps, "torchcodec")


def decode(path: str | Path, backend: str = "decord", indices: np.ndarray | None = None,
           device: str = "cpu") -> Decoded:
    """Decode ``path`` (all frames, or only ``indices``). Falls back from decord to PyAV when decord fails,
    since PyAV decodes what a truncated file still holds."""
    path = Path(path)
    _check_file(path)
    if backend == "torchcodec":
        return _decode_torchcodec(path, indices, device)
    if backend == "decord":
        try:
            return _decode_decord(path, indices)
        except Exception as first:  # noqa: BLE001 - any decord failure: try the sequential decoder
            try:
                return _decode_pyav(path, indices)
            except DecodeError:
                raise DecodeError(str(first)) from None
    return _decode_pyav(path, indices)


def count_frames(path: str | Path, backend: str = "decord", device: str = "cpu") -> tuple[int, float, tuple[int, int]]:
    """(true frame count, fps, (H, W)) without keeping frames; used for long videos."""
    d = decode(path, backend, indices=np.array([0]), device=device)
    return d.n_frames, d.fps, d.frames.shape[1:3]


def decode_for_sampling(path: str | Path, backend: str, device: str = "cpu") -> Decoded:
    """All frames when they fit in ``MAX_DECODED_BYTES``; otherwise only the first frame plus the true count,
    and the caller decodes the sampled indices in a second pass."""
    n, fps, (h, w) = count_frames(path, backend, device) if _too_big(path) else (0, 0.0, (0, 0))
    if n and n * h * w * 3 > MAX_DECODED_BYTES:
        return Decoded(np.empty((0, h, w, 3), np.uint8), n, fps, backend)
    return decode(path, backend, None, device)


def _too_big(path: str | Path) -> bool:
    # Compressed size is a cheap proxy: a file under 20 MB decodes to well under MAX_DECODED_BYTES at the
    # resolutions of UCF101/HMDB51; larger files are counted first.
    return Path(path).stat().st_size > 20 * (1 << 20)
