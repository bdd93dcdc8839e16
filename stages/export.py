"""A model you can hand over: a run (or a fused run and its inputs) as one self-contained folder.

``export_model(RUN, OUT)`` writes::

    OUT/model.json          format, which run is the model, classes, the store configs its features need
                            (backbone spec, sampling, flow method / parameters / bound / L, test-time views) and,
                            per stream CNN, its file in cnn/ with sha256, or the hash and origin of weights
                            that ship with a package (the default backbone's embedded ImageNet weights)
    OUT/runs/NAME/          each run's config.json, extraction.json, metrics.json, head weights
                            (weights.safetensors; a fusion's few numbers in weights.npz, no pickle) and COMPLETE
    OUT/cnn/KEY-STREAM.safetensors   the stream CNNs as loaded (fine-tuned or random weights; a .pth is re-saved
                            as safetensors), keys exactly as the backbone holds them
    OUT/README.md           a card: what it classifies, metrics on its test split, training data fingerprints,
                            how the features are made, how to run it

``pipeline.predictor.Predictor.load(OUT)`` and ``twostream predict OUT VIDEO`` read it without the store or the runs
folder it came from.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.predictor import EMBEDDED_ORIGIN, MODEL_FILE, MODEL_FORMAT, FusionModel, Predictor

__all__ = ["export_model"]

RUN_FILES = ("config.json", "extraction.json", "metrics.json", "weights.safetensors", "weights.npz", "COMPLETE")


def _copy_run(model, dest: Path) -> None:
    d = dest / model.path.name
    d.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (model.path / name).is_file():
            shutil.copy2(model.path / name, d / name)
    if not (d / "extraction.json").is_file() and getattr(model, "record", None):  # made from --store
        (d / "extraction.json").write_text(json.dumps(model.record, indent=2, sort_keys=True) + "\n")
    if isinstance(model, FusionModel):
        for c in model.components:
            _copy_run(c, dest)


def _is_embedded(path: str) -> bool:
    from pipeline.backbones import embedded_weights_path

    try:
        return Path(path).resolve() == Path(embedded_weights_path()).resolve()
    except UserError:
        return False


def export_model(run: str | Path, out: str | Path, weights=(), store: str | None = None,
                 copy_embedded: bool = False) -> Path:
    """Export ``run`` (a run or fused run directory) to the folder ``out`` (created; must be empty or absent)."""
    from safetensors.torch import save_file

    from pipeline import __version__
    from pipeline.store import file_sha256

    pred = Predictor.load(run, weights=weights, device="cpu", store=store)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; export into a new folder")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "runs").mkdir(parents=True)
        _copy_run(pred.model, tmp / "runs")
        cnn: dict[str, dict] = {}
        for key, cfg in pred.extractions.items():
            needed = pred.needed_streams(key)
            for s in pred.streams(key):
                if s.name not in needed:
                    continue
                spec = cfg["backbones"][s.name]
                source = pred.weights_for(key, s.name, spec)
                rec = {"backbone": spec["name"], "source_weights": spec.get("weights"),
                       "source_sha256": spec.get("weights_sha256"), "file": None, "sha256": None}
                if source != "random" and _is_embedded(source) and not copy_embedded:
                    rec["origin"] = EMBEDDED_ORIGIN
                else:
                    (tmp / "cnn").mkdir(exist_ok=True)
                    rel = f"cnn/{key}-{s.name}.safetensors"
                    state = {k: v.detach().cpu().contiguous() for k, v in s.backbone.net.model.state_dict().items()}
                    save_file(state, str(tmp / rel))
                    rec.update(file=rel, sha256=file_sha256(tmp / rel),
                               origin="random initialisation (seed 0)" if source == "random" else
                               f"the weights file {Path(source).name} as the backbone loaded it")
                cnn[f"{key}/{s.name}"] = rec
        meta = {"format": MODEL_FORMAT, "version": 1, "model": pred.model.path.name, "classes": pred.classes,
                "kind": "score-fusion" if isinstance(pred.model, FusionModel) else "head",
                "extractions": pred.extractions, "cnn": cnn, "package_version": __version__,
                "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": str(Path(run).resolve())}
        (tmp / MODEL_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(pred, meta))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _describe_extraction(cfg: dict) -> list[str]:
    from pipeline.features import describe_sampling

    lines = [(f"- sampling: {describe_sampling(cfg['sampling'])}; test-time views: {cfg.get('tta', 'center')}; "
             f"decoder: {cfg.get('decoder')}")]
    for s in cfg["streams"]:
        b = cfg["backbones"][s]
        lines.append(f"- {s} CNN: {b['name']} ({b['in_chans']} input channels, {b['input_size']} px, "
                     f"{b['feature_dim']}-d), weights {b['weights']} (sha256 {str(b.get('weights_sha256'))[:16]})")
    if "flow" in cfg:
        f = cfg["flow"]
        params = ", ".join(f"{k}={v}" for k, v in f["params"].items()) or "defaults"
        lines.append(f"- optical flow: {f['method']} ({params}), clipped at +-{f['bound']:g}, stacks of L = "
                     f"{f['stack']} fields")
    return lines


def model_card(pred: Predictor, meta: dict) -> str:
    """README.md of an exported model."""
    m = pred.model
    met = m.metrics or {}
    heads = pred.heads()

    def pct(key):
        v = met.get(key)
        return f"{100 * v:.2f}%" if isinstance(v, float) else "n/a"

    lines = [f"# {m.path.name}", "",
             (f"A {'score fusion of ' + str(len(heads)) + ' heads' if meta['kind'] == 'score-fusion' else heads[0].head + ' head'}"
             f" classifying {len(pred.classes)} actions from per-frame CNN features of "
             f"{' + '.join(dict.fromkeys(s for h in heads for s in h.streams))}."), "",
             "## Metrics (test split of the run)", "",
             (f"accuracy {pct('accuracy')}, hit@5 {pct('hit@5')}, mAP {pct('map')} on {met.get('n_test', '?')} test "
             f"videos of split {met.get('split', '?')}."), "",
             "## Training data", ""]
    for h in heads:
        c = h.config
        lines.append(f"- {h.name}: {h.head} on {'+'.join(h.streams)}, split {c.get('split')}, store fingerprint "
                     f"{c.get('store_fingerprint')}, dataset fingerprint {c.get('manifest_fingerprint')}")
    lines += ["", "## Features", ""]
    for key, cfg in pred.extractions.items():
        lines.append(f"Store config {key}:")
        lines += _describe_extraction(cfg)
    lines += ["", "Stream CNN weights:", ""]
    for k, rec in meta["cnn"].items():
        where = rec["file"] or f"not copied: {rec['origin']}"
        lines.append(f"- {k}: {rec['source_weights']} (sha256 {str(rec['source_sha256'])[:16]}): {where}")
    lines += ["", "## Classes", "", ", ".join(pred.classes), "", "## Use", "", "```",
              "twostream predict . VIDEO [--top 5] [--timeline]", "```", "", "```python",
              "from pipeline.predictor import Predictor", "scores = Predictor.load('.').predict('video.avi')  # [C]",
              "```", ""]
    return "\n".join(lines)
