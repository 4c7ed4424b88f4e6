"""Patient-safe splits: groups from file names or a manifest column stay whole in the carved val split,
groups found in two given splits are reported, and splits.csv records (and restores) a split."""

import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xraylens.config import RunConfig
from xraylens.data.sources import load_source
from xraylens.data.splits import apply_splits, read_splits_csv, write_splits_csv
from xraylens.errors import XraylensError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pneumonia_resnet101_cam.yaml"


def _splits_of_groups(src) -> dict[str, set[str]]:
    where = defaultdict(set)
    for r in src.records:
        if r.group is not None:
            where[r.group].add(r.split)
    return where


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((5, 6), value, np.uint8)).save(path)
    return path


def _knee_manifest(tmp_path: Path, fixture_dir: Path, split_of=None) -> Path:
    """A manifest over the real knee fixture (40 images, 5 grades of 8): patient p<grade>-<n> has two
    knees of one grade, and patient "both" has one knee of grade 0 and one of grade 1."""
    rows = []
    for grade in range(5):
        files = sorted((fixture_dir / "knee_kl" / str(grade)).iterdir())
        for i, f in enumerate(files):
            pid = "both" if (grade, i) in ((0, 7), (1, 7)) else f"p{grade}-{i // 2}"
            rows.append([str(f), str(grade), pid, str(50 + i)])
    rows[3][2] = ""  # one image without a patient id: a group of its own, counted
    header = ["path", "label", "patient_id", "age"]
    if split_of is not None:
        header.append("split")
        rows = [r + [split_of(r)] for r in rows]
    path = tmp_path / "knee.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def test_shipped_pneumonia_pattern_names_patients(fixture_dir):
    pattern = RunConfig.load(CONFIG).data.group_pattern
    src = load_source(fixture_dir / "pneumonia", group_pattern=pattern)
    by_name = {Path(r.path).name: r.group for r in src.records}
    assert by_name["person1171_bacteria_3118.jpeg"] == "person1171"
    assert by_name["person109_virus_203.jpeg"] == "person109"
    assert by_name["IM-0382-0001.jpeg"] == "IM-0382"
    # NORMAL2-IM-1258 contains "IM-1258": anchored at the start, it is its own patient
    assert by_name["NORMAL2-IM-1258-0001-0002.jpeg"] == "NORMAL2-IM-1258"
    assert src.split_info["groups"] == {"pattern": pattern, "n_groups": 20, "unmatched": 0, "examples_unmatched": []}


def test_shipped_pneumonia_pattern_covers_the_real_training_set(shared_data):
    folder = shared_data / "pneumonia"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    pattern = RunConfig.load(CONFIG).data.group_pattern
    src = load_source(folder, group_pattern=pattern, seed=0)  # file names only: nothing is decoded
    g = src.split_info["groups"]
    assert g["unmatched"] == 0 and g["n_groups"] > 2000  # 5,216 images of 2,846 patients
    assert all(len(s) == 1 for s in _splits_of_groups(src).values())
    assert src.split_info["leaked_groups"] == {"n": 0, "groups": {}}
    # the per-image split it replaces does put patients in both train and val
    plain = load_source(folder, seed=0)
    rx = re.compile(pattern)
    where = defaultdict(set)
    for r in plain.records:
        where[rx.search(Path(r.path).name).group(1)].add(r.split)
    assert sum(len(s) > 1 for s in where.values()) > 100


@pytest.mark.parametrize("seed", range(5))
def test_grouped_split_keeps_patients_whole_on_real_names(fixture_dir, seed):
    # a coarser pattern on the real fixture names gives groups of several images: person1* (4 files),
    # NORMAL2 (5), IM (5), ...
    src = load_source(fixture_dir / "pneumonia", group_pattern=r"^(person\d|NORMAL2|IM)", val_fraction=0.3, seed=seed)
    assert src.split_info["groups"]["n_groups"] == 8
    where = _splits_of_groups(src)
    assert len(where) == 8 and all(len(s) == 1 for s in where.values())
    # NORMAL is two groups of 5: one goes to val whole, one stays in train whole
    normal = [r for r in src.records if src.classes[r.label] == "NORMAL"]
    assert sorted(sum(r.split == s for r in normal) for s in ("train", "val")) == [5, 5]
    assert {r.label for r in src.split("val")} == {0, 1} and {r.label for r in src.split("train")} == {0, 1}
    assert src.split_info["val"]["n"] == len(src.split("val"))
    assert src.split_info["val"]["n_groups"] == len({r.group for r in src.split("val")})
    again = load_source(fixture_dir / "pneumonia", group_pattern=r"^(person\d|NORMAL2|IM)", val_fraction=0.3, seed=seed)
    assert [r.id for r in again.split("val")] == [r.id for r in src.split("val")]


