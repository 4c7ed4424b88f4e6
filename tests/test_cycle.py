"""The CAM-guided enhancement cycle: the enhancement maths, init_from, and a one-cycle run end to end."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from xraylens.cycle import CYCLE_COLUMNS, cycle_run, emphasis_weights, enhance
from xraylens.errors import XraylensError
from xraylens.runs import find_checkpoint, read_checkpoint
from xraylens.segment import SegmentConfig, train_segmentation
from xraylens.train.loop import train


def test_enhance_matches_hand_computed_values():
    x = np.array([[100, 200], [50, 255]], dtype=np.uint8)
    w = np.array([[1.0, 0.0], [0.5, 0.25]])
    # s = 0.5: factor (1 - s) + s * w = 1.0, 0.5, 0.75, 0.625
    assert enhance(x, w, 0.5).tolist() == [[100, 100], [38, 159]]  # 37.5 -> 38, 159.375 -> 159
    assert enhance(x, w, 0.0).tolist() == x.tolist()
    assert enhance(x, w, 1.0).tolist() == [[100, 0], [25, 64]]  # 63.75 -> 64


def test_emphasis_weights_scale_cam_and_restrict_to_lungs():
    cam = torch.tensor([[[[0.0, 2.0], [4.0, -1.0]]]])
    lungs = torch.tensor([[[[1, 1], [0, 1]]]], dtype=torch.bool)
    assert emphasis_weights(cam, lungs, "cam", False).tolist() == [[[[0.0, 0.5], [1.0, 0.0]]]]
    assert emphasis_weights(cam, lungs, "cam", True).tolist() == [[[[0.0, 0.5], [0.0, 0.0]]]]
    assert emphasis_weights(cam, lungs, "mask", False).tolist() == [[[[1.0, 1.0], [0.0, 1.0]]]]


def test_init_from_starts_with_the_run_weights_head_included(tiny_run, fixture_dir, tmp_path):
    cfg = tiny_config(fixture_dir / "pneumonia", **{"model.init_from": str(tiny_run), "train.lr": 1e-12})
    cfg.train.weight_decay = 0.0
    train(cfg, tmp_path / "ft", progress=False)
    a = read_checkpoint(find_checkpoint(tiny_run))["model"]
    b = read_checkpoint(find_checkpoint(tmp_path / "ft"))["model"]
    for k, v in a.items():
        if v.is_floating_point() and "running" not in k:
            assert torch.allclose(v, b[k], atol=1e-8), k  # lr 1e-12: one step moves nothing measurable
    bad = tiny_config(fixture_dir / "pneumonia", **{"model.init_from": str(tmp_path / "nope")})
    with pytest.raises(XraylensError, match="not found"):
        train(bad, tmp_path / "ft2", progress=False)
    other = tiny_config(fixture_dir / "pneumonia", **{"model.init_from": str(tiny_run), "model.name": "resnet18"})
    with pytest.raises(XraylensError, match="does not fit"):
        train(other, tmp_path / "ft3", progress=False)


@pytest.fixture(scope="module")
def lung_model(fixture_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lungs") / "seg"
    cfg = SegmentConfig(image_size=64, epochs=1, batch_size=4, encoder="resnet18")
    train_segmentation(fixture_dir / "lung_seg", out, cfg, device="cpu", progress=False)
    return out


def test_one_cycle_writes_the_table_and_a_rerun_skips_it(tiny_run, lung_model, fixture_dir, tmp_path):
    out = tmp_path / "cyc"
    kw = {"cycles": 1, "device": "cpu", "restrict_to_lungs": True, "strength": 0.5, "train_last": None}
    rows = cycle_run(tiny_run, fixture_dir / "pneumonia", lung_model, out, **kw)
    assert [(r["cycle"], r["split"]) for r in rows] == [(0, "val"), (1, "val")]
    with open(out / "cycles.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == CYCLE_COLUMNS and len(table) == 2
    for r in table:
        for c in ("accuracy", "sensitivity", "specificity", "lung_energy", "border_energy", "corner_energy"):
            assert 0.0 <= float(r[c]) <= 1.0, (c, r)
    enhanced = sorted((out / "cycle-1" / "enhanced" / "train").rglob("*.png"))
    n_train = sum(1 for _ in (out / "original" / "train").rglob("*.jpeg"))
    assert len(enhanced) == n_train > 0
    assert (out / "cycle-1" / "run" / "checkpoints" / "best.pt").is_file()
    # a rerun recomputes nothing: the enhanced files and the fine-tuned checkpoint stay as they were
    stamps = [p.stat().st_mtime_ns for p in enhanced] + [(out / "cycle-1/run/checkpoints/best.pt").stat().st_mtime_ns]
    again = cycle_run(tiny_run, fixture_dir / "pneumonia", lung_model, out, **kw)
    assert again == rows
    assert stamps == [p.stat().st_mtime_ns for p in enhanced] + [
        (out / "cycle-1/run/checkpoints/best.pt").stat().st_mtime_ns
    ]
    with pytest.raises(XraylensError, match="strength"):  # finished cycles are not reused under new settings
        cycle_run(tiny_run, fixture_dir / "pneumonia", lung_model, out, **{**kw, "strength": 0.9})


def test_the_view_keeps_the_run_split_and_a_killed_fine_tune_resumes(
    tiny_run, lung_model, fixture_dir, tmp_path, monkeypatch
):
    import xraylens.cycle.run as cyc

    calls = []

    def crashing_train(cfg, out, **kw):
        calls.append(kw.get("resume", False))
        if len(calls) == 1:  # the first fine-tune dies in its second epoch, after last.pt of the first
            kw["stop_after_batches"] = 3
        return train(cfg, out, **kw)

    monkeypatch.setattr(cyc, "train", crashing_train)
    out = tmp_path / "cyc"
    kw = {"cycles": 1, "device": "cpu", "epochs": 2, "train_last": None}
    with pytest.raises(BaseException):  # noqa: B017 - the simulated crash is whatever train raises
        cycle_run(tiny_run, fixture_dir / "pneumonia", lung_model, out, **kw)
    assert not (out / "cycle-1" / "metrics.json").exists()
    rows = cycle_run(tiny_run, fixture_dir / "pneumonia", lung_model, out, **kw)
    assert calls == [False, True] and [r["cycle"] for r in rows] == [0, 1]
    assert read_checkpoint(out / "cycle-1" / "run" / "checkpoints" / "last.pt")["epoch"] == 2
    with open(tiny_run / "splits.csv") as f:
        val = sorted(Path(r["image"]).name for r in csv.DictReader(f) if r["split"] == "val")
    assert sorted(p.name for p in (out / "original" / "val").rglob("*.jpeg")) == val
