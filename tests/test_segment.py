"""Lung segmentation: Dice/IoU maths, the mask geometry back to the original image, a training step,
mask prediction (shape, naming, resume) and the CLI on the fixture."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xraylens.cli import main
from xraylens.data.annotations import match_keys, read_mask_folder
from xraylens.data.cache import prepare_image
from xraylens.data.records import Geometry
from xraylens.errors import XraylensError
from xraylens.segment import SegmentConfig, dice_iou, mask_to_original, predict_masks, train_segmentation
from xraylens.segment.data import Pair, read_pairs, split_groups


def test_dice_and_iou_on_hand_built_masks():
    a = torch.zeros(4, 1, 10, 10, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, 0, :5], b[0, 0, :5] = True, True  # identical: 1, 1
    a[1, 0, :4], b[1, 0, 2:6] = True, True  # 40 and 40 pixels, 20 shared: Dice 0.5, IoU 20/60
    a[2, 0, :5] = True  # nothing predicted: 0, 0
    d, i = dice_iou(a, b)  # image 3: both empty, which is right: 1, 1
    assert d.tolist() == pytest.approx([1.0, 0.5, 0.0, 1.0])
    assert i.tolist() == pytest.approx([1.0, 1 / 3, 0.0, 1.0])


def test_mask_on_a_cropped_resized_input_maps_back_exactly():
    # 80 x 120 original, central 0.5 kept (60 x 40 box at (30, 20)), resized by 1/2 to 20 x 30
    orig = np.zeros((80, 120), dtype=np.uint8)
    orig[30:50, 40:80] = 255
    small, g = prepare_image(orig, (20, 30), center_crop=0.5)
    assert g.crop == (30.0, 20.0, 60.0, 40.0)
    # a mask drawn on the input grid comes back as exactly the original pixels under each input pixel
    on_input = np.zeros((20, 30), np.float32)
    on_input[3:9, 4:21] = 1.0
    expected = np.zeros((80, 120), bool)
    expected[20 + 6 : 20 + 18, 30 + 8 : 30 + 42] = True
    assert np.array_equal(mask_to_original(on_input, g), expected)
    # the round trip through Pillow's (antialiasing) downsizing: only the 4 box corners are rounded off
    back = mask_to_original(small.astype(np.float32) / 255, g)
    assert back.shape == orig.shape and np.count_nonzero(back != (orig > 0)) <= 4
    assert back[31:49, 41:79].all() and not back[:29].any() and not back[:, :39].any()
    # outside the crop nothing comes back, even where the map touches the input's edge
    full = mask_to_original(np.ones((20, 30), np.float32), g)
    assert full[20:60, 30:90].all() and full.sum() == 40 * 60


def test_mask_back_to_original_on_an_upscaled_input():
    orig = np.zeros((50, 70), dtype=np.uint8)
    orig[10:40, 5:30] = 255
    big, g = prepare_image(orig, 128)  # 70 x 50 -> 128 x 128, anisotropic
    back = mask_to_original(big.astype(np.float32) / 255, g)
    assert back.shape == (50, 70) and np.array_equal(back, orig > 0)
    with pytest.raises(ValueError, match="input size"):
        mask_to_original(np.zeros((5, 5)), Geometry(50, 70, (0, 0, 70, 50), 128, 128))


def test_split_keeps_patients_whole():
    pairs = [Pair(f"i{k}", Path(f"i{k}"), Path(f"m{k}"), f"p{k // 3}") for k in range(30)]
    split = split_groups(pairs, 0.2, seed=1)
    by_group: dict[str, set[str]] = {}
    for p, s in zip(pairs, split, strict=True):
        by_group.setdefault(p.group, set()).add(s)
    assert all(len(v) == 1 for v in by_group.values())
    assert 6 <= split.count("val") <= 9
    with pytest.raises(XraylensError, match="2 groups"):
        split_groups(pairs[:3], 0.2, seed=0)


def test_pairs_of_the_fixture(fixture_dir):
    pairs, how = read_pairs(fixture_dir / "lung_seg")
    assert len(pairs) == 8 and how == "image"
    assert all(p.image.is_file() and p.mask.is_file() for p in pairs)


@pytest.fixture(scope="module")
def segrun(fixture_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "run"
    cfg = SegmentConfig(image_size=64, epochs=1, batch_size=4, encoder="resnet18")
    s = train_segmentation(fixture_dir / "lung_seg", out, cfg, device="cpu", progress=False)
    assert 0.0 <= s.dice <= 1.0 and s.n_train + s.n_val == 8
    return out


def test_training_writes_a_loadable_run(segrun):
    for name in ("config.yaml", "splits.csv", "history.csv", "metrics.json", "checkpoints/best.pt"):
        assert (segrun / name).is_file(), name
    state = torch.load(segrun / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["config"]["image_size"] == 64
    with pytest.raises(XraylensError, match="already holds a run"):
        train_segmentation(segrun.parent, segrun, device="cpu", progress=False)


def test_predicted_masks_have_the_original_size_match_their_images_and_resume(segrun, fixture_dir, tmp_path):
    images = fixture_dir / "lung_seg" / "images"
    out = tmp_path / "masks"
    s = predict_masks(segrun, images, out, device="cpu", progress=False)
    files = sorted(images.iterdir())
    assert s.written == len(files) == 8 and s.kept == 0 and not s.failed
    for f in files:
        with Image.open(f) as im, Image.open(out / f"{f.stem}.png") as mk:
            assert mk.size == im.size
            assert set(np.unique(np.asarray(mk)).tolist()) <= {0, 255}
    keys = match_keys([f.name for f in files], read_mask_folder(out))
    assert keys == [f"{f.stem}.png" for f in files]
    with open(out / "masks_index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["written"] * 8

    again = predict_masks(segrun, images, out, device="cpu", progress=False)
    assert (again.written, again.kept) == (0, 8)
    # a mask older than the checkpoint is redone
    old = out / f"{files[0].stem}.png"
    os.utime(old, ns=(1, 1))
    assert predict_masks(segrun, images, out, device="cpu", progress=False).written == 1


def test_predict_refuses_colliding_names_and_wrong_runs(segrun, tmp_path, fixture_dir):
    for sub in ("a", "b"):
        (tmp_path / "imgs" / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "imgs" / sub / "x.png")
    with pytest.raises(XraylensError, match="share the mask x.png"):
        predict_masks(segrun, tmp_path / "imgs", tmp_path / "out", device="cpu", progress=False)
    with pytest.raises(XraylensError, match="not a segmentation run"):
        predict_masks(fixture_dir, tmp_path / "imgs", tmp_path / "out", device="cpu", progress=False)
    # masks written inside the image folder are not taken for images when the call resumes
    (tmp_path / "imgs" / "b" / "x.png").unlink()
    for _ in range(2):
        s = predict_masks(segrun, tmp_path / "imgs", tmp_path / "imgs" / "masks", device="cpu", progress=False)
    assert (s.written, s.kept) == (0, 1)


def test_cli_trains_and_predicts(fixture_dir, tmp_path, capsys):
    run, masks = tmp_path / "segrun", tmp_path / "masks"
    common = ["--device", "cpu", "--quiet"]
    for argv in (
        ["segment", "train", "--data", str(fixture_dir / "lung_seg"), "--out", str(run), "--image-size", "32"]
        + ["--epochs", "1", "--augment", "flip,affine,elastic,jitter"],
        ["segment", "predict", str(run), "--data", str(fixture_dir / "cxr_bbox" / "images"), "--out", str(masks)],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv + common)
        assert e.value.code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "held-out Dice" in out and "16 masks written" in out
    assert len(list(masks.glob("*.png"))) == 16


def test_localize_with_lung_masks_reports_border_and_corner_energy(tiny_run, fixture_dir, tmp_path):
    """`localize --format masks` with a mask per image (here a central block standing in for the lungs):
    the lung-energy share and the new border / corner columns, per method and for the baselines."""
    from xraylens.localize.run import localize_run

    masks = tmp_path / "masks"
    masks.mkdir()
    for f in (fixture_dir / "pneumonia").rglob("*.jpeg"):
        with Image.open(f) as im:
            w, h = im.size
        m = np.zeros((h, w), np.uint8)
        m[h // 4 : 3 * h // 4, w // 5 : 4 * w // 5] = 255
        Image.fromarray(m).save(masks / f"{f.stem}.png")
    s = localize_run(tiny_run, annotations=masks, fmt="masks", split="val", device="cpu", out=tmp_path / "loc")
    with open(s.csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {"border_energy", "corner_energy", "energy", "mask_ratio"} <= set(rows[0])
    for r in rows:
        assert 0.0 <= float(r["corner_energy"]) <= float(r["border_energy"]) <= 1.0
    import json

    means = json.loads(s.summary_path.read_text())["means"]
    # the centre baseline keeps its energy away from the corners; uniform noise spreads it by area
    assert means["baseline:center"]["corner_energy"] < means["baseline:random"]["corner_energy"]
    assert means["baseline:random"]["border_energy"] == pytest.approx(1 - 0.8 * 0.8, abs=0.05)
    assert means["baseline:center"]["energy"] > means["baseline:random"]["energy"]
    with pytest.raises(XraylensError, match="--border"):
        localize_run(tiny_run, annotations=masks, fmt="masks", border=0.6, device="cpu", out=tmp_path / "x")


def test_predict_only_the_split_a_run_audits(segrun, tiny_run, fixture_dir, tmp_path, capsys):
    """`segment predict --run RUN --split val` masks exactly the images of that split, and `audit
    --masks` then finds a lung mask for every one of them (names and sizes line up)."""
    from xraylens.segment import split_images
    from xraylens.trust.audit import audit_run

    with open(tiny_run / "splits.csv", newline="") as fh:
        val = sorted(Path(r["image"]).stem for r in csv.DictReader(fh) if r["split"] == "val")
    assert 0 < len(val) < 20
    out = tmp_path / "masks"
    argv = ["segment", "predict", str(segrun), "--data", str(fixture_dir / "pneumonia"), "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--run", str(tiny_run), "--split", "val", "--device", "cpu", "--quiet"])
    assert e.value.code == 0, capsys.readouterr().err
    assert f"{len(val)} masks written" in capsys.readouterr().out
    assert sorted(p.stem for p in out.glob("*.png")) == val
    s = audit_run(tiny_run, split="val", masks=out, methods="gradcam", device="cpu", out=tmp_path / "audit")
    lungs = s.report["classes"]["all"]["lungs"]
    assert lungs["n"] == len(val) and 0 < lungs["area"] < 1
    # a folder that holds none of the split's images, and a split the run does not have
    with pytest.raises(XraylensError, match="none of the"):
        predict_masks(segrun, fixture_dir / "lung_seg" / "images", tmp_path / "m2", only=split_images(tiny_run, "val"))
    with pytest.raises(XraylensError, match="no images in split 'nope'"):
        split_images(tiny_run, "nope")