def test_manifest_group_column_keeps_patients_whole(tmp_path, fixture_dir, caplog):
    path = _knee_manifest(tmp_path, fixture_dir)
    vals = set()
    for seed in range(4):
        with caplog.at_level("WARNING", logger="xraylens.data"):
            src = load_source(path, group_column="Patient_ID", val_fraction=0.25, seed=seed)  # any case
        assert all(len(s) == 1 for s in _splits_of_groups(src).values())
        by_id = {r.id: r for r in src.records}
        both = [r for r in src.records if r.group == "both"]
        assert len(both) == 2 and both[0].split == both[1].split
        # every grade keeps training images and gives some to val, about a quarter of it
        per_val = np.bincount([r.label for r in src.split("val")], minlength=5)
        assert (per_val >= 1).all() and (per_val <= 4).all()
        assert {r.label for r in src.split("train")} == set(range(5))
        vals.add(tuple(sorted(r.id for r in src.split("val"))))
    g = src.split_info["groups"]
    assert g["column"] == "Patient_ID" and g["unmatched"] == 1 and g["n_groups"] == 21
    assert g["examples_unmatched"] == [sorted((fixture_dir / "knee_kl" / "0").iterdir())[3].as_posix()]
    assert "1 of 40 images" in caplog.text
    # the patient id is an identifier, not a clinical feature
    r = next(iter(by_id.values()))
    assert r.clinical == {"age": r.clinical["age"]}
    assert len(vals) > 1  # the seed changes the split


def test_given_splits_report_leaked_groups(tmp_path, fixture_dir, caplog):
    # patients p0-0 and p3-1 have one knee in train and one in test; "both" straddles train and val
    def split_of(row):
        pid, n = row[2], int(row[3]) - 50
        if pid in ("p0-0", "p3-1"):
            return "train" if n % 2 == 0 else "test"
        if pid == "both":
            return "val" if row[1] == "1" else "train"
        return "val" if pid.endswith("-3") else "train"

    path = _knee_manifest(tmp_path, fixture_dir, split_of)
    with caplog.at_level("WARNING", logger="xraylens.data"):
        src = load_source(path, group_column="patient_id")
    assert "val" not in src.split_info  # given splits: nothing carved
    assert src.split_info["leaked_groups"] == {
        "n": 3,
        "groups": {"both": ["train", "val"], "p0-0": ["train", "test"], "p3-1": ["train", "test"]},
    }
    leak_warnings = [r for r in caplog.records if "more than one split" in r.message]
    assert len(leak_warnings) == 1 and "3 group(s)" in leak_warnings[0].message
    # without grouping there is nothing to report
    assert "leaked_groups" not in load_source(path).split_info


def test_leaked_groups_in_split_folders_are_capped_but_counted(tmp_path):
    for i in range(30):
        _png(tmp_path / "train" / "a" / f"person{i}_a.png")
        _png(tmp_path / "test" / "a" / f"person{i}_b.png")
        _png(tmp_path / "train" / "b" / f"other{i}.png")
        _png(tmp_path / "test" / "b" / f"other{i}x.png")
    src = load_source(tmp_path, group_pattern=r"^person\d+", val_fraction=0.2)
    leaked = src.split_info["leaked_groups"]
    assert leaked["n"] == 30 and len(leaked["groups"]) == 20
    assert list(leaked["groups"]) == [f"person{i}" for i in range(20)]  # natural order, first 20
    assert all(s[-1] == "test" and len(s) == 2 for s in leaked["groups"].values())
    assert src.split_info["groups"]["unmatched"] == 60
    # the carved val split (from train) never shares a group with train
    assert all(
        r.split != "val" or r.group is None or r.group not in {q.group for q in src.split("train")} for r in src.records
    )


