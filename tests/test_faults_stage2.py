"""Stage two under faults and bad input: killed sweeps, concurrent writers of one run, out-of-range settings,
non-finite features, damaged runs given to report and fuse, the README's ``--set`` syntax, unwritable ``--out``.

Every case either ends in one ``error:`` line with exit 2 before any work starts, or is survived without a wrong
result (no orphaned worker, no run directory written twice, no NaN reported as a score).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.runs import COMPLETE, RunDir
from stages.sweep import dedupe, expand, load_sweep, run_sweep
from stages.train import TrainJob, train
from tests.synthetic import write_ucf_store
from tests.test_fuse import _fake_run, informative

torch.set_num_threads(1)

CLASSES = ["Alpha", "Beta", "Gamma"]
ROOT = Path(__file__).resolve().parents[1]
FAST = (("epochs", "3"), ("batch_size", "8"), ("frames", "4"), ("patience", "0"), ("eval_every", "0"))  # a row per epoch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_ucf_store(tmp_path_factory.mktemp("faults2"), CLASSES, groups=5, T=8, dims=(6, 4))


def _one_error_line(code: int, out: str, *needles: str) -> None:
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2, out
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    for n in needles:
        assert n in lines[0], out


def _train_log_epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- killed sweeps


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc (no psutil)."""
    parent_of = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ...
            if fields[0] != "Z":
                parent_of[int(d.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent_of.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has stopped running; only its exit status is left


@pytest.mark.faults
@pytest.mark.slow  # a sweep of two spawned workers (each imports torch), killed, then resumed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_a_sweep_leaves_no_worker_and_the_rerun_logs_each_epoch_once(dataset, tmp_path):
    """kill -9 of `sweep --jobs 2`: no orphaned worker, rerun logs each epoch once"""
    root, store = dataset
    out = tmp_path / "runs"
    epochs = 120  # seconds per run on a busy machine: the kill lands while both workers train
    (tmp_path / "s.yaml").write_text(
        f"set: {{epochs: {epochs}, patience: 0, batch_size: 4, frames: 4, eval_every: 0}}\n"
        "runs:\n  - head: temporal-pool\n    streams: [rgb]\n    grid: {segments: [1, 2, 3, 4]}\n")
    cmd = [sys.executable, "-m", "cli.main", "sweep", str(store), str(tmp_path / "s.yaml"), "--dataset", str(root),
           "--out", str(out), "--jobs", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        training = []
        while time.monotonic() < deadline and proc.poll() is None:
            training = [d for d in out.glob("temporal-pool-*") if (d / "train_log.jsonl").is_file()
                        and (d / "train_log.jsonl").stat().st_size > 0 and not (d / COMPLETE).exists()]
            if len(training) >= 2:
                break
            time.sleep(0.05)
        assert len(training) >= 2, f"the workers never trained: {proc.stderr.read().decode()[-2000:]}"
        workers = _children(proc.pid)
        holders = {int(p.read_text()) for p in out.glob(".*.lock") if p.read_text().strip()}
        os.kill(proc.pid, signal.SIGKILL)  # the sweep's own process only: its workers must follow it
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in workers if _alive(p)]
        assert not survivors, f"worker processes {survivors} outlived the killed sweep"
        assert holders and holders <= workers  # the run locks named the worker processes that trained them
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in workers:  # processes this test started (via the sweep): never leave one behind
            if _alive(p):
                os.kill(p, signal.SIGKILL)

    half_written = [d for d in out.glob("temporal-pool-*") if not (d / COMPLETE).exists()]
    assert half_written  # the kill left runs without COMPLETE: the rerun resets and retrains them
    outcomes = run_sweep(dedupe(expand(load_sweep(tmp_path / "s.yaml"), str(store), str(root), str(out))),
                         progress=False)
    assert not [o for o in outcomes if o.failed]
    runs = sorted(out.glob("temporal-pool-*"))
    assert len(runs) == 4 and all((d / COMPLETE).is_file() for d in runs)
    for d in runs:
        assert _train_log_epochs(d) == list(range(1, epochs + 1)), d.name  # one row per epoch, nothing twice


@pytest.mark.faults
def test_a_run_locked_by_another_process_is_waited_for_not_written_twice(dataset, tmp_path):
    """a run held by another process: wait for it, never write it twice"""
    root, store = dataset
    job = TrainJob(store=str(store), dataset=str(root), head="temporal-pool", streams=("rgb",), overrides=FAST,
                   out=str(tmp_path / "runs"))
    first = train(job, progress=False, echo=lambda m: None)
    (first.path / COMPLETE).unlink()  # as if its writer were still at work
    with open(first.path / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 1, "train_loss": 0.0}) + "\n")  # a stale row of an earlier attempt
    lock = first.path.parent / f".{first.path.name}.lock"
    hold = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.ftruncate(fd, 0); os.write(fd, f'{os.getpid()}'.encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(float(sys.argv[2]))\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock), "2.0"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        said: list[str] = []
        t0 = time.monotonic()
        again = train(job, progress=False, echo=said.append)
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert any(f"being trained by process {holder.pid}; waiting" in m for m in said), said
    assert waited >= 1.0  # it did not write while the other process held the run
    assert again.path == first.path and not again.cached  # the holder left it unfinished: reset and trained
    assert _train_log_epochs(again.path) == [1, 2, 3]  # the stale row is gone, each epoch once


