"""Localisation metrics on hand-built maps with known answers, plus a cross-check against Quantus."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from xraylens.data.annotations import Ellipse, Rectangle, pack_boxes, rasterize_batch, read_object_cxr
from xraylens.data.records import Geometry
from xraylens.errors import XraylensError
from xraylens.localize.metrics import (
    aggregate,
    center_map,
    energy_pointing_game,
    iou_at_percentile,
    mask_energy_ratio,
    pointing_game,
    random_map,
)

H = W = 64
BOX = [10.0, 10.0, 20.0, 20.0]  # x0 y0 x1 y1 (input px) -> rows 10..19, cols 10..19


def peak_map(points, h=H, w=W):
    """One map per (row, col) with a single maximum there."""
    m = torch.zeros(len(points), 1, h, w)
    for i, (r, c) in enumerate(points):
        m[i, 0, r, c] = 1.0
    return m


def box_mask(boxes, h=H, w=W):
    g = Geometry(h, w, (0.0, 0.0, float(w), float(h)), h, w)
    shapes = [[Rectangle(*b) for b in bs if not any(math.isnan(v) for v in b)] for bs in boxes]
    return torch.from_numpy(rasterize_batch(shapes, [g] * len(boxes)))


def both_paths(maps, boxes, **kw):
    """Pointing game through boxes and through rasterised masks must agree exactly."""
    by_box = pointing_game(maps, boxes=torch.tensor(boxes), **kw)
    if kw.get("mode", "any") == "all":
        g = Geometry(maps.shape[-2], maps.shape[-1], (0.0, 0.0, maps.shape[-1], maps.shape[-2]), *maps.shape[-2:])
        shapes = [[Rectangle(*b) for b in bs if not any(math.isnan(v) for v in b)] for bs in boxes]
        inst = rasterize_batch(shapes, [g] * len(boxes), instances=True)
        by_mask = pointing_game(maps, instance_masks=torch.from_numpy(inst), **kw)
    else:
        by_mask = pointing_game(maps, box_mask(boxes, *maps.shape[-2:]), **kw)
    assert torch.equal(by_box.hit.nan_to_num(-1), by_mask.hit.nan_to_num(-1))
    assert torch.allclose(by_box.distance, by_mask.distance, equal_nan=True)
    return by_box


def test_peak_on_border_and_just_outside():
    maps = peak_map([(10, 19), (19, 10), (10, 20), (9, 15)])  # last col/row inside, then one step out
    r0 = both_paths(maps, [[BOX]] * 4, tolerance=0)
    assert r0.hit.tolist() == [1, 1, 0, 0]
    r15 = both_paths(maps, [[BOX]] * 4, tolerance=15)
    assert r15.hit.tolist() == [1, 1, 1, 1]
    assert r15.distance.tolist() == [0, 0, 1, 1]


def test_peak_ten_pixels_outside():
    maps = peak_map([(15, 29)])  # 10 columns right of the last box column (19)
    for tol, expected in [(0, 0.0), (9.9, 0.0), (10, 1.0), (15, 1.0)]:
        assert both_paths(maps, [[BOX]], tolerance=tol).hit.item() == expected
    diag = peak_map([(27, 27)])  # 8 px right and 8 px down: distance 8*sqrt(2) = 11.3
    assert both_paths(diag, [[BOX]], tolerance=11).hit.item() == 0
    assert both_paths(diag, [[BOX]], tolerance=11.4).hit.item() == 1


def test_anisotropic_geometry_tolerance_in_original_pixels():
    # original 512 wide x 256 high squashed to 64 x 64: sx = 1/8, sy = 1/4 input px per original px
    g = Geometry(256, 512, (0.0, 0.0, 512.0, 256.0), 64, 64)
    shapes = [[Rectangle(80, 40, 160, 80)]] * 2  # input (10, 10, 20, 20)
    boxes = torch.from_numpy(pack_boxes(shapes, [g, g]))
    assert boxes[0, 0].tolist() == BOX
    maps = peak_map([(15, 21), (23, 15)])  # 2 input cols right = 16 orig px; 4 input rows down = 16 orig px
    scale = (g.scale_x, g.scale_y)
    r = pointing_game(maps, boxes=boxes, tolerance=15, scale=scale)
    assert r.hit.tolist() == [0, 0] and r.distance.tolist() == [16, 16]
    maps = peak_map([(15, 20), (22, 15)])  # 8 and 12 original px
    r = pointing_game(maps, boxes=boxes, tolerance=15, scale=scale)
    assert r.hit.tolist() == [1, 1] and r.distance.tolist() == [8, 12]
    # the mask path with per-image [B, 2] scales agrees; an isotropic scale would not
    masks = torch.from_numpy(rasterize_batch(shapes, [g, g]))
    rm = pointing_game(maps, masks, tolerance=15, scale=torch.tensor([scale, scale]))
    assert rm.hit.tolist() == [1, 1]
    assert pointing_game(maps, masks, tolerance=15, scale=g.scale_x).hit.tolist() == [1, 0]


def test_several_boxes_any_all():
    boxes = [[BOX, [40.0, 40.0, 50.0, 50.0]]] * 3
    maps = peak_map([(15, 15), (45, 45), (30, 30)])
    assert both_paths(maps, boxes, tolerance=0, mode="any").hit.tolist() == [1, 1, 0]
    assert both_paths(maps, boxes, tolerance=0, mode="all").hit.tolist() == [0, 0, 0]
    # from (30, 30) the nearest pixels of the two boxes are 11*sqrt(2) and 10*sqrt(2) away
    r = both_paths(maps, boxes, tolerance=15.6, mode="all")
    assert r.hit.tolist() == [0, 0, 1]
    assert r.distance[2].item() == pytest.approx(11 * math.sqrt(2))
    with pytest.raises(XraylensError, match="mode='all' needs instance_masks"):
        pointing_game(maps, box_mask(boxes), mode="all")


def test_empty_annotation_is_skipped_not_counted():
    maps = peak_map([(15, 15), (0, 0), (40, 40)])
    boxes = np.array([[BOX], [[np.nan] * 4], [BOX]])
    r = pointing_game(maps, boxes=boxes, tolerance=0)
    assert r.skipped.tolist() == [False, True, False]
    assert r.hit[0] == 1 and math.isnan(r.hit[1]) and r.hit[2] == 0
    assert r.accuracy == 0.5
    masks = box_mask([[BOX], [], [BOX]])
    assert torch.equal(pointing_game(maps, masks, tolerance=0).hit.nan_to_num(-1), r.hit.nan_to_num(-1))
    assert math.isnan(energy_pointing_game(maps, masks)[1])


def test_all_zero_map_is_a_flagged_miss():
    maps = torch.zeros(2, 1, H, W)
    maps[1, 0, 0, 0] = 1.0
    boxes = [[[0.0, 0.0, 64.0, 64.0]]] * 2  # the whole image: any peak would "hit"
    r = both_paths(maps, boxes, tolerance=15)
    assert r.constant.tolist() == [True, False] and r.hit.tolist() == [0, 1]
    assert energy_pointing_game(maps, boxes=torch.tensor(boxes))[0] == 0


def test_ties_go_to_first_in_row_major_order():
    m = torch.zeros(1, 1, H, W)
    m[0, 0, 40, 5] = m[0, 0, 12, 50] = m[0, 0, 12, 55] = 1.0
    r = pointing_game(m, boxes=[[BOX]], tolerance=0)
    assert r.peak.tolist() == [[12, 50]]


def test_non_square_maps_and_smoothing():
    h, w = 30, 90
    m = torch.zeros(1, 1, h, w)
    m[0, 0, 5:25, 60:80] = 0.6  # broad blob in the box
    m[0, 0, 2, 5] = 1.0  # a single hot pixel far away
    boxes = [[[60.0, 5.0, 80.0, 25.0]]]
    r = both_paths(m, boxes, tolerance=0)
    assert r.peak.tolist() == [[2, 5]] and r.hit.item() == 0
    rs = both_paths(m, boxes, tolerance=0, smooth_sigma=2.0)
    assert rs.hit.item() == 1 and 5 <= rs.peak[0, 0] < 25 and 60 <= rs.peak[0, 1] < 80


def test_boxes_and_masks_agree_on_random_input():
    g = torch.Generator().manual_seed(0)
    b = 40
    maps = torch.rand(b, 1, 48, 80, generator=g)
    xy = torch.rand(b, 3, 2, generator=g) * torch.tensor([80.0, 48.0])
    wh = torch.rand(b, 3, 2, generator=g) * 20 + 0.3
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[::5, 1:] = math.nan  # some images with one box
    scale = torch.rand(b, 2, generator=g) + 0.3
    for mode in ("any", "all"):
        for tol in (0.0, 4.0, 15.0):
            both_paths(maps, boxes.tolist(), tolerance=tol, scale=scale, mode=mode)
    mk = box_mask(boxes.tolist(), 48, 80)
    assert torch.allclose(energy_pointing_game(maps, boxes=boxes), energy_pointing_game(maps, mk), atol=1e-5)


def test_energy_known_values():
    m = torch.full((1, 1, H, W), 0.5)
    m[0, 0, 10:20, 10:20] = 2.0  # inside energy 200, outside 0.5 * (4096 - 100) = 1998
    m2 = m - 1.0  # negative values carry no energy: inside 100, outside 0
    maps = torch.cat([m, m2])
    e = energy_pointing_game(maps, boxes=[[BOX], [BOX]])
    assert e.tolist() == pytest.approx([200 / 2198, 1.0])
    r = mask_energy_ratio(maps, box_mask([[BOX], [BOX]]))
    assert r.energy_fraction.tolist() == pytest.approx([200 / 2198, 1.0])
    assert r.area_normalised[0].item() == pytest.approx(200 / 2198 / (100 / 4096))
    assert r.mean_ratio[0].item() == pytest.approx(2.0 / 0.5) and math.isinf(r.mean_ratio[1])


def test_iou_at_percentile():
    m = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(1))
    m[0, 0, 0:8, 0:20] += 2.0  # 160 px = the top 10 % of 1600
    masks = box_mask([[[0.0, 0.0, 20.0, 8.0]], [[0.0, 0.0, 20.0, 4.0]]], 40, 40)
    iou = iou_at_percentile(m.expand(2, 1, 40, 40), masks, percentile=90)
    assert iou.tolist() == pytest.approx([1.0, 0.5])
    assert iou_at_percentile(torch.zeros(1, 1, 40, 40), masks[:1], 90).item() == pytest.approx(160 / 1600)


def test_baselines_and_aggregate():
    c = center_map(2, 31, 41)
    assert c.shape == (2, 1, 31, 41)
    assert pointing_game(c, boxes=[[[20, 15, 21, 16]]] * 2, tolerance=0).hit.tolist() == [1, 1]
    assert torch.equal(random_map(3, 8, 8, seed=4), random_map(3, 8, 8, seed=4))
    assert not torch.equal(random_map(3, 8, 8, seed=4), random_map(3, 8, 8, seed=5))
    rows = aggregate(
        {"gradcam": torch.tensor([1.0, 0.0, math.nan, 1.0]), "center": [0.0, 0.0, math.nan, 1.0]},
        classes=["a", "a", "b", "b"],
    )
    got = {(r.method, r.cls): (r.mean, r.n, r.n_skipped) for r in rows}
    assert got[("gradcam", "a")] == (0.5, 2, 0)
    assert got[("gradcam", "b")] == (1.0, 1, 1)
    assert got[("gradcam", "all")] == (pytest.approx(2 / 3), 3, 1)
    assert got[("center", "all")][0] == pytest.approx(1 / 3)


def test_real_fixture_shapes_through_geometry(fixture_dir):
    ann = read_object_cxr(fixture_dir / "cxr_bbox" / "dev_objectcxr_format.csv")
    keys = sorted(ann)
    g = Geometry(256, 256, (0.0, 0.0, 256.0, 256.0), 224, 224)
    inst = torch.from_numpy(rasterize_batch([ann[k].shapes for k in keys], [g] * len(keys), instances=True))
    union = inst.any(1, keepdim=True)
    maps = center_map(len(keys), 224, 224)
    scale = (g.scale_x, g.scale_y)
    r_any = pointing_game(maps, union, tolerance=15, scale=scale)
    r_inst = pointing_game(maps, instance_masks=inst, tolerance=15, scale=scale)
    r_all = pointing_game(maps, instance_masks=inst, tolerance=15, scale=scale, mode="all")
    assert torch.equal(r_any.hit, r_inst.hit) and bool((r_all.hit <= r_any.hit).all())
    # the "all" verdict comes with every call on instances, equal to a separate mode="all" call
    assert torch.equal(r_inst.hit_all, r_all.hit) and torch.equal(r_all.hit_all, r_all.hit)
    assert r_any.hit_all.isnan().all()  # a union mask cannot tell its instances apart
    assert not r_any.skipped.any()
    # the ellipse image (bbox 9 62 71 83): its centre is annotated, the bbox corner is not
    e = ann["00014253_010.png"].shapes[0]
    i = keys.index("00014253_010.png")
    assert isinstance(e, Ellipse) and union[i, 0, 63, 35] and not union[i, 0, 55, 8]


# ------------------------------------------------------------------------------------------- Quantus


def test_matches_quantus_without_tolerance():
    quantus = pytest.importorskip("quantus")
    g = torch.Generator().manual_seed(3)
    b = 24
    maps = torch.rand(b, 1, 32, 32, generator=g)  # continuous values: no tied maxima
    xy = torch.randint(0, 24, (b, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(2, 9, (b, 2), generator=g)], -1)[:, None]
    masks = box_mask(boxes.tolist(), 32, 32)
    maps[::2] += 0.5 * masks[::2]  # half the maps peak inside their box
    masks[-1] = False  # one image without annotation
    x = np.zeros((b, 1, 32, 32), dtype=np.float32)
    y = np.zeros(b, dtype=np.int64)
    a, s = maps.numpy(), masks.numpy().astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q_pg = np.array(quantus.PointingGame(disable_warnings=True)(None, x, y, a, s), dtype=float)
        q_rma = np.array(quantus.RelevanceMassAccuracy(disable_warnings=True)(None, x, y, a, s), dtype=float)
    ours = pointing_game(maps, masks, tolerance=0).hit.numpy()
    assert 0 < np.nansum(ours) < b - 1  # the check is not trivial
    np.testing.assert_array_equal(ours[:-1], q_pg[:-1])
    np.testing.assert_allclose(energy_pointing_game(maps, masks).numpy()[:-1], q_rma[:-1], rtol=1e-5)
    # where we differ on purpose: Quantus scores an image without annotation as a hit, we skip it
    assert q_pg[-1] == 1.0 and math.isnan(ours[-1])


def test_border_and_corner_energy_known_values():
    from xraylens.localize.metrics import border_energy, border_region, corner_energy, corner_region

    assert int(border_region(20, 20, 0.1).sum()) == 400 - 16 * 16
    assert int(corner_region(20, 20, 0.15).sum()) == 4 * 9
    maps = torch.zeros(3, 1, 20, 20)
    maps[0, 0, 0, 0] = 1.0  # all energy in a corner (and so in the band)
    maps[1, 0, 10, 10] = 1.0  # all in the middle
    maps[2] = 1.0  # uniform: the regions' area shares
    assert border_energy(maps, 0.1).tolist() == pytest.approx([1.0, 0.0, 144 / 400])
    assert corner_energy(maps, 0.15).tolist() == pytest.approx([1.0, 0.0, 36 / 400])
    assert corner_energy(torch.zeros(1, 1, 20, 20)).tolist() == [0.0]  # no energy: 0, like the energy game
    with pytest.raises(XraylensError, match="--border"):
        border_energy(maps, 0.5)
    with pytest.raises(XraylensError, match="--corner"):
        corner_energy(maps, 0.0)


def test_lung_energy_rises_on_the_lesion_box_and_falls_off_it(tmp_path):
    """Phantoms with known boxes: the mask-energy share (box as the mask) follows a CAM blob moved
    from far away onto the box, and drops again when it is moved off."""
    from xraylens.data.annotations import read_nih, shapes_on_images
    from xraylens.data.cache import prepare_image
    from xraylens.data.phantom import write_phantom
    from xraylens.localize.metrics import mask_energy_ratio

    root = write_phantom(tmp_path / "ph", n_train=0, n_val=0, n_test=12, size=64, seed=0)
    annots = read_nih(root / "boxes.csv")
    files = sorted((root / "test" / "opacity").glob("*.png"))
    assert files
    geoms = [prepare_image(f, 64)[1] for f in files]
    shapes = shapes_on_images([f.name for f in files], annots, geoms, None, None)
    masks = torch.from_numpy(rasterize_batch(shapes, geoms))
    ys, xs = torch.meshgrid(torch.arange(64.0) + 0.5, torch.arange(64.0) + 0.5, indexing="ij")

    def blob(cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
        return torch.exp(-((xs - cx[:, None, None]) ** 2 + (ys - cy[:, None, None]) ** 2) / (2 * 3.0**2))[:, None]

    rr, cc = torch.nonzero(masks[:, 0], as_tuple=True)[1:]
    n = masks.flatten(1).sum(1).float()
    cy = torch.stack([rr[torch.nonzero(masks[:, 0], as_tuple=True)[0] == i].float().mean() for i in range(len(files))])
    cx = torch.stack([cc[torch.nonzero(masks[:, 0], as_tuple=True)[0] == i].float().mean() for i in range(len(files))])
    assert bool((n > 0).all())
    cy, cx = cy + 0.5, cx + 0.5  # pixel centres of the box
    far_x, far_y = torch.where(cx < 32, 60.0, 4.0), torch.where(cy < 32, 60.0, 4.0)  # the opposite corner
    uniform = mask_energy_ratio(torch.ones(len(files), 1, 64, 64), masks).energy_fraction
    shares = []
    for t in (0.0, 0.5, 1.0):  # far -> halfway -> on the box
        m = blob(far_x + t * (cx - far_x), far_y + t * (cy - far_y))
        shares.append(mask_energy_ratio(m, masks).energy_fraction)
    assert bool((shares[0] < uniform).all()) and bool((shares[2] > uniform).all())
    assert bool((shares[0] <= shares[1]).all()) and bool((shares[1] < shares[2]).all())
    off = mask_energy_ratio(blob(far_x, far_y), masks).energy_fraction  # and moved off again
    assert bool((off < shares[2]).all())


# ------------------------------------------------------------------------ original-image pixels


def test_original_pixels_true_distance_inside_grid_distance_outside():
    """The issue's NIH case: a 128-px model on a 512-px image (4 original px per model px). The peak's
    pixel centre is original (202, 202); a box 13.9 px to its right is a hit at tolerance 15 in the
    original image, while the model-grid measure (centre to the first pixel centre inside the box,
    4-px steps) says 16 px: a miss."""
    from xraylens.localize.metrics import pointing_game_original

    maps = peak_map([(50, 50)], 128, 128)
    box = [202.0 + 13.9, 180.0, 260.0, 220.0]  # original pixels
    new = pointing_game_original(maps, boxes=torch.tensor([[box]]), scale=0.25, tolerance=15)
    old = pointing_game(maps, boxes=torch.tensor([[[v * 0.25 for v in box]]]), scale=0.25, tolerance=15)
    assert new.hit.tolist() == [1.0] and new.distance[0].item() == pytest.approx(13.9, abs=1e-4)
    assert old.hit.tolist() == [0.0] and old.distance[0].item() == pytest.approx(16.0)
    assert new.point[0].tolist() == [202.0, 202.0]
    # the same answer through the shape path (Rectangle in original coordinates)
    via_shape = pointing_game_original(maps, shapes=[[Rectangle(*box)]], scale=0.25, tolerance=15)
    assert via_shape.hit.tolist() == [1.0] and via_shape.distance[0].item() == pytest.approx(13.9, abs=1e-4)


def test_original_pixels_true_distance_outside_grid_distance_inside():
    """The reverse: the map's peak leans left (its left neighbour is nearly as high), so its sub-pixel
    position is 0.41 model px = 1.64 original px left of the pixel centre. A box whose first pixel
    centre is 3 model steps away (12 px on the grid) is 13.6 px from that peak: a hit on the grid at
    tolerance 13, a miss in the original image."""
    from xraylens.localize.metrics import pointing_game_original

    maps = peak_map([(50, 50)], 128, 128)
    maps[0, 0, 50, 49] = 0.9
    box = [214.0, 180.0, 260.0, 220.0]  # input x0 53.5: the pixel centre 53.5 is inside -> 3 steps
    new = pointing_game_original(maps, boxes=torch.tensor([[box]]), scale=0.25, tolerance=13)
    old = pointing_game(maps, boxes=torch.tensor([[[v * 0.25 for v in box]]]), scale=0.25, tolerance=13)
    shift = 0.5 * 0.9 / (0.9 - 2.0) * 4  # the parabola's vertex, in original pixels
    assert new.point[0, 0].item() == pytest.approx(202.0 + shift)
    assert new.distance[0].item() == pytest.approx(214.0 - 202.0 - shift)
    assert new.hit.tolist() == [0.0] and old.hit.tolist() == [1.0]
    assert old.distance[0].item() == pytest.approx(12.0)
    # without the sub-pixel step the peak is the pixel centre: 12 px, a hit again
    flat = pointing_game_original(maps, boxes=torch.tensor([[box]]), scale=0.25, tolerance=13, subpixel=False)
    assert flat.distance[0].item() == pytest.approx(12.0) and flat.hit.tolist() == [1.0]


def test_original_pixels_crop_offset_and_shapes():
    """A centre crop moves the peak by the crop's corner; ellipses and polygons are measured to their
    true outline (not their bounding box); boxes and shapes paths agree on random input."""
    from xraylens.data.annotations import Polygon
    from xraylens.localize.metrics import pointing_game_original, shape_distance

    maps = peak_map([(10, 10)], 32, 32)
    # crop corner (16, 8), 2 original px per model px: centre (10.5, 10.5) -> (37, 29)
    r = pointing_game_original(maps, boxes=torch.tensor([[[40.0, 29.0, 50.0, 30.0]]]), scale=0.5, offset=(16, 8))
    assert r.point[0].tolist() == [37.0, 29.0] and r.distance[0].item() == pytest.approx(3.0)
    e = Ellipse(0.0, 0.0, 20.0, 10.0)  # centre (10, 5), semi-axes 10 and 5
    assert shape_distance(e, 10.0, 5.0) == 0.0
    assert shape_distance(e, 10.0, -3.0) == pytest.approx(3.0, abs=1e-3)  # above the top vertex
    assert shape_distance(e, 23.0, 5.0) == pytest.approx(3.0, abs=1e-3)
    corner = shape_distance(e, 20.0, 10.0)  # the bounding box's corner is outside the ellipse
    assert 2.0 < corner < 3.5
    tri = Polygon(((0.0, 0.0), (10.0, 0.0), (0.0, 10.0)))
    assert shape_distance(tri, 1.0, 1.0) == 0.0
    assert shape_distance(tri, 10.0, 10.0) == pytest.approx(10 / math.sqrt(2))
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(64, 1, 24, 24, generator=g)
    xy = torch.rand(64, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 5 + torch.rand(64, 2, generator=g) * 20], -1)[:, None].double()
    kw = dict(scale=(0.25, 0.3), offset=(3.0, 1.0), tolerance=10)
    a = pointing_game_original(maps, boxes=boxes, **kw)
    b = pointing_game_original(maps, shapes=[[Rectangle(*bx[0].tolist())] for bx in boxes], **kw)
    assert torch.equal(a.hit, b.hit) and torch.allclose(a.distance, b.distance)
    assert torch.equal(a.hit_rate, b.hit_rate)
    # an image without a shape is skipped, a constant map misses
    c = pointing_game_original(torch.zeros(2, 1, 8, 8), shapes=[[], [Rectangle(0, 0, 40, 40)]], scale=0.25)
    assert math.isnan(c.hit[0].item()) and c.hit[1].item() == 0.0 and bool(c.constant[1])
