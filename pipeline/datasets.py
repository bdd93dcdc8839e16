"""Dataset manifests: a video root plus list files, read into one structure.

Four input layouts end in the same :class:`Manifest` (video ids, labels, class names, split membership):

``ucf101``  split files in ``ROOT/splits/``, ``ROOT/ucfTrainTestlist/`` or ``split_dir``: ``classInd.txt``
            ("1 ApplyEyeMakeup"), ``trainlistNN.txt`` ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1") and
            ``testlistNN.txt`` (path only; the label comes from the class folder). Class folders are matched to
            classInd names case-insensitively, because the real lists say "HandStandPushups" where the folder
            says "HandstandPushups"; files are found case-insensitively too. CRLF line endings and a BOM are fine.
``hmdb51``  per-class split files ``<class>_test_split<N>.txt`` (same search places; HMDB51's own folder name
            ``testTrainMulti_7030_splits`` is searched as well) with lines "video.avi 1|2|0": 1 train, 2 test,
            0 not used in that split. Videos live in ``ROOT/<class>/``. Classes are sorted by name (HMDB51 has
            no classInd). A video marked 0 in every split is not in the manifest.
``csv``     ``path,label[,split]`` (``csv=FILE``, ``ROOT/manifest.csv``, or ``load_manifest("x.csv")`` whose
            folder is the root). An optional header row names the columns. Labels are class names; classes
            are sorted (numerically when every name is an integer). ``split`` is ``train`` or ``test`` and
            defines split 1; an empty value leaves the video out of the split. A label cell may name several
            classes, ``label1|label2`` (multi-label data such as Sports-1M or YouTube-8M): the dataset is then
            multi-label (:attr:`Manifest.multi_label`), every video carries all its classes in ``labels`` and
            its first listed class in ``label`` (used to balance splits by class).
``folders`` one folder per class, videos anywhere below it (extensions in :data:`VIDEO_EXTENSIONS`);
            classes are the sorted folder names that hold at least one video. Files directly in ROOT are ignored.

Decisions a user should know about:

- A video id is the path relative to the root, POSIX separators, with its extension, spelled as on disk
  (so ``a.avi`` and ``a.mp4`` are two videos and the id does not depend on a list file's letter case).
- Paths in list files must stay under the root: ``..`` components, absolute paths and symlinks that resolve
  outside the root are rejected with the file and line.
- A list file that references missing videos is an error (naming how many and the first few), not a silent
  skip: a run over a partial download would otherwise report numbers on a different dataset.
- Layouts without split information (CSV without a split column, folders) have ``splits == {}``;
  :meth:`Manifest.split` then says so, and :meth:`Manifest.with_group_split` makes a seeded group-aware one.
- Groups: a UCF101-style file name ``v_<Class>_g<GG>_c<CC>`` gives group ``<Class>_g<GG>`` (clips of one
  group share actor and background, so they must not straddle train and test), whatever the layout. In the
  HMDB51 layout a name ``<source>_<action>_<body>_<camera>_<people>_<view>_<quality>_<clip>`` (Kuehne et al.
  2011: ``Basketball_Dribbling_-_Basics_dribble_f_cm_np1_ba_med_0.avi``) gives group ``<source>``: the clips
  cut from one source video. Any other video is its own group.

Explicit arguments win over detection: ``csv=``, then ``split_dir=``, then ``ROOT/splits`` /
``ROOT/ucfTrainTestlist`` / ``ROOT/testTrainMulti_7030_splits``, then ``ROOT/manifest.csv``, then folders.
"""

from __future__ import annotations

import csv as csvlib
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from pipeline.errors import UserError

__all__ = [
    "SPLIT_DIR_NAMES",
    "VIDEO_EXTENSIONS",
    "Manifest",
    "ManifestError",
    "VideoItem",
    "hmdb_group",
    "load_manifest",
    "ucf_group",
]

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v")
SPLIT_DIR_NAMES = ("splits", "ucfTrainTestlist", "testTrainMulti_7030_splits")
_UCF_NAME = re.compile(r"^v_(?P<cls>.+)_g(?P<g>\d+)_c(?P<c>\d+)$")
# HMDB51's meta tags after "<source>_<action>": visible body part, camera motion, people, viewpoint, quality, clip
_HMDB_NAME = re.compile(r"^(?P<head>.+)_[fhlu]_(?:cm|nm)_np\d+_(?:fr|ba|le|ri)_(?:bad|med|goo)_\d+$", re.IGNORECASE)
_UCF_LIST = re.compile(r"^(?P<kind>train|test)list(?P<n>\d+)\.txt$", re.IGNORECASE)
_HMDB_LIST = re.compile(r"^(?P<cls>.+)_test_split(?P<n>\d+)\.txt$", re.IGNORECASE)
_MAX_LISTED = 5  # missing files named in an error message


