"""bench/gpu.py, the one-command GPU benchmark of stage one, runs on the CPU at tiny sizes: every section gives its
rows (rates where a backend exists, a reason where not), the flow rows are accurate against the known warp, and the
JSON and the Markdown table hold the same rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick",
                           "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


def _rows(report: dict, stage: str, variant: str | None = None) -> list[dict]:
    return [r for r in report["rows"] if r["stage"] == stage and (variant is None or r["variant"] == variant)]


def test_cpu_quick_run_measures_every_section(tmp_path):
    report, md = _run(tmp_path, "--no-compile")
    assert {"machine", "goals", "settings", "rows", "wall_s"} <= set(report)
    assert report["machine"]["device"] == "cpu" and report["goals"] == {"tvl1_pairs_s": 1000.0, "e2e_videos_s": 5.0}

    decode = _rows(report, "decode")
    assert {r["setting"] for r in decode} == {"mjpeg", "mpeg4", "h264"}
    for r in decode:  # a rate, or one line saying why not (torchcodec / NVDEC here)
        assert (r["rate"] or 0) > 0 or r["note"].startswith("not available: "), r
    assert all(r["rate"] > 0 for r in decode if r["variant"] == "decord (CPU)")
    nvdec = [r for r in decode if "NVDEC" in r["variant"]]
    assert len(nvdec) == 3 and all(r["rate"] is None and r["note"].startswith("not available") for r in nvdec)

    tv = _rows(report, "TV-L1", "eager")
    assert [r["batch"] for r in tv] == [1, 2]
    for r in tv:  # pairs warped by a known field: speed is reported with its accuracy
        assert r["rate"] > 0 and r["epe_px"] < 0.3 and r["peak_mib"] > 0, r
    assert _rows(report, "TV-L1", "torch.compile")[0]["note"] == "skipped: --no-compile"
    assert [r["batch"] for r in _rows(report, "Brox", "eager") if r["rate"] > 0 and r["epe_px"] < 0.3] == [1, 2]
    ref = _rows(report, "TV-L1", "OpenCV DualTVL1 (CPU, reference)")[0]
    assert ref["ours_vs_ref_px"] < 0.1 and abs(ref["ours_epe_px"] - ref["epe_px"]) < 0.05, ref
    (cpu,) = [r for r in report["rows"] if r["variant"].startswith("ours on the CPU")]
    assert cpu["ours_vs_ref_px"] < 0.01 and cpu["rate"] > 0, cpu  # the device's flow is extraction's CPU flow

    cnn = _rows(report, "CNN")
    assert {r["variant"].split()[0] for r in cnn} == {"rgb", "flow"} and all(r["rate"] > 0 for r in cnn)
    assert all("fp32" in r["setting"] for r in cnn)  # bf16 autocast only on CUDA
    assert all(r["device_input_rate"] > 0 for r in cnn)  # the CNN alone, its input already on the device

    (e2e,) = _rows(report, "end to end")
    assert e2e["videos"] == 2 and e2e["failed"] == 0 and e2e["rate"] > 0, e2e
    assert set(e2e["seconds_per_video"]) >= {"decode", "flow", "cnn"}
    goals = _rows(report, "goal")
    assert len(goals) == 2 and all(r["note"].startswith("not judged") for r in goals)  # a CPU run judges nothing

    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| stage | variant | setting | rate |") and lines[2].startswith("| machine |")
    assert len(lines) == 3 + len(report["rows"])
    assert lines[3].startswith("| decode | decord (CPU) | mjpeg |")


def test_unknown_section_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--sections", "nvlink"],
                          cwd=ROOT, capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "unknown section(s) nvlink; choose from decode, flow, cnn, e2e"]


@pytest.mark.slow
def test_compiled_tvl1_rows_match_eager_accuracy(tmp_path):
    report, _ = _run(tmp_path, "--sections", "flow", "--flow-batches", "1,2")
    eager, compiled = _rows(report, "TV-L1", "eager"), _rows(report, "TV-L1", "torch.compile")
    assert [r["batch"] for r in compiled] == [1, 2] and all(r["rate"] > 0 for r in compiled), compiled
    for e, c in zip(eager, compiled):
        assert abs(e["epe_px"] - c["epe_px"]) < 0.01, (e, c)


def _gpu_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failed_batch_and_a_spent_budget_are_rows_saying_so():
    import numpy as np
    import torch

    gpu = _gpu_module()
    pairs = (np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8), np.zeros((2, 2, 8, 8), np.float32))

    def flow(p, q):  # zero flow (the truth here) until the batch is too big, as a GPU out of memory
        if len(p) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(len(p), 2, *p.shape[-2:])

    rows = gpu.flow_sweep("TV-L1", "eager", flow, pairs, torch.device("cpu"), [1, 2, 4], gpu.Budget(60), 0.0, (8, 8))
    assert rows[0]["rate"] > 0 and rows[0]["epe_px"] == 0.0
    assert rows[1]["rate"] is None and rows[1]["note"] == "failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows[2]["note"] == "skipped: a smaller batch failed"
    spent = gpu.flow_sweep("Brox", "eager", flow, pairs, torch.device("cpu"), [1], gpu.Budget(-1), 0.0, (8, 8))
    assert spent[0]["rate"] is None and spent[0]["note"].startswith("skipped: the section's time budget")
    assert gpu.out_paths(gpu.argparse.Namespace(out="r/gpu.md", json=None, md=None)) == (Path("r/gpu.json"),
                                                                                         Path("r/gpu.md"))


def test_end_to_end_falls_back_to_the_cpu_decoder_when_torchcodec_refuses_the_clips(tmp_path, monkeypatch):
    """On CUDA the auto decoder is torchcodec (NVDEC); where it cannot decode the clips the row is still measured, on
    the CPU decoder, and says so. Here torchcodec is not installed but chosen, as a broken NVDEC build would be."""
    import torch

    import stages.extract as stage
    from pipeline import video

    gpu = _gpu_module()
    real_choose, real_extract, runs = video.choose_backend, stage.extract, []

    def choose(requested="auto", device="cpu", available=None):  # torchcodec until the first run has failed
        return "torchcodec" if requested == "auto" and not runs else real_choose(requested, device, available)

    def extract(*args, **kwargs):
        out = real_extract(*args, **kwargs)
        runs.append((args[2].decoder, out.failed))
        return out

    monkeypatch.setattr(video, "choose_backend", choose)
    monkeypatch.setattr(stage, "extract", extract)
    frames = gpu.ucf_frames(tmp_path, 0.5)
    (r,) = gpu.bench_e2e(frames, tmp_path, torch.device("cpu"), "mpeg4", (32, 24), 1, 1, "auto", gpu.Budget(60))
    assert runs == [("auto", 1), ("decord", 0), ("decord", 0)], runs  # the failed warm-up, its retry, the timed run
    assert r["videos"] == 1 and r["failed"] == 0 and r["rate"] > 0, r
    assert r["note"].startswith("auto decoder failed (No module named 'torchcodec'), so decord decoded; ")
    assert r["setting"].endswith("decoder decord")