@pytest.mark.faults
def test_concurrent_claims_of_one_run_are_exclusive(tmp_path):
    """two threads claim one run directory: one writer at a time"""
    config = {"head": "x", "n": 1}
    inside, overlap, finished = [], [], []

    def work() -> None:
        run = RunDir(tmp_path, "x", config)
        run.claim(echo=lambda m: None)
        inside.append(1)
        if len(inside) > 1:
            overlap.append(1)
        time.sleep(0.2)
        inside.pop()
        run.release()
        finished.append(1)

    # flock locks belong to open file descriptions: two RunDir objects in one process exclude each other too
    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(finished) == 3 and not overlap


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.faults
@pytest.mark.parametrize("head, setting, key", [
    ("ts-lstm", "hidden=-5", "hidden"),
    ("lstm", "dropout=7", "dropout"),
    ("temporal-pool", "segments=0", "segments"),
    ("temporal-pool", "pool=avg", "pool"),
    ("temporal-vgg", "kernels=4", "kernel"),
    ("svm", "C=-1", "C"),
    ("deep-lstm", "layers=0", "layers"),
])
def test_out_of_range_head_settings_are_one_line_before_any_work(run_cli, dataset, tmp_path, head, setting, key):
    """out-of-range head setting (hidden=-5, dropout=7, ...): one line, exit 2"""
    root, store = dataset
    code, out = run_cli("train", store, "--dataset", root, "--head", head, "--streams", "rgb", "--set", setting,
                        "--set", "epochs=1", "--out", tmp_path / "runs", "--quiet")
    _one_error_line(code, out, key)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # nothing started


@pytest.mark.faults
def test_a_sweep_file_with_a_bad_value_is_refused_before_the_first_run_dry_run_too(run_cli, dataset, tmp_path):
    """sweep file with dropout=7 in a grid: refused before the first run, --dry-run too"""
    root, store = dataset
    (tmp_path / "s.yaml").write_text(
        "runs:\n  - head: temporal-pool\n    streams: [rgb]\n"
        "  - head: lstm\n    streams: [rgb]\n    grid: {dropout: [0.1, 7]}\n")
    out = tmp_path / "runs"
    for extra in (["--dry-run"], []):
        code, text = run_cli("sweep", store, tmp_path / "s.yaml", "--dataset", root, "--out", out, "--quiet",
                             "--set", "epochs=1", *extra)
        _one_error_line(code, text, "dropout=7")
        assert not out.exists()  # not even the first (valid) run was trained
    (tmp_path / "t.yaml").write_text("runs:\n  - head: temporal-pool\n    streams: [depth]\n")
    code, text = run_cli("sweep", store, tmp_path / "t.yaml", "--dataset", root, "--out", out, "--dry-run")
    _one_error_line(code, text, "no stream 'depth'")
    # the Python API goes through the same check
    with pytest.raises(UserError, match="dropout"):
        expand(load_sweep(tmp_path / "s.yaml"), "S", "D", "O")
    from pipeline.training import resolve_configs

    with pytest.raises(UserError, match="hidden"):
        resolve_configs("ts-lstm", {"hidden": (512, -1)})  # values that are not strings are checked as well
    with pytest.raises(UserError, match="dropout=7.0: is a drop probability"):
        resolve_configs("lstm", {"dropout": 7})  # an int for a float field is checked as that float


