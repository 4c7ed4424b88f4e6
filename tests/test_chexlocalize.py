"""CheXlocalize-style evaluation (Saporta et al. 2022): hit rate, mIoU of Otsu / tuned binarisations,
probability cutoff, the two ways of counting images, COCO RLE masks, a second reader - on hand-built
maps and masks with known answers, then end to end on phantoms with known boxes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xraylens.data.annotations import (
    Mask,
    decode_rle,
    encode_rle,
    read_annotations,
    read_coco,
)
from xraylens.data.records import Geometry
from xraylens.errors import XraylensError
from xraylens.localize.metrics import (
    TUNE_GRID,
    ious_at_thresholds,
    map_to_original,
    mask_iou,
    normalise01,
    otsu_threshold,
    pointing_game_original,
    representative_point,
    segment_map,
    tune_thresholds,
)


def block(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# ------------------------------------------------------------------------------------------- Otsu


def test_otsu_splits_a_bimodal_map_exactly():
    rng = np.random.default_rng(0)
    fg = block(80, 100, 20, 40, 30, 60)  # 20 x 30 = 600 px
    m = np.where(fg, 0.85, 0.15) + rng.uniform(-0.1, 0.1, fg.shape)
    norm = normalise01(torch.from_numpy(m).float())
    seg = segment_map(norm)  # Otsu
    assert np.array_equal(seg, fg)
    t = otsu_threshold((255 * norm.numpy()).astype(np.uint8))
    u8 = (255 * norm.numpy()).astype(np.uint8)
    assert u8[~fg].max() <= t < u8[fg].min()  # the threshold falls in the gap between the modes
    # IoU against a box shifted by 10 columns: 20 x 20 overlap, union 800 -> 0.5
    assert mask_iou(seg, block(80, 100, 20, 40, 40, 70)) == pytest.approx(0.5)
    # a hole inside the bright region is filled, as CheXlocalize's contour filling does
    m2 = m.copy()
    m2[28:32, 40:45] = 0.15
    assert np.array_equal(segment_map(normalise01(torch.from_numpy(m2).float())), fg)
    # a constant map binarises to nothing
    assert not segment_map(normalise01(torch.full((10, 10), 3.0))).any()


def test_otsu_matches_scikit_image():
    skf = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(1)
    u8 = np.clip(np.concatenate([rng.normal(60, 15, 3000), rng.normal(180, 25, 1500)]), 0, 255).astype(np.uint8)
    # skimage's threshold is the upper edge of the lower class (value <= t is background): the same split
    assert (
        otsu_threshold(u8) == int(skf.threshold_otsu(u8, nbins=256))
        or (u8 > otsu_threshold(u8)).sum() == (u8 > skf.threshold_otsu(u8, nbins=256)).sum()
    )


# ------------------------------------------------------------------------ counting and empty masks


def test_iou_counting_conventions_and_empty_masks_both_ways():
    full = block(10, 10, 0, 5, 0, 10)  # 50 px
    half = block(10, 10, 0, 5, 0, 5)  # 25 px inside it
    empty = np.zeros((10, 10), dtype=bool)
    cases = [(half, full), (empty, full), (full, empty), (empty, empty)]
    both = [mask_iou(p, g, "both-nonempty") for p, g in cases]
    every = [mask_iou(p, g, "all") for p, g in cases]
    assert both[0] == pytest.approx(0.5) and all(math.isnan(v) for v in both[1:])
    # "all": an empty prediction on a lesion and a prediction on a normal image score 0; both empty: not counted
    assert every[:3] == [pytest.approx(0.5), 0.0, 0.0] and math.isnan(every[3])
    assert np.nanmean(both) == pytest.approx(0.5)
    assert np.nanmean(every) == pytest.approx(0.5 / 3)
    with pytest.raises(XraylensError, match="--iou-count"):
        mask_iou(half, full, "some")


# -------------------------------------------------------------------------------- tuned thresholds


def test_tuned_thresholds_pick_the_grid_value_with_the_best_miou():
    ramp = torch.linspace(0, 1, 101)[None].expand(20, 101)  # column c has value c / 100
    rows, classes = [], []
    for t_true, cls in ((0.5, "a"), (0.5, "a"), (0.3, "b"), (0.7, "b"), (0.7, "b")):
        gt = (ramp > t_true).numpy()
        rows.append(ious_at_thresholds(ramp, gt))
        classes.append(cls)
        assert rows[-1][TUNE_GRID.index(t_true)] == pytest.approx(1.0)
    tuned = tune_thresholds(rows, classes)
    assert tuned == {"a": 0.5, "b": 0.7}  # b: two images at 0.7 outweigh one at 0.3
    # a class whose images never count keeps the middle of the grid
    assert tune_thresholds([np.full(len(TUNE_GRID), np.nan)], ["c"]) == {"c": 0.5}
    # the tuned threshold then binarises a test map: `map > t`
    assert np.array_equal(segment_map(ramp, 0.7), (ramp > 0.7).numpy())


# ------------------------------------------------------------------------------ hit rate, geometry


def test_hit_rate_is_the_peak_inside_the_shape_without_tolerance():
    # 4 maps on a 32-px grid of a 128-px original (4 original px per input px), one box each
    maps = torch.zeros(4, 1, 32, 32)
    peaks = [(10, 10), (10, 20), (25, 5), (3, 3)]
    for i, (r, c) in enumerate(peaks):
        maps[i, 0, r, c] = 1.0
    # peak (r, c) -> original centre (4c + 2, 4r + 2)
    boxes = torch.tensor(
        [
            [[40.0, 40.0, 50.0, 50.0]],  # contains (42, 42): hit
            [[60.0, 30.0, 70.0, 50.0]],  # (82, 42): 12 px right of it: miss, but within tolerance 15
            [[0.0, 90.0, 30.0, 110.0]],  # (22, 102): inside
            [[100.0, 100.0, 120.0, 120.0]],  # (14, 14): far
        ]
    )
    r = pointing_game_original(maps, boxes=boxes, scale=0.25, tolerance=15)
    assert r.hit_rate.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert r.hit.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert float(r.hit_rate.mean()) == 0.5
    assert r.distance[1].item() == pytest.approx(12.0)
    # the same through a Mask shape on the original pixel grid (CheXlocalize's gt_mask[row][col])
    m = np.zeros((128, 128), dtype=bool)
    m[40:50, 40:50] = True
    rm = pointing_game_original(maps[:1], shapes=[[Mask(m)]], scale=0.25, tolerance=0)
    assert rm.hit_rate.tolist() == [1.0]
    m2 = np.zeros((128, 128), dtype=bool)
    m2[40:50, 43:50] = True  # the peak sits at x = 42.0; the mask's first pixel starts at x = 43
    rm2 = pointing_game_original(maps[:1], shapes=[[Mask(m2)]], scale=0.25, tolerance=1.0)
    assert rm2.hit_rate.tolist() == [0.0] and rm2.hit.tolist() == [1.0]
    assert rm2.distance[0].item() == pytest.approx(1.0)


def test_map_to_original_puts_the_map_on_the_crop():
    g = Geometry(100, 200, (50.0, 0.0, 100.0, 100.0), 10, 10)  # centre crop of a 200 x 100 image
    m = torch.zeros(1, 10, 10)
    m[0, :, :5] = 1.0  # left half of the crop
    up = map_to_original(m, g)
    assert up.shape == (100, 200)
    norm = normalise01(up)
    assert float(norm[:, :50].max()) == 0.0 and float(norm[:, 150:].max()) == 0.0  # outside the crop
    assert float(norm[50, 60]) == 1.0 and float(norm[50, 140]) == 0.0
    assert np.array_equal(segment_map(norm), block(100, 200, 0, 100, 50, 100))


def test_representative_point_is_deep_inside_the_reader_mask():
    m = block(50, 80, 10, 31, 20, 61)  # rows 10..30, cols 20..60: centre pixel (20, 40)
    x, y = representative_point(m)
    assert 10 <= y - 0.5 <= 30 and 20 <= x - 0.5 <= 60
    assert abs(y - 20.5) <= 1 and 30 <= x <= 51  # a point of the medial axis
    assert representative_point(np.zeros((5, 5), dtype=bool)) is None


# ------------------------------------------------------------------------------------------- RLE


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools 2.0.x under numpy 2 (copy=)
def test_rle_round_trip_through_pycocotools(tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    m = rng.random((37, 53)) > 0.7
    rle = encode_rle(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [37, 53]
    assert np.array_equal(decode_rle(rle), m)
    assert np.array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool), m)
    # uncompressed RLE (a list of run lengths, column-major) as COCO's iscrowd annotations store it
    flat = np.asfortranarray(m).ravel(order="F").astype(np.uint8)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(decode_rle({"size": [37, 53], "counts": runs}), m)
    # CheXlocalize's {image: {finding: RLE}} JSON, one empty finding
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"img1": {"Edema": rle, "Effusion": encode_rle(np.zeros((37, 53), bool))}}))
    a = read_annotations(path, "rle")
    assert list(a) == ["img1"] and a["img1"].labels == ["Edema"] and len(a["img1"].shapes) == 1
    assert np.array_equal(a["img1"].shapes[0].array, m) and a["img1"].size == (53, 37)
    # COCO with an RLE segmentation becomes a Mask
    coco = {
        "images": [{"id": 1, "file_name": "x.png", "width": 53, "height": 37}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": rle, "bbox": [0, 0, 1, 1]}],
        "categories": [{"id": 2, "name": "lung"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    shape = read_coco(tmp_path / "c.json")["x.png"].shapes[0]
    assert isinstance(shape, Mask) and np.array_equal(shape.array, m) and shape.label == "lung"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"img1": {"Edema": {"counts": "x"}}}))
    with pytest.raises(XraylensError, match="img1/Edema"):
        read_annotations(bad, "rle")


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """A tiny model on phantoms (known lesion boxes) with train/val/test splits."""
    from conftest import tiny_config

    from xraylens.data.phantom import write_phantom
    from xraylens.train.loop import train

    root = write_phantom(tmp_path_factory.mktemp("ph") / "data", n_train=24, n_val=12, n_test=12, size=64, seed=3)
    run = root.parent / "run"
    train(tiny_config(root, **{"data.image_size": 32}), run, progress=False)
    return root, run


def test_localize_end_to_end_with_tuned_thresholds_cutoff_and_a_second_reader(phantom_run, tmp_path):
    from xraylens.localize.run import localize_run

    root, run = phantom_run
    kw = dict(annotations=root / "boxes.csv", fmt="nih", data=root, split="test", device="cpu", bootstrap=200)
    s = localize_run(run, **kw, threshold="tuned", tune_on="val", reader2=root / "boxes.csv", out=tmp_path / "a")
    summary = json.loads(s.summary_path.read_text())
    chx = summary["chexlocalize"]
    assert set(chx["tuned_thresholds"]["gradcam"]) >= {"all"}
    assert all(v in TUNE_GRID for v in chx["tuned_thresholds"]["gradcam"].values())
    # the second reader IS the ground truth: its hit rate, pointing game and mIoU are exactly 1
    r2 = s.figures["reader2"]
    assert r2["hit_rate"]["value"] == 1.0 and r2["pointing_game"]["value"] == 1.0 and r2["miou"]["value"] == 1.0
    # ... so the model's percentage decrease is 100 * (1 - its figure), with a paired interval
    dec = s.percentage_decrease["gradcam"]["hit_rate"]["all"]
    assert dec["value"] == pytest.approx(100 * (1 - s.figures["gradcam"]["hit_rate"]["value"]))
    lo, hi = dec["ci"]
    assert lo <= dec["value"] <= hi
    # every figure has an interval around its value
    for m in ("gradcam", "baseline:center"):
        for f in ("pointing_game", "hit_rate", "miou"):
            d = s.figures[m][f]
            if d["value"] is not None:
                assert d["ci"][0] <= d["value"] <= d["ci"][1], (m, f, d)
    assert summary["pointing_game"]["gradcam"]["all"]["ci"] is not None
    assert summary["means_ci"]["gradcam"]["energy"] is not None
    header = (s.out / "localization_summary.csv").read_text().splitlines()[0]
    assert "hit_rate_ci_low" in header and "miou_ci_high" in header
    per_image = (s.out / "localization.csv").read_text().splitlines()[0]
    assert "hit_rate" in per_image and "seg_iou" in per_image and "distance_grid" in per_image

    # probability cutoff 1: every predicted mask is empty -> nothing counts under both-nonempty, and
    # every annotated image scores 0 under "all" (normal images with empty masks do not count)
    s1 = localize_run(run, **kw, prob_cutoff=1.0, out=tmp_path / "b")
    assert s1.figures["gradcam"]["miou"]["n"] == 0
    s2 = localize_run(run, **kw, prob_cutoff=1.0, iou_count="all", out=tmp_path / "c")
    m2 = s2.figures["gradcam"]["miou"]
    assert m2["value"] == 0.0 and m2["n"] == s2.n_annotated
    # tuning on the evaluated split, or on a plain folder, is refused
    with pytest.raises(XraylensError, match="--tune-on"):
        localize_run(run, **{**kw, "split": "val"}, threshold="tuned", tune_on="val", out=tmp_path / "d")


def test_localize_and_cli_print_intervals(phantom_run, tmp_path, fixture_dir):
    from xraylens.cli import app

    root, run = phantom_run
    res = CliRunner().invoke(
        app,
        ["localize", str(run), "--data", str(root), "--annotations", str(root / "boxes.csv"), "--format", "nih",
         "--reader2", str(root / "annotations_objectcxr.csv"), "--reader2-format", "object-cxr",
         "--bootstrap", "100", "--device", "cpu", "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    row = next(ln for ln in lines if ln.strip().startswith("gradcam"))
    assert row.count("[") == 3  # pointing game, hit rate, mIoU, each with an interval
    assert any("percentage decrease from reader2" in ln for ln in lines)
    assert any(ln.strip().startswith("reader2") for ln in lines)
    # a plain folder has no split to tune on
    from xraylens.localize.run import localize_run

    with pytest.raises(XraylensError, match="plain folder"):
        localize_run(
            run,
            annotations=fixture_dir / "cxr_bbox" / "BBox_List_256.csv",
            fmt="nih",
            data=fixture_dir / "cxr_bbox" / "images",
            threshold="tuned",
            device="cpu",
            out=tmp_path / "p",
        )
    assert not (tmp_path / "p").exists()
