from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xraylens.data.sources import load_source, natural_sorted
from xraylens.errors import XraylensError


def _png(path: Path, value: int = 128, size=(6, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def _tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, classes in layout.items():
        for cls, n in classes.items():
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _png(folder / f"img{i}.png", value=i)
    return root


def test_natural_sort():
    assert natural_sorted(["10", "2", "1", "img10", "img2"]) == ["1", "2", "10", "img2", "img10"]


def test_knee_fixture_class_folders_get_stratified_val(fixture_dir):
    src = load_source(fixture_dir / "knee_kl", val_fraction=0.25, seed=3)
    assert src.kind == "folders" and src.classes == ["0", "1", "2", "3", "4"]
    assert src.splits == ["train", "val"]
    train, val = src.split("train"), src.split("val")
    assert len(train) + len(val) == 40
    # each class of 8 gives round(8 * .25) = 2 to val, and every class is in both splits
    assert np.bincount([r.label for r in val]).tolist() == [2] * 5
    assert {r.label for r in train} == set(range(5))
    assert src.split_info["val"] == {"from": "train", "fraction": 0.25, "seed": 3, "n": 10}
    assert src.split_info["layout"] == "class_folders"
    r = val[0]
    # record paths and the source root are both resolved (the shared folder may be reached by a symlink)
    assert Path(src.root) == (fixture_dir / "knee_kl").resolve()
    assert r.id == Path(r.path).relative_to(src.root).as_posix()
    assert src.classes[r.label] == r.id.split("/")[0]
    # deterministic in the seed; another seed picks other images
    again = load_source(fixture_dir / "knee_kl", val_fraction=0.25, seed=3)
    assert [r.id for r in again.split("val")] == [r.id for r in val]
    other = load_source(fixture_dir / "knee_kl", val_fraction=0.25, seed=4)
    assert [r.id for r in other.split("val")] != [r.id for r in val]


def test_small_class_still_gives_one_to_val(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="xraylens.data"):
        src = load_source(_tree(tmp_path, {"": {"a": 2, "b": 40, "c": 1}}), val_fraction=0.1)
    per = np.bincount([r.label for r in src.split("val")], minlength=3).tolist()
    assert per == [1, 4, 0]  # a: >=1 of 2; b: 10% of 40; c: a single image stays in train
    # ...and the class missing from val is counted, named and warned about once
    assert src.split_info["val"]["classes_without_val"] == ["c"]
    assert [r.message.count("['c']") for r in caplog.records] == [1]


def test_symlinked_data_folder(tmp_path):
    real = _tree(tmp_path / "real", {"": {"a": 3, "b": 3}})
    for i in range(2):
        _png(tmp_path / "elsewhere" / "more" / f"x{i}.png")
    (real / "b" / "more").symlink_to(tmp_path / "elsewhere" / "more", target_is_directory=True)
    (real / "a" / "loop").symlink_to(real / "a", target_is_directory=True)  # must not recurse forever
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    src = load_source(link, val_fraction=0.0)
    ids = sorted(r.id for r in src.records)
    assert ids == [
        "a/img0.png",
        "a/img1.png",
        "a/img2.png",
        "b/img0.png",
        "b/img1.png",
        "b/img2.png",
        "b/more/x0.png",
        "b/more/x1.png",
    ]
    assert Path(src.root) == real.resolve()
    for r in src.records:
        assert Path(r.path).is_file() and Path(r.path) == Path(r.path).resolve()
        if "more" not in r.id:
            assert Path(r.path).relative_to(src.root).as_posix() == r.id


def test_pneumonia_fixture(fixture_dir):
    src = load_source(fixture_dir / "pneumonia")
    assert src.classes == ["NORMAL", "PNEUMONIA"]
    assert len(src.records) == 20 and set(src.splits) == {"train", "val"}
    assert all(Path(r.path).is_file() for r in src.records)


def test_split_folders_alias_natural_order_and_ignored(tmp_path):
    root = _tree(tmp_path / "ds", {"train": {"10": 2, "2": 2}, "valid": {"10": 1, "2": 1}, "test": {"10": 1, "2": 1}})
    (root / "README.txt").write_text("hi")
    (root / "train" / "2" / "notes.csv").write_text("x")
    (root / "train" / "2" / ".DS_Store").write_text("x")  # hidden: not counted
    (root / "train" / "10" / ".hidden").mkdir()
    _png(root / "train" / "10" / ".hidden" / "skip.png")
    _png(root / "train" / "10" / "extra.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "test" / "2" / "SCAN.JPG", format="JPEG")
    src = load_source(root, val_fraction=0.5)
    assert src.classes == ["2", "10"]
    assert src.splits == ["test", "train", "val"]
    assert "val" not in src.split_info  # a real val split: nothing carved from train
    assert src.split_info["ignored_files"] == 2
    ids = {r.id for r in src.records}
    assert "test/2/SCAN.JPG" in ids and "valid/10/img0.png" in ids
    assert not any(".hidden" in i for i in ids)
    assert len(src.split("train")) == 5


def test_empty_class_folder_is_named(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 0}})
    with pytest.raises(XraylensError) as e:
        load_source(root)
    msg = str(e.value)
    assert "'val'" in msg and "['b']" in msg and str(root / "val" / "b") in msg and "\n" not in msg


def test_ignored_files_without_split_folders(tmp_path):
    root = _tree(tmp_path, {"": {"a": 2, "b": 2}})
    (root / "labels.xlsx").write_text("x")
    (root / "a" / "note.txt").write_text("x")
    assert load_source(root).split_info["ignored_files"] == 2


def test_empty_class_folder_without_splits(tmp_path):
    root = _tree(tmp_path, {"": {"a": 2, "b": 0}})
    with pytest.raises(XraylensError, match=r"class folder\(s\) .*b hold no image files"):
        load_source(root)


def test_classes_differ_between_splits(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1, "c": 1}})
    msg = r"split 'test' differs from 'train': has extra class\(es\) \['c'\]"
    with pytest.raises(XraylensError, match=msg):
        load_source(root)