class ManifestError(UserError):
    """A dataset root or list file that cannot be read into a manifest: one line, with file:line where there is one."""


@dataclass(frozen=True)
class VideoItem:
    id: str  # path relative to the root, POSIX separators, with extension, spelled as on disk
    path: Path  # absolute, resolved
    label: int  # index into Manifest.classes
    group: str  # "Class_gGG" for UCF101-style names, the source video for HMDB51 clips, else the id
    labels: tuple[int, ...] = ()  # multi-label data: every class of the video, sorted; () for single-label data


@dataclass
class Manifest:
    root: Path
    classes: list[str]
    videos: list[VideoItem]  # every video of every split, sorted by id
    splits: dict[int, dict[str, str]] = field(default_factory=dict)  # split -> {id: "train" | "test"}
    source: str = "folders"  # "ucf101" | "hmdb51" | "csv" | "folders"

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def multi_label(self) -> bool:
        """True when videos carry several classes (a CSV with ``label1|label2`` cells)."""
        return any(v.labels for v in self.videos)

    def by_id(self) -> dict[str, VideoItem]:
        return {v.id: v for v in self.videos}

    def split(self, n: int) -> tuple[list[VideoItem], list[VideoItem]]:
        """(train, test) videos of split ``n``, each sorted by id."""
        if not self.splits:
            raise ManifestError(
                f"the {self.source} dataset at {self.root} defines no train/test split; add split files "
                "(ucfTrainTestlist/ or splits/) or a split column to the CSV (library: Manifest.with_group_split)"
            )
        if n not in self.splits:
            have = ", ".join(str(k) for k in sorted(self.splits))
            raise ManifestError(f"split {n} is not defined for {self.root}; splits: {have}")
        membership = self.splits[n]
        train = [v for v in self.videos if membership.get(v.id) == "train"]
        test = [v for v in self.videos if membership.get(v.id) == "test"]
        return train, test

    def fingerprint(self) -> str:
        """Stable hash of classes, (id, label) pairs and splits; independent of where the root lives."""
        payload = {
            "classes": self.classes,
            "videos": [[v.id, v.label] for v in self.videos],
            "splits": {str(k): sorted(s.items()) for k, s in sorted(self.splits.items())},
        }
        if self.multi_label:  # single-label manifests keep the fingerprint they always had
            payload["labels"] = [[v.id, list(v.labels)] for v in self.videos]
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_group_split(self, test_fraction: float = 0.3, seed: int = 0, n: int = 1) -> Manifest:
        """A copy with split ``n`` made by sending whole groups of each class to test (seeded, stable).

        For layouts that carry no split (folders, CSV without a split column). Per class, about
        ``test_fraction`` of its groups go to test, at least one when the class has two or more groups.
        """
        if not 0 < test_fraction < 1:
            raise ManifestError(f"test_fraction must be in (0, 1), got {test_fraction}")
        groups_of: dict[int, set[str]] = {}
        for v in self.videos:
            groups_of.setdefault(v.label, set()).add(v.group)
        test_groups: set[tuple[int, str]] = set()
        for label, group_set in sorted(groups_of.items()):
            groups = sorted(group_set)
            random.Random(f"{seed}:{self.classes[label]}").shuffle(groups)  # str seeds are stable across runs
            k = round(test_fraction * len(groups))
            k = min(max(k, 1 if len(groups) > 1 else 0), len(groups) - 1)
            test_groups.update((label, g) for g in groups[:k])
        membership = {v.id: "test" if (v.label, v.group) in test_groups else "train" for v in self.videos}
        return replace(self, splits={**self.splits, n: membership})


def ucf_group(video_id: str) -> str:
    """Group "Class_gGG" of a UCF101-style name ``.../v_Class_gGG_cCC.ext``; otherwise the id itself."""
    m = _UCF_NAME.match(PurePosixPath(video_id).stem)
    return f"{m['cls']}_g{m['g']}" if m else video_id