@pytest.mark.faults
@pytest.mark.parametrize("option", [("--weights", "1,-1"), ("--weights", "0,0"), ("--step", "0"), ("--cv", "0"),
                                    ("--step", "0.3")])
def test_bad_fusion_options_are_one_line(run_cli, tmp_path, option):
    """bad fuse options (--weights 1,-1 / 0,0, --step 0, --cv 0): one line, exit 2"""
    a = _fake_run(tmp_path / "in", "a", informative, seed=1)
    b = _fake_run(tmp_path / "in", "b", informative, seed=2)
    code, out = run_cli("fuse", a, b, "--out", tmp_path / "out", *option)
    _one_error_line(code, out, option[0])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- non-finite features


class _NaNStore:
    """A feature store as an older writer could have left it: one video's rgb features hold NaN and Inf."""

    def __init__(self, store, bad_id: str):
        self._store, self.bad_id = store, bad_id

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __contains__(self, video_id):
        return video_id in self._store

    def _poison(self, video_id, arr, stream):
        if video_id == self.bad_id and stream == "rgb":
            arr = arr.copy()
            arr[1, 2], arr[3, 0] = np.nan, np.inf
        return arr

    def load(self, stream="rgb", ids=None):
        ids = self._store.ids() if ids is None else list(ids)
        return [self._poison(v, a, stream) for v, a in zip(ids, self._store.load(stream, ids))]

    def get(self, video_id, stream="rgb"):
        return self._poison(video_id, self._store.get(video_id, stream), stream)


@pytest.mark.faults
@pytest.mark.parametrize("head, overrides", [("temporal-pool", FAST), ("svm", ())])
def test_non_finite_features_are_refused_naming_the_video(dataset, tmp_path, head, overrides):
    """NaN/Inf input features (torch and sklearn head): refused naming the video"""
    from pipeline.store import FeatureStore

    root, store = dataset
    bad = "Beta/v_Beta_g04_c01.avi"  # a training video
    job = TrainJob(store=str(store), dataset=str(root), head=head, streams=("rgb",), overrides=overrides,
                   out=str(tmp_path / "runs"))
    with pytest.raises(UserError, match=re.escape(f"video {bad}: its rgb features hold 2 non-finite values")):
        train(job, progress=False, echo=lambda m: None, open_store=lambda p: _NaNStore(FeatureStore.open(p), bad))
    assert not list((tmp_path / "runs").glob(f"*/{COMPLETE}"))  # nothing that looks like a result


def test_non_finite_check_covers_streamed_features_and_float32():
    """The same refusal when features are streamed from the store one video at a time, and for float32 arrays."""
    from pipeline.features import VideoFeatures

    class Store:
        streams: ClassVar[dict] = {"rgb": 3}

        def lengths(self, ids):
            return [4] * len(ids)

        def get(self, video_id, stream):
            x = np.ones((4, 3), np.float32)
            if video_id == "b":
                x[2, 1] = -np.inf
            return x

    data = VideoFeatures(Store(), ["a", "b"], [0, 1], ["rgb"], frames=4, in_memory=False)
    assert data.item(0).shape == (4, 3)
    with pytest.raises(UserError, match="video b: its rgb features hold 1 non-finite"):
        data.item(1)
    with pytest.raises(UserError, match="video b"):
        VideoFeatures(Store(), ["a", "b"], [0, 1], ["rgb"], frames=0, in_memory=True)


