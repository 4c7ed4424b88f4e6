"""Annotations drawn on a different-size copy of the image: COCO's declared sizes, --annotation-size,
and file names that differ only by extension. Real lung boxes and NIH boxes."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from xraylens.data.annotations import Mask, Polygon, Rectangle, match_keys, rasterize, read_coco, rescale_shapes
from xraylens.data.cache import prepare_image
from xraylens.errors import XraylensError
from xraylens.localize.run import parse_size


def test_rescale_shapes_maps_corners_and_masks():
    r, p = Rectangle(10, 20, 30, 40, "a"), Polygon(((0, 0), (100, 0), (0, 50)), "b")
    m = Mask(np.zeros((50, 100), bool) | (np.arange(100)[None, :] >= 50), "c")  # right half, [rows, cols]
    r2, p2, m2 = rescale_shapes([r, p, m], (100, 50), (50, 100))
    assert (r2.x0, r2.y0, r2.x1, r2.y1, r2.label) == (5, 40, 15, 80, "a")
    assert p2.points == ((0, 0), (50, 0), (0, 100))
    assert m2.array.shape == (100, 50) and m2.array[:, 25:].all() and not m2.array[:, :25].any()
    assert rescale_shapes([r], (10, 10), (10, 10))[0] is r


def test_match_keys_by_id_name_then_stem():
    keys = {"a/x.png": 1, "y.jpeg": 2, "dup.png": 3, "sub/dup.png": 4}
    assert match_keys(["a/x.png", "b/y.png", "c/dup.png", "z.png"], keys) == ["a/x.png", "y.jpeg", None, None]


def test_parse_size():
    assert parse_size("1024") == (1024, 1024) and parse_size("1024,768") == (1024, 768)
    with pytest.raises(XraylensError, match="--annotation-size"):
        parse_size("big")


def test_coco_lung_boxes_fit_the_resized_image_and_cover_the_lung_mask(shared_data, fixture_dir):
    """The COCO file declares 862x605; the fixture copy is 256x180. Rescaled, the two lung boxes
    hold nearly all of the real lung mask and match it well; taken as they are, they spill over the image."""
    coco = read_coco(shared_data / "lung_seg" / "imageannotation_ai_lung_bounding_boxes.json", skip_bad=True)
    assert len(coco.skipped) == 2  # two entries with a null bbox in the real file
    stem = "covid-19-pneumonia-evolution-over-a-week-1-day3"
    (key,) = [k for k in match_keys([f"{stem}.png"], coco) if k]
    a = coco[key]
    assert a.size == (862, 605) and len(a.shapes) == 2
    _, geom = prepare_image(fixture_dir / "lung_seg" / "images" / f"{stem}.png", 128)
    lung = np.asarray(Image.open(fixture_dir / "lung_seg" / "masks" / f"{stem}.png").convert("L")) > 127
    _, mask_geom = prepare_image(fixture_dir / "lung_seg" / "masks" / f"{stem}.png", 128)
    lung_in = rasterize([Mask(lung)], mask_geom)
    fitted = rasterize(rescale_shapes(a.shapes, a.size, (geom.orig_w, geom.orig_h)), geom)
    raw = rasterize(a.shapes, geom)
    covered = (lung_in & fitted).sum() / lung_in.sum()
    assert covered > 0.9, covered

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    assert iou(fitted, lung_in) > 0.7 and iou(fitted, lung_in) > iou(raw, lung_in) + 0.2


def test_cli_annotation_size_equals_boxes_drawn_at_file_size(fixture_dir, tmp_path):
    """NIH boxes in 1024-px coordinates with --annotation-size 1024 on the 256-px copies give the same
    per-image results as the boxes already moved to 256 px."""
    from xraylens.config import RunConfig
    from xraylens.train.loop import train

    box = fixture_dir / "cxr_bbox"
    rows = list(csv.DictReader(open(box / "boxes_256.csv")))
    big = tmp_path / "bbox_1024.csv"
    with open(big, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        for r in rows:
            w.writerow([r["image"], r["label"], r["x_1024"], r["y_1024"], r["w_1024"], r["h_1024"]])
    run = tmp_path / "run"
    cfg = RunConfig().override(
        [
            f"data.path={fixture_dir / 'pneumonia'}",
            "data.image_size=48",
            "model.name=resnet18",
            "train.epochs=1",
            "train.batch_size=8",
            "train.device=cpu",
        ]
    )
    train(cfg, run, progress=False)
    out = {}
    for name, ann, extra in (("small", box / "BBox_List_256.csv", []), ("big", big, ["--annotation-size", "1024"])):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "xraylens",
                "localize",
                str(run),
                "--data",
                str(box / "images"),
                "--annotations",
                str(ann),
                "--format",
                "nih",
                "--tolerance",
                "0",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / name),
                *extra,
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        out[name] = json.loads((tmp_path / name / "localization_summary.json").read_text())
    assert out["big"]["annotation_size"] == [1024, 1024]
    assert out["big"]["pointing_game"] == out["small"]["pointing_game"]
    for m in ("gradcam", "baseline:center"):
        assert out["big"]["means"][m]["energy"] == pytest.approx(out["small"]["means"][m]["energy"], abs=0.02)