def hmdb_group(video_id: str, action: str) -> str:
    """Source video of an HMDB51 clip ``.../<source>_<action>_<tags>_<clip>.avi`` (the class ``action`` is cut
    off the end, however many words it has); a UCF101-style group or the id itself for other names."""
    m = _HMDB_NAME.match(PurePosixPath(video_id).stem)
    if not m:
        return ucf_group(video_id)
    head = m["head"]
    suffix = "_" + action
    if head.lower().endswith(suffix.lower()) and len(head) > len(suffix):
        return head[: -len(suffix)]
    return head.rsplit("_", 1)[0] if "_" in head else head  # a one-word action label other than the class name


def load_manifest(
    root: str | os.PathLike, split_dir: str | os.PathLike | None = None, csv: str | os.PathLike | None = None
) -> Manifest:
    """Read a dataset root into a :class:`Manifest`; see the module docstring for layouts and detection order."""
    root = Path(root).expanduser()
    if csv is None and root.is_file() and root.suffix.lower() == ".csv":
        root, csv = root.parent, root
    if not root.exists():
        raise ManifestError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise ManifestError(f"dataset root {root} is not a folder (give a video folder or a .csv)")
    resolver = _Resolver(root)
    if csv is not None:
        csv = Path(csv).expanduser()
        if not csv.is_file():
            raise ManifestError(f"CSV file {csv} does not exist")
        return _read_csv(resolver, csv)
    if split_dir is not None:
        split_dir = Path(split_dir).expanduser()
        if not split_dir.is_dir():
            raise ManifestError(f"split folder {split_dir} does not exist")
        return _read_split_dir(resolver, split_dir)
    for name in SPLIT_DIR_NAMES:
        if (root / name).is_dir():
            return _read_split_dir(resolver, root / name)
    if (root / "manifest.csv").is_file():
        return _read_csv(resolver, root / "manifest.csv")
    return _read_folders(resolver)


# ---------------------------------------------------------------------------------------------- paths


class _Resolver:
    """Turns list-file paths into (id, absolute path) under one root, rejecting escapes; case-insensitive lookup.

    Works on strings with one directory listing per folder and one lstat per video, because UCF101's three splits
    name 13,320 videos 40,000 times and pathlib per component is slow.
    """

    def __init__(self, root: Path):
        self.root = root.resolve()
        self._root = str(self.root)
        self._listing: dict[str, tuple[set[str], dict[str, list[str]]]] = {}  # folder -> (names, lower -> names)
        self._real_dir: dict[str, str] = {}  # folder as spelled -> its resolved path
        self._done: dict[str, tuple[str, Path] | None] = {}
        self.missing: list[tuple[str, str]] = []  # (path as written, "file:line")

    def _lookup(self, folder: str, name: str) -> str | None:
        if folder not in self._listing:
            try:
                names = os.listdir(folder)
            except OSError:  # missing, or a file where a folder was expected
                names = []
            lower: dict[str, list[str]] = {}
            for n in names:
                lower.setdefault(n.lower(), []).append(n)
            self._listing[folder] = (set(names), lower)
        names, lower = self._listing[folder]
        if name in names:
            return name
        hits = lower.get(name.lower(), [])
        return hits[0] if len(hits) == 1 else None

    def check(self, rel: str, where: str) -> str:
        """Validate a path from a list file; returns it normalised ('a/b.avi': no '.', POSIX) or raises."""
        text = rel.strip().replace("\\", "/")
        if not text:
            raise ManifestError(f"{where}: empty path")
        if text.startswith("/") or re.match(r"^[A-Za-z]:/", text):
            raise ManifestError(f"{where}: absolute path {rel!r} is not allowed; paths are relative to {self.root}")
        parts = [p for p in text.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ManifestError(f"{where}: path {rel!r} escapes the dataset root {self.root} ('..' is not allowed)")
        if not parts:
            raise ManifestError(f"{where}: path {rel!r} names the root itself")
        return "/".join(parts)

    def resolve(self, rel: str, where: str) -> tuple[str, Path] | None:
        """(id spelled as on disk, absolute resolved path) of a checked path; None (noted in ``missing``) if absent."""
        if rel in self._done:
            if self._done[rel] is None:
                self.missing.append((rel, where))
            return self._done[rel]
        folder, spelled = self._root, []
        for part in rel.split("/"):
            hit = self._lookup(folder, part)
            if hit is None:
                self.missing.append((rel, where))
                self._done[rel] = None
                return None
            spelled.append(hit)
            folder = f"{folder}/{hit}"
        parent = folder.rsplit("/", 1)[0]
        if parent not in self._real_dir:
            self._real_dir[parent] = os.path.realpath(parent)
        real = f"{self._real_dir[parent]}/{spelled[-1]}"
        if os.path.islink(real):
            real = os.path.realpath(real)
        if not (real + "/").startswith(self._root + "/"):
            raise ManifestError(f"{where}: {rel} is a link to {real}, outside the dataset root {self.root}")
        if not os.path.isfile(real):
            raise ManifestError(f"{where}: {rel} is not a file")
        self._done[rel] = ("/".join(spelled), Path(real))
        return self._done[rel]

    def raise_missing(self, what: str) -> None:
        if not self.missing:
            return
        first: dict[str, str] = {}
        for p, w in self.missing:  # a video missing from three splits counts once
            first.setdefault(p, w)
        self.missing = list(first.items())
        shown = ", ".join(f"{p} ({w})" for p, w in self.missing[:_MAX_LISTED])
        more = f" and {len(self.missing) - _MAX_LISTED} more" if len(self.missing) > _MAX_LISTED else ""
        raise ManifestError(f"{len(self.missing)} videos listed in {what} are missing under {self.root}: {shown}{more}")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of non-blank lines; tolerates CRLF and a UTF-8 BOM."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e.strerror})") from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _items(rows: dict[str, tuple[Path, int]]) -> list[VideoItem]:
    return [VideoItem(id=i, path=p, label=lab, group=ucf_group(i)) for i, (p, lab) in sorted(rows.items())]


