"""Sweeps: grid expansion, cache hits and misses, parallel workers, failing runs, resume after a kill.

A tiny synthetic store (3 classes, rgb 6 + flow 4 dims, 8 frames) and a UCF101-layout list dir are written here;
runs use the paper heads with tiny budgets (``epochs=2``). The two tests that start processes (parallel workers,
the killed sweep) are marked slow: CI runs them, ``make test`` skips them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.errors import UserError
from pipeline.runs import COMPLETE
from pipeline.store import FeatureStore
from stages.sweep import FeatureCache, dedupe, expand, load_sweep, run_sweep, set_value
from tests.synthetic import write_ucf_store

torch.set_num_threads(1)

CLASSES = ["Alpha", "Beta", "Gamma"]
ROOT = Path(__file__).resolve().parents[1]
FAST = (("epochs", "2"), ("batch_size", "8"), ("frames", "4"))


def make_dataset(tmp_path: Path):
    """Synthetic UCF101-layout dataset and store (tests/synthetic.py), splits 1 and 2 with the same lists."""
    return write_ucf_store(tmp_path, CLASSES, T=8, dims=(6, 4), splits=(1, 2))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sweepds"))


def _sweep(dataset, out, spec, overrides=FAST, workers=1):
    root, store = dataset
    jobs = dedupe(expand(spec, str(store), str(root), str(out), overrides=overrides))
    return run_sweep(jobs, workers=workers, progress=False)


def _complete(out: Path) -> set[str]:
    return {p.parent.name for p in out.glob("*/COMPLETE")}


# ---------------------------------------------------------------------------------------------- expansion


def test_grid_expansion_product_order_and_precedence():
    spec = {"set": {"epochs": 7, "lr": "1e-3"},
            "runs": [{"head": "temporal-pool", "streams": [["rgb"], ["rgb", "flow"]], "splits": [1, 2],
                      "grid": {"segments": [1, 3, 5], "pool": ["max", "mean"]}, "set": {"lr": 0.01}},
                     {"head": "ts-lstm", "streams": "rgb,flow", "seeds": [0, 1], "set": {"hidden": [512, 512]}},
                     {"head": "lstm", "grid": {"bn": [True, False]}}]}
    jobs = expand(spec, "S", "D", "O", overrides=(("epochs", "2"),))
    assert len(jobs) == 3 * 2 * 2 * 2 + 2 + 2  # grid 3x2, 2 stream choices, 2 splits; 2 seeds; 2 bn values
    first = jobs[0]
    assert (first.head, first.streams, first.split, first.seed) == ("temporal-pool", ("rgb",), 1, 0)
    # file `set`, then the line's `set`, then the grid point, then the command line: later wins in resolve_configs
    assert first.overrides == (("epochs", "7"), ("lr", "0.01"), ("segments", "1"), ("pool", "max"), ("epochs", "2"))
    grid_points = [(dict(j.overrides)["segments"], dict(j.overrides)["pool"]) for j in jobs[:24:4]]
    assert grid_points == [("1", "max"), ("1", "mean"), ("3", "max"), ("3", "mean"), ("5", "max"), ("5", "mean")]
    assert [(j.streams, j.split) for j in jobs[:4]] == [(("rgb",), 1), (("rgb",), 2), (("rgb", "flow"), 1),
                                                        (("rgb", "flow"), 2)]
    ts = [j for j in jobs if j.head == "ts-lstm"]
    assert [j.seed for j in ts] == [0, 1] and ts[0].streams == ("rgb", "flow")
    assert dict(ts[0].overrides)["hidden"] == "512,512"  # a YAML list becomes the --set form
    assert [dict(j.overrides)["bn"] for j in jobs if j.head == "lstm"] == ["true", "false"]
    assert all(j.streams is None for j in jobs if j.head == "lstm")  # no streams: the store's default


def test_set_values_and_bad_sweeps(tmp_path):
    assert set_value([1024, 512]) == "1024,512" and set_value(False) == "false" and set_value(None) == "none"
    assert set_value(5e-5) == "5e-05"
    with pytest.raises(UserError, match="unknown head"):
        expand({"runs": [{"head": "no-such-head"}]}, "S", "D", "O")
    with pytest.raises(UserError, match="has no key 'segmnts'|unknown key 'segmnts'"):
        expand({"runs": [{"head": "temporal-pool", "grid": {"segmnts": [1]}}]}, "S", "D", "O")
    with pytest.raises(UserError, match="unknown key 'grids'"):
        expand({"runs": [{"head": "temporal-pool", "grids": {}}]}, "S", "D", "O")
    with pytest.raises(UserError, match="cannot read"):
        expand({"runs": [{"head": "temporal-pool", "grid": {"segments": ["three"]}}]}, "S", "D", "O")
    (tmp_path / "bad.yaml").write_text("heads: [ts-lstm]\n")
    with pytest.raises(UserError, match="'runs:'"):
        load_sweep(tmp_path / "bad.yaml")
    (tmp_path / "ok.yaml").write_text("runs:\n  - head: temporal-pool\n    grid: {segments: [1, 3]}\n")
    assert len(expand(load_sweep(tmp_path / "ok.yaml"), "S", "D", "O")) == 2


def test_dedupe_drops_lines_that_resolve_to_the_same_run():
    spec = {"runs": [{"head": "temporal-pool", "grid": {"segments": [3, 5]}},
                     {"head": "temporal-pool"},  # segments=3 is the default: the same run as the first
                     {"head": "temporal-pool", "streams": "rgb,flow"}]}
    jobs = expand(spec, "S", "D", "O")
    kept = dedupe(jobs, default_streams=("rgb", "flow"))
    assert len(jobs) == 4 and len(kept) == 2


# ---------------------------------------------------------------------------------------------- cache


SPEC = {"runs": [{"head": "temporal-pool", "streams": ["rgb"], "grid": {"segments": [1, 3]}},
                 {"head": "lstm", "streams": ["rgb"], "seeds": [0, 1], "set": {"hidden": 8}}]}


@pytest.fixture(scope="module")
def swept(dataset, tmp_path_factory):
    """One serial sweep of SPEC (4 runs), shared by the cache and the parallel tests."""
    out = tmp_path_factory.mktemp("swept") / "runs"
    return out, _sweep(dataset, out, SPEC)


def test_cache_hits_and_misses_one_changed_parameter_retrains_one_run(dataset, swept):
    out, first = swept
    assert [o.status for o in first] == ["trained"] * 4
    runs = _complete(out)
    assert len(runs) == 4
    metrics = {o.info["run"]: json.loads((out / o.info["run"] / "metrics.json").read_text()) for o in first}

    again = _sweep(dataset, out, SPEC)  # the same sweep: every run is a cache hit, nothing is rewritten
    assert [o.status for o in again] == ["cached"] * 4
    assert _complete(out) == runs
    for o in again:
        assert json.loads((out / o.info["run"] / "metrics.json").read_text()) == metrics[o.info["run"]]

    spec = json.loads(json.dumps(SPEC))
    spec["runs"][0]["grid"]["segments"] = [1, 2]  # one parameter value changed: exactly one new run
    spec["runs"].append({"head": "temporal-pool", "streams": ["flow"]})  # one line added: one more
    third = _sweep(dataset, out, spec)
    assert [o.status for o in third] == ["cached", "trained", "cached", "cached", "trained"]
    assert len(_complete(out)) == 6
    log = [json.loads(line) for line in (out / "sweep-log.jsonl").read_text().splitlines()]
    assert [row["status"] for row in log] == ["trained"] * 6  # cache hits are not logged


def test_worker_cache_loads_features_once(dataset):
    _, store = dataset
    cache = FeatureCache(cache_gb=1.0)
    a = cache.open_store(store)
    b = cache.open_store(str(store))
    assert a is b and cache.misses == 1 and cache.hits == 1
    plain = FeatureStore.open(store)
    ids = plain.ids()[:3]
    for x, y in zip(a.load("rgb", ids), plain.load("rgb", ids)):
        np.testing.assert_array_equal(x, y)
    assert cache.used == len(plain.ids()) * 8 * 6 * 2  # the rgb stream, float16, held once
    assert a.fingerprint == plain.fingerprint and a.streams == plain.streams and len(a) == len(plain)
    small = FeatureCache(cache_gb=0)  # over budget: read from the store every time, same numbers
    s = small.open_store(store)
    np.testing.assert_array_equal(s.get(ids[0], "flow"), plain.get(ids[0], "flow"))
    assert small.used == 0


@pytest.mark.slow  # two spawned workers each import torch: ~10 s on an idle machine, more on a busy one
def test_parallel_workers_give_the_same_runs_as_one_process(dataset, swept, tmp_path):
    out, serial = swept
    spec = {"runs": SPEC["runs"][:1]}  # the two temporal-pool runs, now in two worker processes
    parallel = _sweep(dataset, tmp_path / "b", spec, workers=2)
    assert [o.status for o in parallel] == ["trained"] * 2
    assert all(o.info["pid"] != os.getpid() for o in parallel)
    for s, p in zip(serial, parallel):
        assert s.info["run"] == p.info["run"]  # same config hash
        ms = json.loads((out / s.info["run"] / "metrics.json").read_text())
        mp = json.loads((tmp_path / "b" / p.info["run"] / "metrics.json").read_text())
        assert ms["accuracy"] == mp["accuracy"] and ms["per_class_ap"] == mp["per_class_ap"]  # seeded, CPU


def test_failing_run_is_reported_and_the_sweep_goes_on(dataset, tmp_path):
    from cli.sweep import sweep

    root, store = dataset
    (tmp_path / "s.yaml").write_text(
        "runs:\n"
        "  - head: conv-pool\n    streams: [rgb]\n    set: {hidden: 8}\n"  # 6 rgb dims are no C x 3 x 3 map
        "  - head: temporal-pool\n    streams: [rgb]\n")
    out = tmp_path / "runs"
    args = [str(store), str(tmp_path / "s.yaml"), "--dataset", str(root), "--out", str(out), "--quiet"]
    for k, v in FAST:
        args += ["--set", f"{k}={v}"]
    res = CliRunner().invoke(sweep, args)
    assert res.exit_code == 1, res.output
    assert "2 runs, 1 trained, 0 reused (finished before), 1 failed" in res.output and "is not C x 3 x 3" in res.output
    assert len(_complete(out)) == 1
    log = [json.loads(line) for line in (out / "sweep-log.jsonl").read_text().splitlines()]
    assert sorted(row["status"] for row in log) == ["failed", "trained"]
    res = CliRunner().invoke(sweep, args + ["--dry-run"])
    assert res.exit_code == 0 and "2 runs" in res.output and "hidden=8" in res.output
    finished = next(out.glob("temporal-pool-*"))
    lines = res.output.splitlines()
    assert any(line.strip().startswith("finished") and "temporal-pool" in line and str(finished) in line
               for line in lines), res.output
    assert any(line.strip().startswith("to train") and "conv-pool" in line for line in lines), res.output
    assert "1 to train, 1 finished" in res.output
    res = CliRunner().invoke(sweep, args)  # the finished run is named as reused, not only counted
    assert any(line.startswith("reused") and finished.name in line for line in res.output.splitlines()), res.output
    assert "2 runs, 0 trained, 1 reused (finished before), 1 failed" in res.output


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.slow  # a sweep in a subprocess, killed, then resumed
def test_resume_after_a_killed_sweep(dataset, tmp_path):
    root, store = dataset
    out = tmp_path / "runs"
    (tmp_path / "s.yaml").write_text(
        "set: {epochs: 20, patience: 0, batch_size: 4, frames: 4}\n"
        "runs:\n  - head: temporal-pool\n    streams: [rgb]\n    grid: {segments: [1, 2, 3, 4]}\n")
    cmd = [sys.executable, "-m", "cli.main", "sweep", str(store), str(tmp_path / "s.yaml"), "--dataset", str(root),
           "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 50
        while not _complete(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert _complete(out), f"no run finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep we started, and only it
        proc.wait()
    done_before = _complete(out)
    assert 1 <= len(done_before) < 4, "the kill should land mid-sweep"

    outcomes = _sweep(dataset, out, load_sweep(tmp_path / "s.yaml"), overrides=())
    assert {o.info["run"] for o in outcomes if o.status == "cached"} == done_before
    assert sum(o.status == "trained" for o in outcomes) == 4 - len(done_before)
    assert len(_complete(out)) == 4
    assert not [d for d in out.iterdir() if d.is_dir() and not (d / COMPLETE).exists()]  # nothing left half-done


# ---------------------------------------------------------------------------------------------- examples


def test_example_sweeps_expand_and_all_heads_names_every_registered_head():
    from pipeline.registry import HEADS

    all_heads = expand(load_sweep(ROOT / "examples" / "all-heads.yaml"), "S", "D", "O")
    registered = [n for n in HEADS.names() if not n.startswith("test-")]  # other test files register test-* heads
    assert sorted(j.head for j in all_heads) == registered
    table3 = expand(load_sweep(ROOT / "examples" / "ma-table3.yaml"), "S", "D", "O")
    rows = [(j.head, dict(j.overrides)) for j in table3]
    assert len(rows) == 9 and all(j.streams == ("rgb", "flow") and j.split == 1 for j in table3)
    assert rows[5] == ("temporal-pool", {"segments": "3", "fc": "512"})
    assert [o["hidden"] for h, o in rows if h == "ts-lstm"] == ["512", "512,512", "512,512,512"]
    demo = expand(load_sweep(ROOT / "examples" / "sweep-demo.yaml"), "S", "D", "O")
    assert len(demo) == 6 + 6 + 2
