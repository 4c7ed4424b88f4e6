"""Renders: overlay maths, side-by-side, titled grids, npz and CSV index files."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image

from xraylens.errors import XraylensError
from xraylens.explain.render import (
    cam_grid,
    colorize,
    load_maps_npz,
    overlay,
    save_maps_npz,
    side_by_side,
    write_index_csv,
)


def _ramp(h=24, w=32):
    grey = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1)).astype(np.uint8)
    cam = np.tile(np.linspace(0, 1, h, dtype=np.float32)[:, None], (1, w))
    return grey, cam


def test_overlay_blends_colour_map():
    grey, cam = _ramp()
    out = overlay(grey, cam, cmap="jet", alpha=0.4)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    expected = 0.6 * grey[..., None].astype(np.float32) + 0.4 * colorize(cam, "jet").astype(np.float32)
    assert np.abs(out.astype(np.float32) - expected).max() <= 1.0
    assert np.array_equal(overlay(grey, cam, alpha=0.0), np.repeat(grey[..., None], 3, axis=2))
    # torch inputs work the same; [1,H,W] maps are squeezed
    assert np.array_equal(overlay(torch.from_numpy(grey), torch.from_numpy(cam)[None]), out)


def test_overlay_errors():
    grey, cam = _ramp()
    with pytest.raises(XraylensError, match="upsample"):
        overlay(grey, cam[:10])
    with pytest.raises(XraylensError, match="alpha"):
        overlay(grey, cam, alpha=2)
    with pytest.raises(XraylensError, match="colour map"):
        overlay(grey, cam, cmap="nope")


def test_side_by_side_layout():
    grey, cam = _ramp()
    out = side_by_side(grey, [cam, 1 - cam], gap=4)
    assert out.shape == (24, 32 * 3 + 8, 3)
    assert np.array_equal(out[:, :32, 0], grey)
    assert (out[:, 32:36] == 255).all()


def test_cam_grid_titles_blanks_and_png(tmp_path):
    grey, cam = _ramp()
    images = np.stack([grey] * 5)
    cams = torch.from_numpy(np.stack([cam] * 5))[:, None]
    true = [0, 1, 1, 0, 1]
    pred = torch.tensor([0, 1, 0, 0, 1])
    probs = [0.9, 0.7, 0.95, 0.86, 0.5]
    path = tmp_path / "grid.png"
    png = cam_grid(images, cams, true=true, pred=pred, probs=probs, class_names=["NORMAL", "PNEUMONIA"],
                   blank_wrong=True, ncols=3, path=path)
    assert path.read_bytes() == png
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape[2] == 3 and img.shape[1] > img.shape[0]  # 3 columns x 2 rows
    shown = cam_grid(images, cams, true=true, pred=pred, probs=probs, blank_wrong=False, ncols=3)
    # the blanked wrong tile removes colour: fewer saturated pixels than with it drawn
    sat = lambda a: int((np.ptp(a.astype(int), axis=2) > 60).sum())  # noqa: E731
    assert sat(img) < sat(np.asarray(Image.open(io.BytesIO(shown)).convert("RGB")))
    with pytest.raises(XraylensError, match="one CAM per image"):
        cam_grid(images, cams[:2])


def test_cam_grid_titles_text(monkeypatch):
    """Tile titles: true class, prediction with probability, "Good" at >= 0.85."""
    from matplotlib.axes import Axes

    seen = []
    orig = Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda self, t, **kw: (seen.append(t), orig(self, t, **kw))[1])
    grey, cam = _ramp()
    cam_grid(np.stack([grey] * 2), np.stack([cam] * 2), true=[1, 0], pred=[1, 1], probs=[0.85, 0.6],
             class_names=["NORMAL", "PNEUMONIA"])
    assert seen == ["PNEUMONIA | pred PNEUMONIA 0.85 | Good", "NORMAL | pred PNEUMONIA 0.60"]


def test_npz_roundtrip_float16(tmp_path):
    raw = {"gradcam": {"layer4": torch.rand(3, 1, 2, 3)}, "eigencam": np.random.rand(3, 1, 2, 3)}
    path = tmp_path / "cams" / "raw.npz"
    save_maps_npz(path, ["a", "b", "c"], raw)
    ids, maps = load_maps_npz(path)
    assert ids == ["a", "b", "c"]
    assert set(maps) == {"gradcam/layer4", "eigencam"}
    assert maps["gradcam/layer4"].dtype == np.float16
    assert np.allclose(maps["gradcam/layer4"], raw["gradcam"]["layer4"].numpy(), atol=1e-3)
    assert [p.name for p in path.parent.iterdir()] == ["raw.npz"]  # no temp file left
    with pytest.raises(XraylensError, match="one id per image"):
        save_maps_npz(path, ["a"], raw)


def test_index_csv(tmp_path):
    path = tmp_path / "index.csv"
    write_index_csv(path, ["a", "b"], {"pred": torch.tensor([1, 0]), "prob": [0.9, 0.1],
                                       "constant": torch.tensor([False, True]), "file": ["a.png", "b.png"]})
    rows = list(csv.reader(path.open()))
    assert rows == [["id", "pred", "prob", "constant", "file"], ["a", "1", "0.9", "False", "a.png"],
                    ["b", "0", "0.1", "True", "b.png"]]
    with pytest.raises(XraylensError, match="one per id"):
        write_index_csv(path, ["a"], {"pred": [1, 2]})