# ---------------------------------------------------------------------------------------------- layouts


def _read_split_dir(res: _Resolver, split_dir: Path) -> Manifest:
    names = sorted(p.name for p in split_dir.iterdir() if p.is_file())
    if any(n.lower() == "classind.txt" for n in names) or any(_UCF_LIST.match(n) for n in names):
        return _read_ucf(res, split_dir, names)
    if any(_HMDB_LIST.match(n) for n in names):
        return _read_hmdb(res, split_dir, names)
    raise ManifestError(
        f"{split_dir}: no split files found (expected UCF101 classInd.txt + trainlistNN.txt/testlistNN.txt, "
        "or HMDB51 <class>_test_splitN.txt)"
    )


def _read_ucf(res: _Resolver, split_dir: Path, names: list[str]) -> Manifest:
    """UCF101 (Soomro et al. 2012) split layout; the three official splits are trainlist0N/testlist0N."""
    class_file = next((split_dir / n for n in names if n.lower() == "classind.txt"), None)
    if class_file is None:
        raise ManifestError(f"{split_dir}: classInd.txt is missing (lines like '1 ApplyEyeMakeup')")
    index_of: dict[int, str] = {}
    for ln, line in _read_lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ManifestError(f"{class_file}:{ln}: expected '<index> <ClassName>', got {line!r}")
        k, name = int(parts[0]), parts[1]
        if k in index_of or name.lower() in (c.lower() for c in index_of.values()):
            raise ManifestError(f"{class_file}:{ln}: duplicate class index or name {line!r}")
        index_of[k] = name
    if sorted(index_of) != list(range(1, len(index_of) + 1)):
        raise ManifestError(f"{class_file}: class indices must be 1..{len(index_of)} without gaps")
    classes = [index_of[k] for k in range(1, len(index_of) + 1)]
    label_of = {c.lower(): i for i, c in enumerate(classes)}

    lists: dict[int, dict[str, Path]] = {}
    for n in names:
        m = _UCF_LIST.match(n)
        if m:
            lists.setdefault(int(m["n"]), {})[m["kind"].lower()] = split_dir / n
    if not lists:
        raise ManifestError(f"{split_dir}: no trainlistNN.txt / testlistNN.txt next to classInd.txt")
    for n, pair in sorted(lists.items()):
        if set(pair) != {"train", "test"}:
            have = next(iter(pair))
            raise ManifestError(
                f"{split_dir}: split {n} has a {have}list but no {'test' if have == 'train' else 'train'}list"
            )

    rows: dict[str, tuple[Path, int]] = {}
    splits: dict[int, dict[str, str]] = {}
    for n, pair in sorted(lists.items()):
        membership: dict[str, str] = {}
        seen: dict[str, str] = {}  # id -> where first listed in this split
        for kind in ("train", "test"):
            for ln, line in _read_lines(pair[kind]):
                where = f"{pair[kind]}:{ln}"
                path_text, label_text = _split_label(line)
                rel = res.check(path_text, where)
                label = _ucf_label(rel, label_text, label_of, classes, where)
                found = res.resolve(rel, where)
                if found is None:
                    continue
                vid, real = found
                if vid in seen:
                    raise ManifestError(f"{where}: {vid} is listed twice in split {n} (first at {seen[vid]})")
                seen[vid] = where
                if vid in rows and rows[vid][1] != label:
                    raise ManifestError(
                        f"{where}: {vid} has label {classes[label]} here but {classes[rows[vid][1]]} in another split"
                    )
                rows[vid] = (real, label)
                membership[vid] = kind
        splits[n] = membership
    res.raise_missing(f"the split files in {split_dir}")
    return Manifest(root=res.root, classes=classes, videos=_items(rows), splits=splits, source="ucf101")


