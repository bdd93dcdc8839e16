"""Dataset manifests: every layout into one structure, stable ids, path escapes and bad list files rejected."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.datasets import Manifest, ManifestError, VideoItem, load_manifest, ucf_group
from pipeline.errors import UserError

# class -> (group, clip) pairs; the same little dataset is written in every layout
VIDEOS = {"ApplyEyeMakeup": [(1, 1), (1, 2), (2, 1)], "HandstandPushups": [(1, 1), (2, 1), (2, 2)]}


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _ucf_ids():
    return [f"{c}/v_{c}_g{g:02d}_c{k:02d}.avi" for c, vs in VIDEOS.items() for g, k in vs]


def _write_videos(root: Path) -> list[str]:
    ids = _ucf_ids()
    for i in ids:
        _touch(root / i)
    return ids


def _write_ucf(root: Path, split_dir: str = "ucfTrainTestlist", crlf: bool = True) -> Path:
    """UCF101 layout with its quirks: CRLF, classInd says HandStandPushups, lists use the classInd spelling."""
    _write_videos(root)
    nl = "\r\n" if crlf else "\n"
    d = root / split_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "classInd.txt").write_text(nl.join(["1 ApplyEyeMakeup", "2 HandStandPushups"]) + nl, newline="")
    # split 1: group 1 tests; split 2: group 2 tests (UCF101 holds out groups)
    for n, test_group in ((1, 1), (2, 2)):
        train, test = [], []
        for label, (c, vs) in enumerate(VIDEOS.items(), 1):
            listed = "HandStandPushups" if c == "HandstandPushups" else c  # the real lists' spelling
            for g, k in vs:
                path = f"{listed}/v_{listed}_g{g:02d}_c{k:02d}.avi"
                (test if g == test_group else train).append((path, label))
        (d / f"trainlist{n:02d}.txt").write_text("".join(f"{p} {lab}{nl}" for p, lab in train), newline="")
        (d / f"testlist{n:02d}.txt").write_text("".join(f"{p}{nl}" for p, _ in test), newline="")
    return d


def _write_hmdb(root: Path) -> Path:
    _write_videos(root)
    d = root / "splits"
    d.mkdir()
    for n, test_group in ((1, 1), (2, 2)):
        for c, vs in VIDEOS.items():
            lines = [f"v_{c}_g{g:02d}_c{k:02d}.avi {2 if g == test_group else 1}" for g, k in vs]
            (d / f"{c}_test_split{n}.txt").write_text("\n".join(lines) + "\n")
    return d


def _write_csv(root: Path, name: str = "manifest.csv") -> Path:
    _write_videos(root)
    rows = ["path,label,split"]
    rows += [
        f"{c}/v_{c}_g{g:02d}_c{k:02d}.avi,{c},{'test' if g == 1 else 'train'}"
        for c, vs in VIDEOS.items()
        for g, k in vs
    ]
    (root / name).write_text("\n".join(rows) + "\n")
    return root / name


def _expected_split(m: Manifest, n: int) -> dict[str, str]:
    return {v.id: ("test" if v.group.endswith(f"_g{n:02d}") else "train") for v in m.videos}


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["ucf101", "hmdb51", "csv", "folders"])
def test_every_layout_gives_the_same_manifest(tmp_path, layout):
    root = tmp_path / "data"
    {"ucf101": _write_ucf, "hmdb51": _write_hmdb, "csv": _write_csv, "folders": _write_videos}[layout](root)
    m = load_manifest(root)
    assert m.source == layout
    assert m.root == root.resolve()
    assert [v.id for v in m.videos] == sorted(_ucf_ids())
    by_id = m.by_id()
    for c, vs in VIDEOS.items():
        for g, k in vs:
            v = by_id[f"{c}/v_{c}_g{g:02d}_c{k:02d}.avi"]
            assert isinstance(v, VideoItem)
            assert m.classes[v.label].lower() == c.lower()
            assert v.group == f"{c}_g{g:02d}"
            assert v.path == (root / v.id).resolve() and v.path.is_absolute()
    if layout in ("ucf101", "hmdb51"):
        assert sorted(m.splits) == [1, 2]
        for n in (1, 2):
            assert m.splits[n] == _expected_split(m, n)
    elif layout == "csv":
        assert m.splits == {1: _expected_split(m, 1)}
    else:
        assert m.splits == {}


def test_ucf101_quirks_and_labels(tmp_path):
    _write_ucf(tmp_path)
    m = load_manifest(tmp_path)
    assert m.classes == ["ApplyEyeMakeup", "HandStandPushups"]  # classInd order and spelling
    # ids are spelled as on disk, whatever case the list files use
    assert "HandstandPushups/v_HandstandPushups_g02_c02.avi" in m.by_id()
    assert all(v.label == (0 if v.id.startswith("Apply") else 1) for v in m.videos)
    train, test = m.split(1)
    assert [v.id for v in test] == sorted(i for i in _ucf_ids() if "_g01_" in i)
    assert [v.id for v in train] == sorted(i for i in _ucf_ids() if "_g02_" in i)
    assert [v.id for v in train] == sorted(v.id for v in train)


def test_ucf101_real_spelling_and_linked_root(tmp_path):
    """The real UCF101: folder HandstandPushups, files v_HandStandPushups_*, lists naming them the same way."""
    _touch(tmp_path / "data" / "HandstandPushups" / "v_HandStandPushups_g01_c01.avi")
    _touch(tmp_path / "data" / "HandstandPushups" / "v_HandStandPushups_g02_c01.avi")
    d = tmp_path / "data" / "ucfTrainTestlist"
    d.mkdir()
    (d / "classInd.txt").write_bytes(b"\xef\xbb\xbf1 HandstandPushups\r\n")  # with a BOM, for good measure
    (d / "trainlist01.txt").write_bytes(b"HandstandPushups/v_HandStandPushups_g01_c01.avi 1\r\n")
    (d / "testlist01.txt").write_bytes(b"HandstandPushups/v_HandStandPushups_g02_c01.avi\r\n\r\n")
    os.symlink(tmp_path / "data", tmp_path / "link")  # a root reached through a link is fine
    m = load_manifest(tmp_path / "link")
    assert m.root == (tmp_path / "data").resolve()
    assert [(v.id, v.label, v.group) for v in m.videos] == [
        ("HandstandPushups/v_HandStandPushups_g01_c01.avi", 0, "HandStandPushups_g01"),
        ("HandstandPushups/v_HandStandPushups_g02_c01.avi", 0, "HandStandPushups_g02"),
    ]
    assert m.splits == {1: {m.videos[0].id: "train", m.videos[1].id: "test"}}


def test_ucf101_in_splits_dir_and_explicit_split_dir(tmp_path):
    _write_ucf(tmp_path / "a", split_dir="splits", crlf=False)
    assert load_manifest(tmp_path / "a").source == "ucf101"
    lists = _write_ucf(tmp_path / "b", split_dir="elsewhere")
    with pytest.raises(ManifestError, match="no videos found"):
        load_manifest(tmp_path / "b" / "elsewhere")  # not a video root
    m = load_manifest(tmp_path / "b", split_dir=lists)
    assert m.source == "ucf101" and len(m.videos) == 6
    assert load_manifest(tmp_path / "b", split_dir=lists).fingerprint() == load_manifest(tmp_path / "a").fingerprint()


def test_ucf101_flat_list_uses_label_column_and_file_name(tmp_path):
    _touch(tmp_path / "v_Walk_g01_c01.avi")
    _touch(tmp_path / "v_Run_g02_c01.avi")
    _touch(tmp_path / "clip.avi")
    d = tmp_path / "splits"
    d.mkdir()
    (d / "classInd.txt").write_text("1 Walk\n2 Run\n")
    (d / "trainlist01.txt").write_text("v_Walk_g01_c01.avi 1\nclip.avi 2\n")
    (d / "testlist01.txt").write_text("v_Run_g02_c01.avi\n")
    m = load_manifest(tmp_path)
    assert {v.id: v.label for v in m.videos} == {"clip.avi": 1, "v_Run_g02_c01.avi": 1, "v_Walk_g01_c01.avi": 0}
    assert m.by_id()["clip.avi"].group == "clip.avi"
    (d / "testlist01.txt").write_text("clip.avi\n")
    with pytest.raises(ManifestError, match=r"testlist01\.txt:1: cannot tell the class"):
        load_manifest(tmp_path)


def test_hmdb51_zero_entries_are_ignored(tmp_path):
    for name in ("a.avi", "b.avi", "c.avi", "unused.avi"):
        _touch(tmp_path / "brush_hair" / name)
    _touch(tmp_path / "cartwheel" / "d.avi")
    d = tmp_path / "testTrainMulti_7030_splits"
    d.mkdir()
    (d / "brush_hair_test_split1.txt").write_text("a.avi 1 \r\nb.avi 2\r\nc.avi 0\r\nunused.avi 0\r\n")
    (d / "brush_hair_test_split2.txt").write_text("a.avi 2\nb.avi 0\nc.avi 1\nunused.avi 0\n")
    (d / "cartwheel_test_split1.txt").write_text("d.avi 1\n")
    m = load_manifest(tmp_path)
    assert m.source == "hmdb51"
    assert m.classes == ["brush_hair", "cartwheel"]
    assert [v.id for v in m.videos] == ["brush_hair/a.avi", "brush_hair/b.avi", "brush_hair/c.avi", "cartwheel/d.avi"]
    assert m.splits[1] == {"brush_hair/a.avi": "train", "brush_hair/b.avi": "test", "cartwheel/d.avi": "train"}
    assert m.splits[2] == {"brush_hair/a.avi": "test", "brush_hair/c.avi": "train"}
    train, test = m.split(2)
    assert [v.id for v in train] == ["brush_hair/c.avi"] and [v.id for v in test] == ["brush_hair/a.avi"]
    (d / "cartwheel_test_split1.txt").write_text("d.avi 3\n")
    with pytest.raises(ManifestError, match=r"cartwheel_test_split1\.txt:1: expected '<video> 0\|1\|2'"):
        load_manifest(tmp_path)


def test_csv_variants(tmp_path):
    for name in ("x/1.mp4", "x/2.mp4", "y/3.mp4", "4.mkv"):
        _touch(tmp_path / name)
    # no header, numeric class names (sorted as numbers), no split column -> no splits
    (tmp_path / "list.csv").write_text("x/1.mp4,10\nx/2.mp4,2\n./y/3.mp4,10\n4.mkv,2\n")
    m = load_manifest(tmp_path / "list.csv")  # a .csv as the root: its folder is the root
    assert m.source == "csv" and m.classes == ["2", "10"]
    assert {v.id: v.label for v in m.videos} == {"4.mkv": 0, "x/1.mp4": 1, "x/2.mp4": 0, "y/3.mp4": 1}
    assert m.splits == {}
    with pytest.raises(ManifestError, match="defines no train/test split"):
        m.split(1)
    # header in another column order, an empty split leaves the video out of split 1
    (tmp_path / "other.csv").write_text("label,split,path\ncat,train,x/1.mp4\ndog,test,x/2.mp4\ncat,,y/3.mp4\n")
    m = load_manifest(tmp_path, csv=tmp_path / "other.csv")
    assert m.classes == ["cat", "dog"]
    assert m.splits == {1: {"x/1.mp4": "train", "x/2.mp4": "test"}}
    assert len(m.videos) == 3
    (tmp_path / "bad.csv").write_text("path,label,split\nx/1.mp4,cat,val\n")
    with pytest.raises(ManifestError, match=r"bad\.csv:2: split must be 'train' or 'test'"):
        load_manifest(tmp_path, csv=tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("x/1.mp4,cat\nx/2.mp4\n")
    with pytest.raises(ManifestError, match=r"bad\.csv:2: expected 2 columns"):
        load_manifest(tmp_path, csv=tmp_path / "bad.csv")


def test_folders_layout(tmp_path):
    _touch(tmp_path / "run" / "a.MP4")
    _touch(tmp_path / "run" / "sub" / "b.webm")
    _touch(tmp_path / "run" / "notes.txt")
    _touch(tmp_path / "run" / ".hidden.avi")
    _touch(tmp_path / "walk" / "a.mp4")
    _touch(tmp_path / "walk" / "a.avi")  # same stem, other extension: a second video
    _touch(tmp_path / "empty" / "readme.md")
    _touch(tmp_path / "top.avi")  # not in a class folder: ignored
    m = load_manifest(tmp_path)
    assert m.source == "folders" and m.classes == ["run", "walk"]
    assert [(v.id, v.label) for v in m.videos] == [
        ("run/a.MP4", 0),
        ("run/sub/b.webm", 0),
        ("walk/a.avi", 1),
        ("walk/a.mp4", 1),
    ]
    assert all(v.group == v.id for v in m.videos)
    with pytest.raises(ManifestError, match="no videos found"):
        load_manifest(tmp_path / "empty")


def test_ids_and_fingerprint_are_stable(tmp_path):
    _write_ucf(tmp_path / "a")
    m1, m2 = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "a")
    assert m1 == m2 and m1.fingerprint() == m2.fingerprint()
    assert len(m1.fingerprint()) == 16
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    moved = load_manifest(tmp_path / "moved")
    assert [v.id for v in moved.videos] == [v.id for v in m1.videos]
    assert moved.fingerprint() == m1.fingerprint()  # independent of where the root lives
    # a different split changes the fingerprint
    lst = tmp_path / "moved" / "ucfTrainTestlist" / "testlist02.txt"
    lines = lst.read_text().splitlines()
    lst.write_text("\n".join(lines[:-1]) + "\n")
    assert load_manifest(tmp_path / "moved").fingerprint() != m1.fingerprint()


def test_groups():
    assert ucf_group("Basketball/v_Basketball_g08_c01.avi") == "Basketball_g08"
    assert ucf_group("v_Yo_Yo_g25_c04.avi") == "Yo_Yo_g25"
    assert (
        ucf_group("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi")
        == "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi"
    )


def test_with_group_split_keeps_groups_together(tmp_path):
    for c in ("A", "B"):
        for g in range(1, 7):
            for k in (1, 2):
                _touch(tmp_path / c / f"v_{c}_g{g:02d}_c{k:02d}.avi")
    m = load_manifest(tmp_path)
    s = m.with_group_split(test_fraction=1 / 3, seed=3)
    assert m.splits == {} and sorted(s.splits) == [1]
    train, test = s.split(1)
    assert len(test) == 2 * 2 * 2 and len(train) == 16  # 2 of 6 groups per class, 2 clips each
    assert not {v.group for v in train} & {v.group for v in test}
    assert s.splits == m.with_group_split(test_fraction=1 / 3, seed=3).splits
    assert any(m.with_group_split(1 / 3, seed=k).splits != s.splits for k in range(4, 10))


def test_split_errors(tmp_path):
    _write_ucf(tmp_path)
    m = load_manifest(tmp_path)
    with pytest.raises(ManifestError, match=r"split 3 is not defined .*; splits: 1, 2"):
        m.split(3)


# ---------------------------------------------------------------------------------------------- rejections


def _one_split(tmp_path: Path, train_lines: list[str], test_lines: list[str] = ()) -> Path:
    d = tmp_path / "splits"
    d.mkdir(exist_ok=True)
    (d / "classInd.txt").write_text("1 Walk\n2 Run\n")
    (d / "trainlist01.txt").write_text("".join(f"{x}\n" for x in train_lines))
    (d / "testlist01.txt").write_text("".join(f"{x}\n" for x in test_lines))
    return d


@pytest.mark.parametrize(
    "line, message",
    [
        ("../outside.avi 1", r"trainlist01\.txt:2: path '\.\./outside\.avi' escapes the dataset root"),
        ("Walk/../../outside.avi 1", r"trainlist01\.txt:2: .*escapes the dataset root"),
        ("{abs} 1", r"trainlist01\.txt:2: absolute path .* is not allowed"),
        ("Walk/link.avi 1", r"trainlist01\.txt:2: Walk/link\.avi is a link to .*outside the dataset root"),
        ("Walk/linkdir/v.avi 1", r"trainlist01\.txt:2: .* is a link to .*outside the dataset root"),
    ],
)
def test_paths_escaping_the_root_are_rejected(tmp_path, line, message):
    root = tmp_path / "root"
    outside = _touch(tmp_path / "outside.avi")
    _touch(tmp_path / "elsewhere" / "v.avi")
    _touch(root / "Walk" / "ok.avi")
    os.symlink(outside, root / "Walk" / "link.avi")
    os.symlink(tmp_path / "elsewhere", root / "Walk" / "linkdir")
    _one_split(root, ["Walk/ok.avi 1", line.format(abs=outside)])
    with pytest.raises(ManifestError, match=message) as e:
        load_manifest(root)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_escapes_rejected_in_csv_and_folders(tmp_path):
    root = tmp_path / "root"
    outside = _touch(tmp_path / "outside.avi")
    _touch(root / "Walk" / "ok.avi")
    (root / "manifest.csv").write_text("Walk/ok.avi,Walk\n../outside.avi,Walk\n")
    with pytest.raises(ManifestError, match=r"manifest\.csv:2: .*escapes the dataset root"):
        load_manifest(root)
    (root / "manifest.csv").unlink()
    os.symlink(outside, root / "Walk" / "link.avi")
    with pytest.raises(ManifestError, match=r"Walk/link\.avi is a link to .*outside"):
        load_manifest(root)


def test_symlink_inside_the_root_is_fine(tmp_path):
    _touch(tmp_path / "store" / "real.avi")
    (tmp_path / "Walk").mkdir()
    os.symlink(tmp_path / "store" / "real.avi", tmp_path / "Walk" / "alias.avi")
    _one_split(tmp_path, ["Walk/alias.avi 1"])
    (v,) = load_manifest(tmp_path).videos
    assert v.id == "Walk/alias.avi" and v.path == (tmp_path / "store" / "real.avi").resolve()


def test_missing_files_are_an_error_naming_them(tmp_path):
    _touch(tmp_path / "Walk" / "v_Walk_g01_c01.avi")
    lines = ["Walk/v_Walk_g01_c01.avi 1"] + [f"Walk/gone{i}.avi 1" for i in range(8)]
    _one_split(tmp_path, lines, ["Walk/gone0.avi"])  # also in test: counted once
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path)
    msg = str(e.value)
    assert msg.startswith("8 videos listed in the split files in ")
    assert "Walk/gone0.avi (" in msg and "trainlist01.txt:2" in msg and "and 3 more" in msg


@pytest.mark.parametrize(
    "class_ind, train, test, message",
    [
        ("1 Walk\n2 Run\n", ["Walk/a.avi 1", "Walk/a.avi 1"], [], r"trainlist01\.txt:2: Walk/a\.avi is listed twice"),
        ("1 Walk\n2 Run\n", ["Walk/a.avi 1"], ["walk/A.AVI"], r"testlist01\.txt:1: Walk/a\.avi is listed twice"),
        ("1 Walk\n2 Run\n", ["Jump/a.avi 1"], [], r"trainlist01\.txt:1: class folder 'Jump' is not in classInd"),
        ("1 Walk\n2 Run\n", ["Walk/a.avi 2"], [], r"trainlist01\.txt:1: label 2 \(Run\) disagrees"),
        ("1 Walk\n2 Run\n", ["Walk/a.avi 7"], [], r"trainlist01\.txt:1: label 7 is outside"),
        ("1 Walk\nRun\n", ["Walk/a.avi 1"], [], r"classInd\.txt:2: expected '<index> <ClassName>'"),
        ("1 Walk\n1 Run\n", ["Walk/a.avi 1"], [], r"classInd\.txt:2: duplicate class"),
        ("1 Walk\n3 Run\n", ["Walk/a.avi 1"], [], r"class indices must be 1\.\.2"),
    ],
)
def test_bad_list_files(tmp_path, class_ind, train, test, message):
    _touch(tmp_path / "Walk" / "a.avi")
    d = _one_split(tmp_path, train, test)
    (d / "classInd.txt").write_text(class_ind)
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path)


def test_bad_roots_and_split_dirs(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match="split folder .* does not exist"):
        load_manifest(tmp_path, split_dir=tmp_path / "nope")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "readme.txt").write_text("hi")
    with pytest.raises(ManifestError, match="no split files found"):
        load_manifest(tmp_path)
    (tmp_path / "splits" / "classInd.txt").write_text("1 Walk\n")
    (tmp_path / "splits" / "trainlist01.txt").write_text("")
    with pytest.raises(ManifestError, match="split 1 has a trainlist but no testlist"):
        load_manifest(tmp_path)
    (tmp_path / "splits" / "classInd.txt").write_bytes(b"1 Caf\xe9\n")
    with pytest.raises(ManifestError, match=r"classInd\.txt: not UTF-8"):
        load_manifest(tmp_path)


def test_hmdb51_clips_of_one_source_video_share_a_group_and_a_side(tmp_path):
    """HMDB51 cuts several clips from one source video (``<source>_<action>_<tags>_<clip>.avi``, Kuehne et al.
    2011); a validation split carved by video would put clips of one source on both sides."""
    from pipeline.features import carve_validation

    d = tmp_path / "testTrainMulti_7030_splits"
    d.mkdir()
    sources = {}
    for cls in ("brush_hair", "dribble"):
        lines = []
        for s in range(6):
            src = f"{cls.title()}_Movie_{s}_-_Part_{s % 2}"
            for clip, tags in enumerate(("u_nm_np1_fr_goo", "f_cm_np2_le_med", "h_nm_np1_ri_bad")):
                name = f"{src}_{cls}_{tags}_{clip}.avi"
                _touch(tmp_path / cls / name)
                lines.append(f"{name} {2 if s == 0 else 1}")
                sources[f"{cls}/{name}"] = src
        (d / f"{cls}_test_split1.txt").write_text("\n".join(lines) + "\n")
    m = load_manifest(tmp_path)
    assert {v.id: v.group for v in m.videos} == sources
    train, _ = m.split(1)
    for seed in range(5):
        tr, val = carve_validation(train, 0.3, seed)
        assert val and not {v.group for v in tr} & {v.group for v in val}, seed
        assert len(val) % 3 == 0  # whole sources of three clips


def test_hmdb_group_cuts_multi_word_actions_and_keeps_other_names():
    from pipeline.datasets import hmdb_group

    assert hmdb_group("dribble/Basketball_Dribbling_-_Basics_dribble_f_cm_np1_ba_med_0.avi", "dribble") == \
        "Basketball_Dribbling_-_Basics"
    assert hmdb_group("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_2.avi", "brush_hair") == "April_09"
    assert hmdb_group("x/v_Jump_g03_c01.avi", "x") == "Jump_g03" and hmdb_group("x/clip.avi", "x") == "x/clip.avi"
