"""Annotation parsing (real fixture files and malformed rows) and rasterisation of the true shapes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from xraylens.data.annotations import (
    Ellipse,
    Mask,
    Polygon,
    Rectangle,
    annotations_for,
    boxes_to_input,
    pack_boxes,
    rasterize,
    rasterize_batch,
    rasterize_instances,
    read_coco,
    read_mask_folder,
    read_nih,
    read_object_cxr,
    shape_to_input,
)
from xraylens.data.records import Geometry, center_crop_box
from xraylens.errors import XraylensError

IDENT = Geometry(64, 64, (0.0, 0.0, 64.0, 64.0), 64, 64)


# ------------------------------------------------------------------------------------- real fixtures


def test_object_cxr_fixture(fixture_dir):
    ann = read_object_cxr(fixture_dir / "cxr_bbox" / "dev_objectcxr_format.csv")
    assert len(ann) == 16 and ann.skipped == []
    mixed = ann["00021703_001.png"].shapes
    assert [type(s) for s in mixed] == [Ellipse, Polygon, Rectangle]
    assert mixed[0].bbox == (141.0, 128.0, 193.0, 167.0)
    assert mixed[1].points == ((28.0, 165.0), (68.0, 165.0), (68.0, 179.0), (28.0, 179.0))
    assert ann["00012021_081.png"].labels == ["object"]
    assert ann["00028452_001.png"].shapes == [Rectangle(157, 103, 221, 140, label="object")]


def test_nih_fixture_both_layouts(fixture_dir):
    a = read_nih(fixture_dir / "cxr_bbox" / "BBox_List_256.csv")
    b = read_nih(fixture_dir / "cxr_bbox" / "boxes_256.csv")
    assert len(a) == 16 and sum(len(v.shapes) for v in a.values()) == 19
    assert a["00021703_001.png"].labels == ["Effusion", "Infiltrate", "Atelectasis"]
    eff = a["00021703_001.png"].select("Effusion")
    assert len(eff) == 1 and eff[0].bbox == pytest.approx((140.94, 127.8, 140.94 + 52.05, 127.8 + 38.97))
    assert {k: v.shapes for k, v in a.items()} == {k: v.shapes for k, v in b.items()}


def test_coco_fixture_has_two_bad_entries(shared_data):
    path = shared_data / "lung_seg" / "imageannotation_ai_lung_bounding_boxes.json"
    with pytest.raises(XraylensError, match=r"annotations\[316\]: x 'None' is not a number; .*skip_bad"):
        read_coco(path)
    ann = read_coco(path, skip_bad=True)
    assert [r for r, _ in ann.skipped] == ["annotations[316]", "annotations[317]"]
    assert len(ann) == 167
    first = ann["auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg"]
    assert first.labels == ["Right Lung", "Left Lung"]
    assert first.shapes[0] == Rectangle(42, 72, 42 + 245, 72 + 504, label="Right Lung")


def test_mask_folder_fixture(fixture_dir):
    ann = read_mask_folder(fixture_dir / "lung_seg" / "masks")
    assert len(ann) == 8
    m = ann["16672_1_1.png"].shapes[0]
    assert isinstance(m, Mask) and m.array.shape == (240, 256) and m.array.dtype == bool
    # identity geometry: the raster is the mask itself
    g = Geometry(240, 256, (0.0, 0.0, 256.0, 240.0), 240, 256)
    assert np.array_equal(rasterize([m], g), m.array)


# ----------------------------------------------------------------------------------- malformed input


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "line, message",
    [
        ("b.png,2 1 1 5 1 5", "row 3: polygon needs an even number of coordinates >= 6, got 5"),
        ("b.png,0 1 1 5", "row 3: rectangle needs exactly 4 coordinates"),
        ("b.png,1 5 5 2 9", "row 3: ellipse needs x2 > x1 and y2 > y1"),
        ("b.png,7 1 1 5 5", "row 3: shape type 7 is not 0"),
        ("b.png,0 1 one 5 5", "row 3: coordinate 'one' is not a number"),
        (",0 1 1 5 5", "row 3: empty image_name"),
    ],
)
def test_object_cxr_malformed_rows(tmp_path, line, message):
    p = _write(tmp_path, "dev.csv", f"image_name,annotation\na.png,0 1 1 5 5\n{line}\nc.png,\n")
    with pytest.raises(XraylensError) as e:
        read_object_cxr(p)
    assert f"dev.csv {message}" in str(e.value) and "\n" not in str(e.value)
    ann = read_object_cxr(p, skip_bad=True)
    assert len(ann.skipped) == 1 and ann.skipped[0][0] == 3
    assert set(ann) == {"a.png", "c.png"} and ann["c.png"].is_empty  # empty annotation = normal image


def test_object_cxr_multi_entry_and_trailing_semicolon(tmp_path):
    p = _write(tmp_path, "dev.csv", 'image_name,annotation\na.png,"0 1 1 5 5;1 2 2 8 6;"\n')
    assert [type(s) for s in read_object_cxr(p)["a.png"].shapes] == [Rectangle, Ellipse]


def test_wrong_headers(tmp_path):
    p = _write(tmp_path, "x.csv", "file,boxes\na.png,0 1 1 5 5\n")
    with pytest.raises(XraylensError, match="x.csv row 1: header"):
        read_object_cxr(p)
    with pytest.raises(XraylensError, match="x.csv row 1: header"):
        read_nih(p)
    with pytest.raises(XraylensError, match="not found"):
        read_nih(tmp_path / "missing.csv")


def test_nih_malformed_rows(tmp_path):
    text = (
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "a.png,Mass,1,2,3,4\n"
        "b.png,Mass,1,2,0,4\n"
        "c.png,Mass,1,2\n"
        "d.png,Mass,1,nan,3,4\n"
        "a.png,Nodule,10,10,2,2\n"
    )
    p = _write(tmp_path, "BBox_List_2017.csv", text)
    with pytest.raises(XraylensError, match=r"BBox_List_2017.csv row 3: box width and height must be > 0"):
        read_nih(p)
    ann = read_nih(p, skip_bad=True)
    assert [r for r, _ in ann.skipped] == [3, 4, 5]
    assert ann["a.png"].labels == ["Mass", "Nodule"] and ann["a.png"].shapes[0].bbox == (1, 2, 4, 6)


def test_coco_polygons_and_empty_images(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "categories": [{"id": 5, "name": "lung"}],
        "annotations": [
            {"image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 10], "segmentation": [[0, 0, 10, 0, 0, 10]]},
            {"image_id": 3, "category_id": 5, "bbox": [0, 0, 1, 1]},
        ],
    }
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    with pytest.raises(XraylensError, match=r"c.json annotations\[1\]: image_id 3 is not in 'images'"):
        read_coco(p)
    ann = read_coco(p, skip_bad=True)
    assert isinstance(ann["a.png"].shapes[0], Polygon) and ann["b.png"].is_empty
    assert isinstance(read_coco(p, skip_bad=True, use_segmentation=False)["a.png"].shapes[0], Rectangle)


# ----------------------------------------------------------------------------------------- rasterise


def test_rectangle_raster_is_exact_pixel_block():
    r = rasterize([Rectangle(10, 20, 30, 25)], IDENT)
    rows, cols = np.nonzero(r)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 24, 10, 29)  # [row, col] indexing
    assert r.sum() == 20 * 5


def test_ellipse_is_not_its_bounding_box():
    e = Ellipse(8, 8, 56, 40)  # centre (32, 24), semi-axes 24 x 16
    r = rasterize([e], IDENT)
    assert r[24, 32] and not r[9, 9]  # bbox corner (inside the box) is outside the ellipse
    assert r.sum() == pytest.approx(math.pi * 24 * 16, rel=0.03)
    assert rasterize([Rectangle(8, 8, 56, 40)], IDENT)[9, 9]  # ... but inside the box


def test_polygon_is_not_its_bounding_box():
    tri = Polygon(((0, 0), (40, 0), (0, 40)))
    r = rasterize([tri], IDENT)
    assert r[5, 5] and not r[35, 35]  # (x=35.5, y=35.5) is inside the bbox, outside the triangle
    assert r.sum() == pytest.approx(800, rel=0.06)
    # a rectangle drawn as a polygon gives the same pixels as the Rectangle
    poly = Polygon(((10, 20), (30, 20), (30, 25), (10, 25)))
    assert np.array_equal(rasterize([poly], IDENT), rasterize([Rectangle(10, 20, 30, 25)], IDENT))


def test_geometry_crop_and_anisotropic_resize():
    # 200 wide x 100 high, centre crop 0.5 -> keep x in [50, 150), y in [25, 75), squash to 20 x 20
    g = Geometry(100, 200, center_crop_box(100, 200, 0.5), 20, 20)
    assert (g.scale_x, g.scale_y) == (0.2, 0.4)
    rect = Rectangle(50, 25, 100, 50)  # top-left quarter of the crop
    r = rasterize([rect], g)
    assert r[:10, :10].all() and r.sum() == 10 * 10
    assert shape_to_input(rect, g).bbox == pytest.approx((0, 0, 10, 10))
    assert boxes_to_input([rect], g)[0].tolist() == pytest.approx([0, 0, 10, 10])
    # a box cropped away vanishes
    assert not rasterize([Rectangle(0, 0, 40, 20)], g).any()


def test_tiny_shape_keeps_its_centre_pixel():
    g = Geometry(1024, 1024, (0.0, 0.0, 1024.0, 1024.0), 64, 64)  # 16 original px per input px
    r = rasterize_instances([Rectangle(100, 100, 104, 104)], g)
    assert r.sum() == 1 and r[0, 6, 6]


def test_batch_helpers():
    shapes = [[Rectangle(1, 1, 5, 5), Ellipse(10, 10, 20, 30)], [], [Rectangle(0, 0, 2, 2)]]
    inst = rasterize_batch(shapes, [IDENT] * 3, instances=True)
    assert inst.shape == (3, 2, 64, 64) and not inst[1].any() and not inst[2, 1].any()
    union = rasterize_batch(shapes, [IDENT] * 3)
    assert union.shape == (3, 1, 64, 64) and np.array_equal(union[:, 0], inst.any(1))
    with pytest.raises(XraylensError, match="rasterize"):
        pack_boxes(shapes, [IDENT] * 3)
    boxes = pack_boxes([[Rectangle(1, 1, 5, 5)], []], [IDENT] * 2)
    assert boxes.shape == (2, 1, 4) and np.isnan(boxes[1]).all()
    assert annotations_for(["x", "y"], {}) == [[], []]