def _split_label(line: str) -> tuple[str, str | None]:
    """'path 12' -> ('path', '12'); 'path' -> ('path', None)."""
    parts = line.rsplit(None, 1)
    if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
        return parts[0], parts[1]
    return line, None


def _ucf_label(rel: str, label_text: str | None, label_of: dict[str, int], classes: list[str], where: str) -> int:
    """Label from the class folder (case-insensitive), else the file name's v_<Class>_..., checked against the column."""
    from_name = None
    if "/" in rel:
        folder = rel.split("/", 1)[0]
        if folder.lower() not in label_of:
            raise ManifestError(f"{where}: class folder {folder!r} is not in classInd.txt")
        from_name = label_of[folder.lower()]
    else:
        m = _UCF_NAME.match(PurePosixPath(rel).stem)
        if m and m["cls"].lower() in label_of:
            from_name = label_of[m["cls"].lower()]
    from_column = None
    if label_text is not None:
        k = int(label_text)
        if not 1 <= k <= len(classes):
            raise ManifestError(f"{where}: label {k} is outside classInd's 1..{len(classes)}")
        from_column = k - 1
    if from_name is not None and from_column is not None and from_name != from_column:
        raise ManifestError(
            f"{where}: label {from_column + 1} ({classes[from_column]}) disagrees with the class folder "
            f"{classes[from_name]} ({from_name + 1})"
        )
    label = from_name if from_name is not None else from_column
    if label is None:
        raise ManifestError(f"{where}: cannot tell the class of {rel}: no class folder, no label column")
    return label