def test_group_option_errors(tmp_path, fixture_dir):
    with pytest.raises(XraylensError, match=r"group_pattern '\(person' is not a valid regular expression") as e:
        load_source(tmp_path / "missing", group_pattern="(person")  # checked before the path, before any I/O
    assert "\n" not in str(e.value)
    with pytest.raises(XraylensError, match="not both"):
        load_source(fixture_dir / "pneumonia", group_pattern="x", group_column="patient")
    with pytest.raises(XraylensError, match="group_column 'patient' needs a CSV manifest"):
        load_source(fixture_dir / "pneumonia", group_column="patient")
    with pytest.raises(XraylensError, match=r"group_pattern '\^zzz' gives no group to any of the 20 images"):
        load_source(fixture_dir / "pneumonia", group_pattern="^zzz")
    path = _knee_manifest(tmp_path, fixture_dir)
    with pytest.raises(
        XraylensError,
        match=r"group_column 'subject' is not a column of manifest .*"
        "path, label, patient_id, age",
    ):
        load_source(path, group_column="subject")
    with pytest.raises(XraylensError, match="group_column 'label' is not a column"):
        load_source(path, group_column="label")  # the label itself is no grouping
    np.savez(tmp_path / "t.npz", train_images=np.zeros((4, 3, 3), np.uint8), train_labels=np.array([0, 1, 0, 1]))
    with pytest.raises(XraylensError, match="no file names to group by"):
        load_source(tmp_path / "t.npz", group_pattern="x")
    # blank options mean "no grouping" (an empty --set value)
    assert "groups" not in load_source(fixture_dir / "pneumonia", group_pattern=" ", group_column="").split_info


def test_bad_pattern_fails_before_any_decoding(fixture_dir, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from xraylens.train.loop import load_data

    def no_decoding(*a, **k):
        raise AssertionError("decoded an image before checking group_pattern")

    monkeypatch.setattr(PILImage, "open", no_decoding)
    cfg = RunConfig()
    cfg.data.path = str(fixture_dir / "pneumonia")
    cfg.data.cache_dir = str(tmp_path)  # an empty cache: anything loaded would be decoded
    cfg.data.group_pattern = "person[0-9"
    with pytest.raises(XraylensError, match="not a valid regular expression"):
        load_data(cfg)


def test_load_data_reports_groups(fixture_dir, tmp_path):
    from xraylens.train.loop import load_data

    cfg = RunConfig()
    cfg.override(
        [
            f"data.path={fixture_dir / 'pneumonia'}",
            "data.image_size=16",
            f"data.cache_dir={tmp_path}",
            "data.val_fraction=0.3",
            "data.group_pattern=^(person\\d|NORMAL2|IM)",
        ]
    )
    source, train, val, report = load_data(cfg)
    assert report["groups"]["n_groups"] == 8 and report["leaked_groups"] == {"n": 0, "groups": {}}
    assert report["splits"]["train"]["n_groups"] + report["splits"]["val"]["n_groups"] == 8
    assert len(val.labels) == len(source.split("val"))


def test_splits_csv_round_trip_and_reuse(tmp_path, fixture_dir):
    path = _knee_manifest(tmp_path, fixture_dir)
    src = load_source(path, group_column="patient_id", val_fraction=0.25, seed=1)
    out = write_splits_csv(tmp_path / "run" / "splits.csv", src)
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["image", "split", "label", "group"] and len(rows) == 41
    by_image = {row[0]: row[1:] for row in rows[1:]}
    lonely = sorted((fixture_dir / "knee_kl" / "0").iterdir())[3].as_posix()
    assert by_image[lonely][1:] == ["0", ""]  # the label as its class name; no group: an empty cell
    back = read_splits_csv(out)
    assert {i: (s.split, s.label, s.group) for i, s in back.items()} == {
        r.id: (r.split, src.classes[r.label], r.group) for r in src.records
    }
    # another seed gives another split; applying the file restores the recorded one
    other = load_source(path, group_column="patient_id", val_fraction=0.25, seed=2)
    assert [r.id for r in other.split("val")] != [r.id for r in src.split("val")]
    again = apply_splits(other, out)
    assert {r.id: r.split for r in again.records} == {r.id: r.split for r in src.records}
    assert again.split_info["splits_csv"] == str(out.resolve()) and "val" not in again.split_info
    # a file for other data is refused
    with pytest.raises(XraylensError, match=r"does not match the data: 0 image\(s\) not listed, 1 listed but absent"):
        apply_splits(other, {**back, "ghost.png": back[src.records[0].id]})
    with pytest.raises(XraylensError, match="expected image, split, label, group"):
        read_splits_csv(path)
