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
    shapes_on_images,
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
    with pytest.raises(XraylensError, match=r"annotations\[316\]: x 'None' is not a number; .*--skip-bad") as e:
        read_coco(path)
    assert "skip_bad" not in str(e.value)  # the CLI user's option, not the Python keyword
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
    assert str(e.value).endswith("or pass --skip-bad to skip it")
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


# ------------------------------------------------------------------------------------ nothing usable


def test_all_rows_bad_is_a_clear_error_not_an_empty_set(tmp_path):
    p = _write(tmp_path, "dev.csv", "image_name,annotation\na.png,0 1 1\nb.png,9 1 1 5 5\nc.png,0 x 1 5 5\n")
    with pytest.raises(XraylensError) as e:
        read_object_cxr(p, skip_bad=True)
    msg = str(e.value)
    assert msg.startswith(
        "dev.csv: no usable annotations, 3 bad entries skipped and no shape left (first: row 2: "
        "rectangle needs exactly 4 coordinates"
    )
    assert "row 3: shape type 9" in msg and "row 4: coordinate 'x'" in msg and "\n" not in msg
    p = _write(tmp_path, "nih.csv", "image,label,x,y,w,h\na.png,Mass,1,2,0,4\n")
    with pytest.raises(XraylensError, match=r"nih.csv: no usable annotations, 1 bad entry skipped .*row 2: box"):
        read_nih(p, skip_bad=True)
    data = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "bbox": [0, 0, None, 1]}]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(XraylensError, match=r"c.json: no usable annotations.*annotations\[0\]: w 'None'"):
        read_coco(tmp_path / "c.json", skip_bad=True)
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "a.png").write_text("not a png")
    with pytest.raises(XraylensError, match=r"masks: no usable annotations.*a.png: cannot read mask"):
        read_mask_folder(masks, skip_bad=True)


def test_header_only_and_all_normal_files(tmp_path):
    with pytest.raises(XraylensError, match="dev.csv lists no images; expected one entry per annotated image"):
        read_object_cxr(_write(tmp_path, "dev.csv", "image_name,annotation\n"))
    with pytest.raises(XraylensError, match="lists no images"):
        read_nih(_write(tmp_path, "nih.csv", "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"))
    # only normal images is valid (no shapes, nothing skipped)
    assert read_object_cxr(_write(tmp_path, "normal.csv", "image_name,annotation\na.png,\n"))["a.png"].is_empty


# ---------------------------------------------------------------------------- shapes the model cannot see


def test_shapes_outside_the_crop_are_dropped_and_recorded(fixture_dir):
    from xraylens.data.cache import prepare_image

    folder = fixture_dir / "cxr_bbox"
    annots = read_object_cxr(folder / "dev_objectcxr_format.csv")
    keys = ["00014731_028.png", "00021703_001.png", "00028452_001.png", "not-annotated.png", None]
    # 256 x 256 images, centre crop 0.5: the model sees x, y in [64, 192)
    geoms = [prepare_image(folder / "images" / k, 64, center_crop=0.5)[1] for k in keys[:3]]
    geoms += geoms[:2]
    shapes = shapes_on_images(keys, annots, geoms)
    assert shapes[0] == []  # its one box (x 193-222) lies right of the crop
    assert annots.dropped["00014731_028.png"] == (
        1,
        "1 of 1 shape(s) dropped: rectangle x 193-222, y 66-102 lies outside the centre crop the model sees "
        "(x 64-192, y 64-192)",
    )
    assert shapes[1] == annots["00021703_001.png"].shapes  # partly inside: all three kept
    assert shapes[2] == annots["00028452_001.png"].shapes
    assert shapes[3:] == [[], []] and set(annots.dropped) == {"00014731_028.png"}
    # what used to happen silently: the image had a shape, yet its raster is empty
    assert not rasterize_batch(shapes[:1], geoms[:1]).any()


def test_shapes_outside_the_image_name_the_annotation_frame(fixture_dir):
    from xraylens.data.cache import prepare_image

    folder = fixture_dir / "cxr_bbox"
    annots = read_object_cxr(folder / "dev_objectcxr_format.csv")
    key = "00021703_001.png"
    g = prepare_image(folder / "images" / key, 64)[1]
    # drawn on a 128 px copy: coordinates double on the 256 px file, so x or y >= 128 falls off the image
    (kept,) = shapes_on_images([key], annots, [g], ref_size=(128, 128))
    assert [type(s) for s in kept] == [Rectangle]  # y 125-178: its top rows stay on the image
    count, reason = annots.dropped[key]
    assert count == 2 and reason == (
        "2 of 3 shape(s) dropped: ellipse x 141-193, y 128-167 lies outside the "
        "128x128 image; polygon x 28-68, y 165-179 lies outside the 128x128 image"
    )