def _read_hmdb(res: _Resolver, split_dir: Path, names: list[str]) -> Manifest:
    """HMDB51 (Kuehne et al. 2011) per-class split files: 1 train, 2 test, 0 unused in that split."""
    files: dict[tuple[str, int], Path] = {}
    for n in names:
        m = _HMDB_LIST.match(n)
        if m:
            files[(m["cls"], int(m["n"]))] = split_dir / n
    classes = sorted({c for c, _ in files})
    rows: dict[str, tuple[Path, int]] = {}
    splits: dict[int, dict[str, str]] = {}
    for (cls, n), path in sorted(files.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        membership = splits.setdefault(n, {})
        seen: dict[str, int] = {}
        for ln, line in _read_lines(path):
            where = f"{path}:{ln}"
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ManifestError(f"{where}: expected '<video> 0|1|2', got {line!r}")
            name, tag = parts
            if name in seen:
                raise ManifestError(f"{where}: {name} is listed twice (first at line {seen[name]})")
            seen[name] = ln
            if tag == "0":  # not used in this split
                continue
            rel = res.check(name, where)
            if "/" not in rel:  # HMDB lists name the file only; it lives in its class folder
                rel = f"{cls}/{rel}"
            found = res.resolve(rel, where)
            if found is None:
                continue
            vid, real = found
            if vid in membership:
                raise ManifestError(f"{where}: {vid} appears in split {n} of two classes")
            label = classes.index(cls)
            if vid in rows and rows[vid][1] != label:
                raise ManifestError(f"{where}: {vid} is listed under {cls} and {classes[rows[vid][1]]}")
            rows[vid] = (real, label)
            membership[vid] = "train" if tag == "1" else "test"
    res.raise_missing(f"the split files in {split_dir}")
    videos = [replace(v, group=hmdb_group(v.id, classes[v.label])) for v in _items(rows)]
    return Manifest(root=res.root, classes=classes, videos=videos, splits=splits, source="hmdb51")


def _read_csv(res: _Resolver, path: Path) -> Manifest:
    """``path,label[,split]`` rows; optional header; labels are class names."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows_in = [(i, r) for i, r in enumerate(csvlib.reader(text.splitlines()), 1) if any(c.strip() for c in r)]
    if not rows_in:
        raise ManifestError(f"{path}: empty CSV (expected rows 'path,label[,split]')")
    columns = ["path", "label", "split"]
    first = [c.strip().lower() for c in rows_in[0][1]]
    if "path" in first and "label" in first:
        unknown = [c for c in first if c not in columns]
        if unknown:
            raise ManifestError(
                f"{path}:{rows_in[0][0]}: unknown column {unknown[0]!r}; columns are path,label[,split]"
            )
        columns, rows_in = first, rows_in[1:]
    width = None
    entries: list[tuple[str, str, str | None, str]] = []  # (path, label, split, where)
    for ln, row in rows_in:
        where = f"{path}:{ln}"
        cells = [c.strip() for c in row]
        if width is None:
            width = len(cells)
            if width not in (2, 3) or (width > len(columns)):
                raise ManifestError(f"{where}: expected 'path,label[,split]', got {len(cells)} columns")
            columns = columns[:width]
        if len(cells) != width:
            raise ManifestError(f"{where}: expected {width} columns like the first row, got {len(cells)}")
        cell = dict(zip(columns, cells))
        if not cell["label"]:
            raise ManifestError(f"{where}: empty label")
        if "|" in cell["label"] and not all(p.strip() for p in cell["label"].split("|")):
            raise ManifestError(f"{where}: empty class name in the labels {cell['label']!r} (write 'a|b')")
        split = cell.get("split")
        if split is not None:
            split = split.lower()
            if split not in ("train", "test", ""):
                raise ManifestError(f"{where}: split must be 'train' or 'test', got {cell['split']!r}")
        entries.append((cell["path"], cell["label"], split, where))
    multi = any("|" in e[1] for e in entries)
    listed = {e[3]: [p.strip() for p in e[1].split("|")] if multi else [e[1]] for e in entries}
    names = sorted({n for ns in listed.values() for n in ns})
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        names.sort(key=int)
    label_of = {n: i for i, n in enumerate(names)}
    labels_of: dict[str, tuple[int, ...]] = {}

    rows: dict[str, tuple[Path, int]] = {}
    membership: dict[str, str] = {}
    seen: dict[str, str] = {}
    for path_text, _label, split, where in entries:
        found = res.resolve(res.check(path_text, where), where)
        if found is None:
            continue
        vid, real = found
        if vid in seen:
            raise ManifestError(f"{where}: {vid} is listed twice (first at {seen[vid]})")
        seen[vid] = where
        rows[vid] = (real, label_of[listed[where][0]])
        if multi:
            labels_of[vid] = tuple(sorted({label_of[n] for n in listed[where]}))
        if split:
            membership[vid] = split
    res.raise_missing(str(path))
    has_split = "split" in columns
    videos = [replace(v, labels=labels_of[v.id]) for v in _items(rows)] if multi else _items(rows)
    return Manifest(
        root=res.root, classes=names, videos=videos, splits={1: membership} if has_split else {}, source="csv"
    )


def _read_folders(res: _Resolver) -> Manifest:
    """One folder per class; every video file below it (any depth) belongs to that class."""
    root = res.root
    found: dict[str, list[tuple[str, Path]]] = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            real_dir = os.path.realpath(dirpath)  # once per folder: a linked folder resolves here
            for f in sorted(filenames):
                if f.startswith(".") or os.path.splitext(f)[1].lower() not in VIDEO_EXTENSIONS:
                    continue
                real = os.path.join(real_dir, f)
                if os.path.islink(real):
                    real = os.path.realpath(real)
                vid = Path(dirpath, f).relative_to(root).as_posix()
                if not (real + "/").startswith(f"{root}/"):
                    raise ManifestError(f"{vid} is a link to {real}, outside the dataset root {root}")
                if os.path.isfile(real):  # a dangling link is skipped like any non-video
                    found.setdefault(class_dir.name, []).append((vid, Path(real)))
    if not found:
        raise ManifestError(
            f"{root}: no videos found ({'/'.join(e.lstrip('.') for e in VIDEO_EXTENSIONS)} files in one folder per "
            f"class), and no split files ({', '.join(SPLIT_DIR_NAMES)}) or manifest.csv"
        )
    classes = sorted(found)
    rows = {vid: (real, classes.index(c)) for c in classes for vid, real in found[c]}
    return Manifest(root=root, classes=classes, videos=_items(rows), splits={}, source="folders")