def test_split_without_images(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 2}, "test": {"a": 0}})
    (root / "test" / "a" / "readme.md").write_text("nothing here")
    with pytest.raises(XraylensError, match=r"split 'test' .* holds no image files"):
        load_source(root)


def test_mixed_split_and_class_folders(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 1}, "": {"b": 1}})
    with pytest.raises(XraylensError, match="mixes split folders"):
        load_source(root)


def test_missing_path_and_unknown_file(tmp_path):
    with pytest.raises(XraylensError, match="does not exist"):
        load_source(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(XraylensError, match="pass a folder, a .csv manifest"):
        load_source(tmp_path / "x.txt")


def test_manifest_csv(tmp_path, fixture_dir):
    img = fixture_dir / "knee_kl" / "0"
    first = sorted(img.iterdir())[0]
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    _png(tmp_path / "imgs" / "c.png")
    (tmp_path / "m.csv").write_text(
        "path,label,split,age,sex\n"
        "imgs/a.png,grade10,train,61,F\n"
        "imgs/b.png,grade2,Validation,70,M\n"
        "\n"
        f"{first},grade10,test,55,F\n"
        "imgs/c.png,grade2,,40,M\n"
    )
    src = load_source(tmp_path / "m.csv")
    assert src.kind == "manifest" and src.classes == ["grade2", "grade10"]
    by_id = {r.id: r for r in src.records}
    assert by_id["imgs/a.png"].label == 1 and by_id["imgs/a.png"].clinical == {"age": "61", "sex": "F"}
    assert by_id["imgs/b.png"].split == "val"
    assert by_id["imgs/c.png"].split == "train"  # empty split cell: train
    assert by_id["imgs/a.png"].path == str(tmp_path / "imgs" / "a.png")
    assert by_id[first.as_posix()].split == "test"  # outside the CSV folder: absolute id


def test_manifest_errors(tmp_path):
    (tmp_path / "cols.csv").write_text("file,class\nx.png,1\n")
    with pytest.raises(XraylensError, match=r"has columns \['file', 'class'\]; it needs 'path' and 'label'"):
        load_source(tmp_path / "cols.csv")
    (tmp_path / "row.csv").write_text("path,label\na.png,1\nb.png,\n")
    with pytest.raises(XraylensError, match=r"row 2 \(line 3\) has an empty 'label'"):
        load_source(tmp_path / "row.csv")
    (tmp_path / "dup.csv").write_text("path,label\na.png,1\n./a.png,2\n")
    with pytest.raises(XraylensError, match="repeats"):
        load_source(tmp_path / "dup.csv")


@pytest.mark.parametrize(
    "content",
    [
        "path,label\na.png,x\n".encode("utf-16"),  # Excel "Unicode text": BOM + UTF-16LE
        "path,label\na.png,x\n".encode("utf-16-le"),  # no BOM: NUL bytes
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)),  # an image renamed .csv
        "path,label\nb\u00e9b\u00e9.png,x\n".encode("latin-1"),  # an undecodable byte on line 2
    ],
    ids=["utf16", "utf16le", "binary", "latin1"],
)
def test_manifest_not_utf8_is_one_line(tmp_path, content):
    (tmp_path / "m.csv").write_bytes(content)
    with pytest.raises(XraylensError, match="is not a UTF-8 CSV file.*CSV UTF-8") as e:
        load_source(tmp_path / "m.csv")
    assert "\n" not in str(e.value)


def test_manifest_label_only_in_val_or_test(tmp_path):
    (tmp_path / "m.csv").write_text(
        "path,label,split\na.png,x,train\nb.png,y,train\nc.png,z,val\nd.png,z,test\ne.png,x,val\n"
    )
    with pytest.raises(
        XraylensError,
        match=r"label\(s\) \['z'\] appear only in split\(s\) \['val', 'test'\], "
        "never in 'train'",
    ):
        load_source(tmp_path / "m.csv")
    # an evaluation-only manifest (no train rows) has no training to spoil
    (tmp_path / "t.csv").write_text("path,label,split\na.png,x,test\nb.png,y,test\n")
    assert load_source(tmp_path / "t.csv").classes == ["x", "y"]


def test_npz_medmnist(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 7, 9, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "toy.npz",
        train_images=rgb,
        train_labels=np.array([[i % 3] for i in range(12)]),
        test_images=rng.integers(0, 256, (4, 7, 9), dtype=np.uint8),
        test_labels=np.array([0, 1, 2, 1]),
    )
    src = load_source(tmp_path / "toy.npz", val_fraction=0.25, seed=1)
    assert src.kind == "npz" and src.classes == ["0", "1", "2"]
    assert src.arrays["test"].shape == (4, 7, 9) and src.arrays["train"].dtype == np.uint8
    assert len(src.split("val")) == 3 and len(src.split("train")) == 9
    grey = np.asarray([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
    for r in src.records:
        assert r.path is None and r.array_index is not None
        _, split0, i = r.id.split(":")
        if split0 == "train":  # val rows moved out of the train array: index still finds the same pixels
            np.testing.assert_array_equal(src.arrays[r.split][r.array_index], grey[int(i)])
            assert r.label == int(i) % 3


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((2, 4, 4), np.float32), train_labels=np.zeros(2))
    with pytest.raises(XraylensError, match="expected uint8"):
        load_source(tmp_path / "bad.npz")
    np.savez(tmp_path / "nolab.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(XraylensError, match="no train_labels"):
        load_source(tmp_path / "nolab.npz")
