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
    png = cam_grid(
        images,
        cams,
        true=true,
        pred=pred,
        probs=probs,
        class_names=["NORMAL", "PNEUMONIA"],
        blank_wrong=True,
        ncols=3,
        path=path,
    )
    assert path.read_bytes() == png
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape[2] == 3 and img.shape[1] > img.shape[0]  # 3 columns x 2 rows
    shown = cam_grid(images, cams, true=true, pred=pred, probs=probs, blank_wrong=False, ncols=3)
    # the blanked wrong tile removes colour: fewer saturated pixels than with it drawn
    sat = lambda a: int((np.ptp(a.astype(int), axis=2) > 60).sum())  # noqa: E731
    assert sat(img) < sat(np.asarray(Image.open(io.BytesIO(shown)).convert("RGB")))
    with pytest.raises(XraylensError, match="one CAM per image"):
        cam_grid(images, cams[:2])


@pytest.fixture
def titles(monkeypatch):
    """(text, colour) of every tile title cam_grid sets."""
    from matplotlib.axes import Axes

    seen: list[tuple[str, str]] = []
    orig = Axes.set_title
    monkeypatch.setattr(
        Axes, "set_title", lambda self, t, **kw: (seen.append((t, kw.get("color"))), orig(self, t, **kw))[1]
    )
    return seen


def _grid(n, **kw):
    grey, cam = _ramp()
    return cam_grid(np.stack([grey] * n), np.stack([cam] * n), class_names=["NORMAL", "PNEUMONIA"], **kw)


def test_cam_grid_titles_text(titles):
    """Tile titles: true class, prediction with probability; "Good" = correct and p >= 0.85."""
    _grid(4, true=[1, 0, 0, 1], pred=[1, 1, 0, 1], probs=[0.85, 0.6, 0.5, 0.84])
    assert titles == [
        ("PNEUMONIA | pred PNEUMONIA 0.85 | Good", "green"),
        ("NORMAL | pred PNEUMONIA 0.60 | wrong", "red"),
        ("NORMAL | pred NORMAL 0.50", "green"),
        ("PNEUMONIA | pred PNEUMONIA 0.84", "green"),
    ]


def test_cam_grid_confident_wrong_prediction_is_not_good(titles):
    # the seed notebooks' "Good" means a correct prediction scored >= 85 %, never a confident mistake
    _grid(1, true=[1], pred=[0], probs=[0.90])
    assert titles == [("PNEUMONIA | pred NORMAL 0.90 | wrong", "red")]


def test_cam_grid_unlabelled_tiles_are_neither_right_nor_wrong(titles):
    _grid(2, true=None, pred=[0, 1], probs=[0.95, 0.4])
    assert titles == [("pred NORMAL 0.95", "black"), ("pred PNEUMONIA 0.40", "black")]
    titles.clear()
    # per tile: -1 or None = no label for that image; the labelled ones are still judged
    _grid(3, true=np.array([-1, 0, -1]), pred=[0, 1, 1], probs=[0.9, 0.9, 0.9])
    _grid(2, true=[None, 1], pred=torch.tensor([0, 1]), probs=[0.9, 0.9])
    assert titles == [
        ("pred NORMAL 0.90", "black"),
        ("NORMAL | pred PNEUMONIA 0.90 | wrong", "red"),
        ("pred PNEUMONIA 0.90", "black"),
        ("pred NORMAL 0.90", "black"),
        ("PNEUMONIA | pred PNEUMONIA 0.90 | Good", "green"),
    ]


def test_cam_grid_blank_wrong_keeps_unlabelled_tiles():
    kw = {"true": [-1, -1], "pred": [0, 1], "probs": [0.9, 0.9], "ncols": 2}
    assert _grid(2, blank_wrong=True, **kw) == _grid(2, blank_wrong=False, **kw)
    with pytest.raises(XraylensError, match="3 true values for 2 images; pass one per image"):
        _grid(2, true=[0, 1, 1], pred=[0, 1])
    with pytest.raises(XraylensError, match="1 probabilities for 2 images"):
        _grid(2, pred=[0, 1], probs=[0.5])


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
    write_index_csv(
        path,
        ["a", "b"],
        {
            "pred": torch.tensor([1, 0]),
            "prob": [0.9, 0.1],
            "constant": torch.tensor([False, True]),
            "file": ["a.png", "b.png"],
        },
    )
    rows = list(csv.reader(path.open()))
    assert rows == [
        ["id", "pred", "prob", "constant", "file"],
        ["a", "1", "0.9", "False", "a.png"],
        ["b", "0", "0.1", "True", "b.png"],
    ]
    with pytest.raises(XraylensError, match="one per id"):
        write_index_csv(path, ["a"], {"pred": [1, 2]})