# ---------------------------------------------------------------------------------------------- damaged runs


@pytest.mark.faults
def test_report_skips_damaged_runs_with_a_warning_naming_them(run_cli, tmp_path):
    """report over a truncated metrics.json and a missing one: skipped with a warning"""
    runs = tmp_path / "runs"
    good = _fake_run(runs, "good", informative, seed=1)
    truncated = _fake_run(runs, "trunc", informative, seed=2)
    text = (truncated / "metrics.json").read_text()
    (truncated / "metrics.json").write_text(text[: len(text) // 2])
    missing = _fake_run(runs, "gone", informative, seed=3)
    (missing / "metrics.json").unlink()
    code, out = run_cli("report", runs, "--out", tmp_path / "report")
    assert code == 0, out
    assert "Traceback" not in out
    warned = [line for line in out.splitlines() if line.startswith("warning: skipping damaged run")]
    assert len(warned) == 2 and any(str(truncated) in w for w in warned) and any(str(missing) in w for w in warned)
    board = (tmp_path / "report" / "leaderboard.csv").read_text()
    assert good.name in board and truncated.name not in board and missing.name not in board


@pytest.mark.faults
@pytest.mark.parametrize("damage", ["empty", "truncated", "no-scores"])
def test_fuse_refuses_a_damaged_run_in_one_line_not_as_an_abort(run_cli, tmp_path, damage):
    """fuse of an empty or truncated scores_test.npz: one line, exit 2 (not 'aborted', 130)"""
    a = _fake_run(tmp_path / "in", "a", informative, seed=1)
    b = _fake_run(tmp_path / "in", "b", informative, seed=2)
    path = b / "scores_test.npz"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        with np.load(path) as z:
            np.savez(path, ids=z["ids"], labels=z["labels"], classes=z["classes"])
    code, out = run_cli("fuse", a, b, "--out", tmp_path / "out")
    _one_error_line(code, out, str(path))


def test_only_a_real_interrupt_exits_130(run_cli, monkeypatch):
    """An EOFError inside a command (click turns it into Abort) is an error, exit 1; Ctrl-C stays 130."""
    import stages.report

    def eof(*a, **k):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(stages.report, "write_report", eof)
    code, out = run_cli("report", ".")
    assert code == 1 and "aborted" not in out and "unexpected end of a file (Ran out of input)" in out

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.report, "write_report", interrupt)
    code, out = run_cli("report", ".")
    assert code == 130


# ---------------------------------------------------------------------------------------------- --set and --out


def _readme_set_examples() -> list[tuple[str, list[str]]]:
    """Every inline ``... --set k=v [k=v ...]`` example of the README: (head, the arguments from ``--set`` on).
    The head is the one the example names, else the first registered head that has every key it sets."""
    import dataclasses

    from pipeline.registry import HEADS
    from pipeline.training import TRAIN_KEYS

    text = (ROOT / "README.md").read_text()
    found = []
    for span in re.findall(r"`([^`]*--set [^`]*)`", text):
        words = re.sub(r"\|\w+", "", span).split()  # `finetune=top|top3`: the first of the choices
        args = words[words.index("--set"):]
        keys = [a.partition("=")[0] for a in args if "=" in a]
        if keys == ["key"]:
            continue  # the syntax line `--set key=value`, not an example
        head = words[words.index("--head") + 1] if "--head" in words else next((w for w in words if w in HEADS), None)
        if head is None:
            head = next(h for h in HEADS.names() if set(keys) <= {f.name for f in
                        dataclasses.fields(HEADS.get(h).config_cls)} | set(TRAIN_KEYS))
        found.append((head, args))
    return found


@pytest.mark.faults
def test_readme_set_examples_parse_as_written():
    """README `--set lambda2=0 lambda3=0`: several key=value after one --set"""
    from cli.train import train as train_cmd
    from pipeline.training import resolve_configs

    examples = _readme_set_examples()
    assert any(args[:3] == ["--set", "lambda2=0", "lambda3=0"] for _, args in examples)  # the example
    for head, args in examples:
        args = [a for a in args if not a.startswith("runs/")]  # --init-from's placeholder folder
        if "--init-from" in args:
            args.remove("--init-from")
        ctx = train_cmd.make_context("train", ["STORE", "--dataset", "D", "--head", head, *args])
        sets = ctx.params["sets"]
        assert list(sets) == [a for a in args if "=" in a], (head, args)
        from cli.train import _parse_sets

        resolve_configs(head, dict(_parse_sets(sets)))  # every key exists for that head, every value is in range
    ctx = train_cmd.make_context("train", ["S", "--dataset", "D", "--set", "a=1", "--set", "b=2", "--set", "c=3",
                                           "d=4"])
    assert ctx.params["sets"] == ("a=1", "b=2", "c=3", "d=4") and ctx.params["store"] == "S"


@pytest.mark.faults
def test_train_into_an_unwritable_out_is_one_line_before_features_load(run_cli, dataset, tmp_path, monkeypatch):
    """train --out to a folder that cannot be written: one line, exit 2, before loading features"""
    import stages.train

    loaded = []
    real = stages.train.VideoFeatures
    monkeypatch.setattr(stages.train, "VideoFeatures", lambda *a, **k: loaded.append(1) or real(*a, **k))
    root, store = dataset
    (tmp_path / "file").write_text("not a folder")
    code, out = run_cli("train", store, "--dataset", root, "--head", "temporal-pool", "--streams", "rgb",
                        "--out", tmp_path / "file" / "runs", "--quiet", "--set", "epochs=1")
    _one_error_line(code, out, "cannot write runs to", str(tmp_path / "file" / "runs"))
    assert not loaded


@pytest.mark.faults
@pytest.mark.slow  # a local Ray instance (seconds to start) and four runs, one killed mid-training
def test_ray_sweep_survives_a_killed_worker_and_trains_each_run_once(dataset, tmp_path):
    """a Ray worker killed mid-run (`sweep --engine ray`): retried, every run complete, each epoch logged once"""
    ray = pytest.importorskip("ray")
    root, store = dataset
    out = tmp_path / "runs"
    epochs = 60
    (tmp_path / "s.yaml").write_text(
        f"set: {{epochs: {epochs}, patience: 0, batch_size: 4, frames: 4, eval_every: 0}}\n"
        "runs:\n  - head: temporal-pool\n    streams: [rgb]\n    grid: {segments: [1, 2, 3, 4]}\n")
    jobs = dedupe(expand(load_sweep(tmp_path / "s.yaml"), str(store), str(root), str(out)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}})
    try:
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(o=run_sweep(jobs, progress=False, engine="ray")))
        runner.start()
        killed = None
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and runner.is_alive():
            for d in out.glob("temporal-pool-*"):
                log, lock = d / "train_log.jsonl", out / f".{d.name}.lock"
                if log.is_file() and log.stat().st_size > 0 and not (d / COMPLETE).exists() and lock.is_file():
                    pid = lock.read_text().strip()
                    if pid:
                        killed = int(pid)
                        os.kill(killed, signal.SIGKILL)  # the Ray worker training this run
                        break
            time.sleep(0.05)
        runner.join(timeout=600)
        assert killed is not None and not runner.is_alive()
    finally:
        ray.shutdown()
    assert not [o for o in result["o"] if o.failed], [o.info for o in result["o"] if o.failed]
    runs = sorted(out.glob("temporal-pool-*"))
    assert len(runs) == 4 and all((d / COMPLETE).is_file() for d in runs)
    for d in runs:
        assert _train_log_epochs(d) == list(range(1, epochs + 1)), d.name  # the killed run reset, not appended to
    assert killed not in {o.info.get("pid") for o in result["o"]}  # its run finished in another worker
