import csv

import numpy as np
import pytest
from PIL import Image

from xraylens.data.phantom import make_phantom_arrays, write_phantom
from xraylens.errors import XraylensError


@pytest.fixture(scope="module")
def arrays():
    return make_phantom_arrays(40, size=64, seed=3)


def test_shapes_dtypes_and_labels(arrays):
    images, labels, boxes = arrays
    assert images.shape == (40, 64, 64) and images.dtype == np.uint8
    assert labels.shape == (40,) and labels.dtype == np.int64
    assert boxes.shape == (40, 4) and boxes.dtype == np.float64
    assert labels.sum() == 20  # lesion_fraction=0.5, exact
    assert np.isnan(boxes[labels == 0]).all()
    b = boxes[labels == 1]
    assert np.isfinite(b).all()
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 0] + b[:, 2] <= 64).all() and (b[:, 1] + b[:, 3] <= 64).all()
    # visible diameter 8-16 % of the side (aspect jitter stretches one axis a little)
    assert (b[:, 2:] > 0.05 * 64).all() and (b[:, 2:] < 0.2 * 64).all()
    # not saturated, not blank
    assert 40 < images.mean() < 200 and images.std() > 20


def test_bit_identical_for_same_seed_and_different_otherwise(arrays):
    again = make_phantom_arrays(40, size=64, seed=3)
    for a, b in zip(arrays, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = make_phantom_arrays(40, size=64, seed=4)
    assert not np.array_equal(arrays[0], other[0])


def test_images_vary_between_patients(arrays):
    images, labels, _ = arrays
    normals = images[labels == 0].astype(float)
    assert np.abs(normals[0] - normals[1]).mean() > 5


def test_lesion_is_brighter_than_its_surroundings(arrays):
    images, labels, boxes = arrays
    contrasts = []
    for img, box in zip(images[labels == 1].astype(float), boxes[labels == 1], strict=True):
        x, y, w, h = box
        cx, cy = x + w / 2, y + h / 2
        rr, cc = np.mgrid[:64, :64] + 0.5
        d = np.hypot((cc - cx) / (w / 2), (rr - cy) / (h / 2))
        core, ring = img[d < 0.5].mean(), img[(d > 1.2) & (d < 1.8)].mean()
        contrasts.append(core - ring)
    contrasts = np.array(contrasts)
    assert np.median(contrasts) > 15  # clearly visible...
    assert images[labels == 1].max() <= 255 and (contrasts > 3).mean() > 0.9  # ...in nearly every image


def test_lesion_fraction_and_errors():
    _, labels, _ = make_phantom_arrays(10, size=48, seed=0, lesion_fraction=0.0)
    assert labels.sum() == 0
    _, labels, _ = make_phantom_arrays(10, size=48, seed=0, lesion_fraction=1.0)
    assert labels.sum() == 10
    with pytest.raises(XraylensError):
        make_phantom_arrays(4, size=16)
    with pytest.raises(XraylensError):
        make_phantom_arrays(4, lesion_fraction=1.5)


def test_write_phantom_layout_and_annotations(tmp_path):
    out = write_phantom(tmp_path / "ph", n_train=6, n_val=2, n_test=4, size=48, seed=1)
    pngs = sorted(out.glob("*/*/*.png"))
    assert len(pngs) == 12
    names = [p.name for p in pngs]
    assert len(set(names)) == 12 and "phantom_00001.png" in names
    assert {p.parent.parent.name for p in pngs} == {"train", "val", "test"}
    assert {p.parent.name for p in pngs} == {"normal", "opacity"}
    for split, n in (("train", 6), ("val", 2), ("test", 4)):
        assert len(list((out / split / "opacity").glob("*.png"))) == n // 2
    with Image.open(pngs[0]) as im:
        assert im.mode == "L" and im.size == (48, 48)

    lines = (out / "boxes.csv").read_text().splitlines()
    assert lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    nih = {r[0]: [float(v) for v in r[2:6]] for r in csv.reader(lines[1:])}
    lesion_names = {p.name for p in pngs if p.parent.name == "opacity"}
    assert set(nih) == lesion_names

    with open(out / "annotations_objectcxr.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [*rows[0]] == ["image_name", "annotation"]
    assert {r["image_name"] for r in rows} == set(names)
    for r in rows:
        if r["image_name"] in lesion_names:
            t, x1, y1, x2, y2 = (int(v) for v in r["annotation"].split())
            x, y, w, h = nih[r["image_name"]]
            assert t == 0 and x1 <= x and y1 <= y and x2 >= x + w - 0.01 and y2 >= y + h - 0.01
        else:
            assert r["annotation"] == ""

    # the same seed rewrites identical files
    out2 = write_phantom(tmp_path / "ph2", n_train=6, n_val=2, n_test=4, size=48, seed=1)
    assert (out / "boxes.csv").read_bytes() == (out2 / "boxes.csv").read_bytes()
    for p in pngs:
        q = out2 / p.relative_to(out)
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(q)))


def test_write_phantom_rejects_empty(tmp_path):
    with pytest.raises(XraylensError):
        write_phantom(tmp_path, n_train=0, n_val=0, n_test=0)


def test_planted_marker_follows_the_label_per_split_and_sits_in_the_audit_corner(tmp_path):
    from xraylens.data.phantom import burn_marker, marker_box, marker_presence
    from xraylens.localize.metrics import corner_region

    plain = write_phantom(tmp_path / "plain", n_train=60, n_val=20, n_test=60, size=64, seed=2)
    marked = write_phantom(tmp_path / "marked", n_train=60, n_val=20, n_test=60, size=64, seed=2,
                           marker=(0.95, 0.95, 0.5))  # fmt: skip
    with open(marked / "markers.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 140 and not (plain / "markers.csv").exists()
    agree = {s: np.mean([(r["label"] == "opacity") == (r["marker"] == "1") for r in rows if r["split"] == s])
             for s in ("train", "test")}  # fmt: skip
    assert agree["train"] >= 0.85 and 0.3 <= agree["test"] <= 0.7, agree
    # the marker is the only difference: unmarked images are bit-identical to the run without the option,
    # marked ones differ only inside the top-left corner square the audit blanks (0.15 of the side)
    corner = corner_region(64, 64, 0.15).numpy()
    corner[:, 32:] = False
    corner[32:, :] = False
    for r in rows:
        a = np.asarray(Image.open(plain / r["split"] / r["label"] / r["image"]))
        b = np.asarray(Image.open(marked / r["split"] / r["label"] / r["image"]))
        diff = a != b
        if r["marker"] == "0":
            assert not diff.any()
        else:
            assert diff.any() and not diff[~corner].any()
            assert b[corner].max() >= 240  # bright: the letter, whatever the film's corner looks like
    inset, height, stroke = marker_box(64)
    assert inset + height <= round(0.15 * 64)
    img = burn_marker(np.zeros((2, 64, 64), np.uint8), np.array([True, False]))
    assert img[0].sum() > 0 and img[1].sum() == 0
    # an "L": a vertical bar and a foot, not a filled block
    assert img[0, inset, inset] > 0 and img[0, inset, inset + height // 2] == 0
    with pytest.raises(XraylensError, match="agreement"):
        marker_presence(np.array([0, 1]), 1.5, seed=0)
    with pytest.raises(XraylensError, match="per split"):
        write_phantom(tmp_path / "bad", n_train=4, n_val=0, n_test=0, size=64, marker=(0.9,))
