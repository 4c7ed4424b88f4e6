"""Localisation metrics for saliency maps, batched on whatever device the maps live on.

Conventions (shared with `xraylens.data.annotations`):
- maps are [B, 1, H, W] (or [B, H, W]) on the model-input grid, indexed [row, col];
- annotations are bool masks [B, 1, H, W] / instance masks [B, K, H, W] on the same grid (see
  `annotations.rasterize_batch`), or rectangles `boxes` [B, K, 4] as (x0, y0, x1, y1) in continuous
  model-input coordinates (x = column, y = row), NaN rows = padding (`annotations.pack_boxes`);
- a box covers the pixels whose CENTRE lies inside it, exactly as `rasterize` draws it, so the box path
  and the mask path give identical results (tested);
- `scale` = model-input pixels per ORIGINAL pixel, (sx, sy) = (Geometry.scale_x, Geometry.scale_y):
  a float, a pair, or a tensor [B] / [B, 2]. Tolerances are in original pixels.

Decisions:
- Peak = first maximum in row-major order (`argmax` of the flattened map), i.e. ties go to the top-most,
  then left-most pixel. (Quantus counts a hit if ANY tied maximum is inside.)
- A constant map (all values equal, e.g. all zero) has no peak: it is a MISS with `constant=True`,
  not skipped, so a method that returns nothing cannot raise its score by abstaining.
- An image without annotation is SKIPPED: hit = NaN, `skipped=True`, left out of means and counted
  apart. (Quantus 0.6 counts such images as hits.)
- Maps must be finite (NaN would win the argmax); callers clean NaN first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from xraylens.errors import XraylensError
from xraylens.ops import gaussian_blur

ScaleLike = float | tuple[float, float] | Sequence[float] | torch.Tensor | np.ndarray


@dataclass
class PointingResult:
    """Per-image pointing-game outcome (all tensors [B] on the maps' device)."""

    hit: torch.Tensor  # float32: 1 hit, 0 miss, NaN skipped (no annotation)
    distance: torch.Tensor  # float32: original-pixel distance peak -> annotation ("all": farthest instance)
    peak: torch.Tensor  # int64 [B, 2]: (row, col) of the peak pixel on the input grid
    constant: torch.Tensor  # bool: the map is constant (reported as a miss)
    skipped: torch.Tensor  # bool: no annotation on this image
    # float32: the "all" verdict from the same peak and distances (every instance touched), whatever
    # `mode` was; NaN where skipped, or everywhere when a union mask cannot tell instances apart
    hit_all: torch.Tensor
    # original-pixel version only (`pointing_game_original`), else None:
    point: torch.Tensor | None = None  # float64 [B, 2]: the peak's (x, y) in original-image pixels
    hit_rate: torch.Tensor | None = None  # float32: CheXlocalize hit (peak inside a shape, no tolerance)

    @property
    def accuracy(self) -> float:
        """Hits / (images with an annotation); NaN if none has one."""
        ok = ~self.skipped
        return float(self.hit[ok].mean()) if bool(ok.any()) else math.nan


# --------------------------------------------------------------------------------------------- helpers


def _bhw(maps: torch.Tensor, name: str = "maps") -> torch.Tensor:
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise XraylensError(f"{name} must be [B, 1, H, W], got {tuple(maps.shape)}; pick one channel first")
        return maps[:, 0]
    if maps.dim() == 3:
        return maps
    raise XraylensError(f"{name} must be [B, 1, H, W] or [B, H, W], got {tuple(maps.shape)}")


def _scale(scale: ScaleLike, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sx [B], sy [B]) float32 on device from a scalar, a pair, or per-image values."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=device)
    if s.dim() == 0:
        s = s.expand(b, 2)
    elif s.dim() == 1 and s.shape[0] == 2:  # always (sx, sy), even when B == 2: use [B, 2] per image
        s = s.expand(b, 2)
    elif s.dim() == 1 and s.shape[0] == b:  # one isotropic scale per image
        s = s[:, None].expand(b, 2)
    if s.shape != (b, 2) or bool((s <= 0).any()):
        raise XraylensError(f"scale must be > 0: a float, (sx, sy) or per image [B] / [B, 2]; got {tuple(s.shape)}")
    return s[:, 0], s[:, 1]


def _box_ranges(boxes: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Boxes [B, K, 4] (x0, y0, x1, y1) -> inclusive pixel-index ranges (rmin, rmax, cmin, cmax) [B, K]
    of the pixels whose centre is inside, clamped to the grid, and `valid` [B, K] (a real box with at
    least one pixel on the grid). A box holding no pixel centre keeps the pixel under its centre, as
    `annotations.rasterize` does."""
    boxes = boxes.to(torch.float64)
    x0, y0, x1, y1 = boxes.unbind(-1)
    present = torch.isfinite(boxes).all(-1)
    x0, y0, x1, y1 = (torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for v in (x0, y0, x1, y1))
    cmin, cmax = torch.ceil(x0 - 0.5), torch.floor(x1 - 0.5)
    rmin, rmax = torch.ceil(y0 - 0.5), torch.floor(y1 - 0.5)
    cc, rc = torch.floor((x0 + x1) / 2), torch.floor((y0 + y1) / 2)
    tiny = (cmin > cmax) | (rmin > rmax)
    cmin, cmax = torch.where(tiny, cc, cmin), torch.where(tiny, cc, cmax)
    rmin, rmax = torch.where(tiny, rc, rmin), torch.where(tiny, rc, rmax)
    valid = present & (cmax >= 0) & (cmin <= w - 1) & (rmax >= 0) & (rmin <= h - 1)
    cmin, cmax = cmin.clamp(0, w - 1), cmax.clamp(0, w - 1)
    rmin, rmax = rmin.clamp(0, h - 1), rmax.clamp(0, h - 1)
    return rmin.long(), rmax.long(), cmin.long(), cmax.long(), valid


def _annotation_args(
    maps: torch.Tensor,
    masks: torch.Tensor | None,
    boxes: torch.Tensor | np.ndarray | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if (masks is None) == (boxes is None):
        raise XraylensError("pass exactly one of masks= (bool [B, 1, H, W]) or boxes= ([B, K, 4] x0 y0 x1 y1)")
    if masks is not None:
        masks = masks.to(device=maps.device)
        if masks.dim() == 3:
            masks = masks[:, None]
        if masks.dim() != 4 or masks.shape[0] != maps.shape[0] or masks.shape[-2:] != maps.shape[-2:]:
            raise XraylensError(
                f"masks {tuple(masks.shape)} do not match maps {tuple(maps.shape)}; rasterise the "
                "annotations on the maps' grid (annotations.rasterize_batch)"
            )
        return masks.bool(), None
    boxes = torch.as_tensor(boxes, device=maps.device)
    if boxes.dim() == 2:
        boxes = boxes[:, None]
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != maps.shape[0]:
        raise XraylensError(f"boxes must be [B, K, 4] with B = {maps.shape[0]}, got {tuple(boxes.shape)}")
    return None, boxes


def _chunks(b: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, b)) for i in range(0, b, max(1, size))]


# ------------------------------------------------------------------------------------------ pointing


def _peaks(
    m: torch.Tensor, chunk_size: int, smooth_sigma: float = 0.0, offsets: bool = False
) -> tuple[torch.Tensor, ...]:
    """First maximum in row-major order of each map [B, H, W] -> (row [B], col [B], constant [B]).

    One streaming pass per chunk (row maxima), then small ops: the peak row is the first row holding
    the map's maximum, the peak column the first column of that row holding it - exactly argmax of the
    flattened map, but `amax` streams ~5x faster than `max(dim)`/`argmax` on CPU. Constant maps: a
    map is a candidate when a strided sample of its pixels all equal the maximum; only candidates get
    the exact (full) min check, so the result is exact and normal maps cost nothing extra."""
    b, h, w = m.shape
    dev = m.device
    pr = torch.empty(b, dtype=torch.long, device=dev)
    pc = torch.empty(b, dtype=torch.long, device=dev)
    constant = torch.zeros(b, dtype=torch.bool, device=dev)
    sub = torch.zeros(b, 2, dtype=torch.float64, device=dev)  # sub-pixel (dx, dy), see _subpixel
    step = max(1, (h * w) // 64)
    for sl in _chunks(b, chunk_size):
        c = m[sl]
        if smooth_sigma > 0:
            c = gaussian_blur(c[:, None].float(), smooth_sigma)[:, 0]
        rowmax = c.amax(dim=2)  # [b, H]
        vmax = rowmax.amax(dim=1)
        r = (rowmax == vmax[:, None]).to(torch.uint8).argmax(dim=1)  # first row with the maximum
        row = c[torch.arange(c.shape[0], device=dev), r]  # [b, W]
        pr[sl] = r
        pc[sl] = (row == vmax[:, None]).to(torch.uint8).argmax(dim=1)
        flat = c.reshape(c.shape[0], -1)
        cand = (flat[:, ::step] == vmax[:, None]).all(dim=1)
        if bool(cand.any()):
            idx = cand.nonzero()[:, 0]
            constant[sl][idx] = flat[idx].amin(dim=1) == vmax[idx]
        if offsets:
            sub[sl] = _subpixel(c, pr[sl], pc[sl])
    return (pr, pc, constant, sub) if offsets else (pr, pc, constant)


def _subpixel(c: torch.Tensor, r: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Sub-pixel offset (dx, dy) [n, 2] of each map's peak from its pixel centre: the vertex of the
    parabola through the peak and its two neighbours, per axis, clamped to half a pixel; 0 where a
    neighbour is off the grid or the three are not a strict peak. A two-pixel plateau moves the peak to
    the middle of the two. Where the continuous (bilinearly upsampled) map peaks, within the pixel."""
    n, h, w = c.shape
    ar = torch.arange(n, device=c.device)
    v = c[ar, r, col].double()

    def axis(lo_ok: torch.Tensor, hi_ok: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        curv = lo - 2 * v + hi
        d = torch.where(curv < 0, 0.5 * (lo - hi) / torch.where(curv < 0, curv, -1.0), 0.0)
        return torch.where(lo_ok & hi_ok, d.clamp(-0.5, 0.5), 0.0)

    left = c[ar, r, (col - 1).clamp(min=0)].double()
    right = c[ar, r, (col + 1).clamp(max=w - 1)].double()
    up = c[ar, (r - 1).clamp(min=0), col].double()
    down = c[ar, (r + 1).clamp(max=h - 1), col].double()
    dx = axis(col > 0, col < w - 1, left, right)
    dy = axis(r > 0, r < h - 1, up, down)
    return torch.stack([dx, dy], -1)


@torch.no_grad()
def pointing_game(
    maps: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    boxes: torch.Tensor | np.ndarray | None = None,
    instance_masks: torch.Tensor | None = None,
    tolerance: float = 15.0,
    scale: ScaleLike = 1.0,
    smooth_sigma: float = 0.0,
    mode: str = "any",
    chunk_size: int = 1024,
) -> PointingResult:
    """Pointing game (Zhang et al. 2018, TorchRay's definition): take the map's peak; it is a hit when a
    disc of radius `tolerance` ORIGINAL pixels around it touches the annotation. On the input grid the
    disc is an ellipse with semi-axes tolerance*sx (columns) and tolerance*sy (rows); "touches" means an
    annotated pixel centre lies in it (distance measured centre to centre), so tolerance 0 = the peak
    pixel itself is annotated.

    Annotation: `masks` bool [B, 1, H, W] (union), or `instance_masks` [B, K, H, W] (one channel per
    box/shape, all-False channels are padding), or `boxes` [B, K, 4] (fast, analytic, identical result).
    mode "any": hit if some instance is touched; "all": every instance must be touched (needs instances
    or boxes). `smooth_sigma` (input pixels) blurs the map before taking the peak.
    Peak ties, constant maps and empty annotations: see the module docstring.
    """
    if mode not in ("any", "all"):
        raise XraylensError(f"pointing game mode must be 'any' or 'all', got {mode!r}")
    if tolerance < 0:
        raise XraylensError(f"tolerance must be >= 0 original pixels, got {tolerance}")
    m = _bhw(maps)
    b, h, w = m.shape
    dev = m.device
    if instance_masks is not None:
        if masks is not None or boxes is not None:
            raise XraylensError("pass one of masks=, instance_masks= or boxes=, not several")
        inst, _ = _annotation_args(maps, instance_masks, None)
        boxes_t = None
    else:
        union, boxes_t = _annotation_args(maps, masks, boxes)
        if boxes_t is None and mode == "all":
            raise XraylensError(
                "mode='all' needs instance_masks= [B, K, H, W] or boxes=; a union mask cannot tell boxes apart"
            )
        inst = union
    sx, sy = _scale(scale, b, dev)

    pr, pc, constant = _peaks(m, chunk_size, smooth_sigma)

    if boxes_t is not None:
        rmin, rmax, cmin, cmax, valid = _box_ranges(boxes_t, h, w)
        dc = (cmin - pc[:, None]).clamp(min=0) + (pc[:, None] - cmax).clamp(min=0)  # [B, K] pixel steps
        dr = (rmin - pr[:, None]).clamp(min=0) + (pr[:, None] - rmax).clamp(min=0)
        d = torch.sqrt((dc / sx[:, None]) ** 2 + (dr / sy[:, None]) ** 2)
    else:
        d = torch.empty(b, inst.shape[1], device=dev)
        valid = torch.empty(b, inst.shape[1], dtype=torch.bool, device=dev)
        rows = torch.arange(h, device=dev, dtype=torch.float32)
        cols = torch.arange(w, device=dev, dtype=torch.float32)
        for sl in _chunks(b, max(1, chunk_size // max(1, inst.shape[1]))):
            d2r = ((rows[None] - pr[sl, None]) / sy[sl, None]) ** 2  # [b, H]
            d2c = ((cols[None] - pc[sl, None]) / sx[sl, None]) ** 2  # [b, W]
            d2 = (d2r[:, :, None] + d2c[:, None, :])[:, None]  # [b, 1, H, W]
            mk = inst[sl]
            d[sl] = d2.masked_fill(~mk, math.inf).amin(dim=(-2, -1)).sqrt()
            valid[sl] = mk.flatten(2).any(-1)

    dist_any = torch.where(valid, d, torch.full_like(d, math.inf)).amin(-1)
    dist_all = torch.where(valid, d, torch.zeros_like(d)).amax(-1)
    skipped = ~valid.any(-1)
    eps = 1e-6 * (1.0 + tolerance)  # float error in the scale division must not flip a border hit
    nan = torch.full_like(dist_any, math.nan)

    def verdict(dist: torch.Tensor) -> torch.Tensor:
        hit = torch.where(constant, 0.0, (dist <= tolerance + eps).float())
        return torch.where(skipped, nan, hit)

    dist = dist_any if mode == "any" else dist_all
    hit = verdict(dist)
    hit_all = verdict(dist_all) if instance_masks is not None or boxes_t is not None else nan
    dist = torch.where(skipped | constant, nan, dist).float()
    return PointingResult(hit, dist, torch.stack([pr, pc], -1), constant, skipped, hit_all)


# ------------------------------------------------------------------- pointing in original-image pixels


def _offset(offset: ScaleLike, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ox [B], oy [B]) float64: the crop's top-left corner in original pixels (0 = no crop)."""
    o = torch.as_tensor(offset, dtype=torch.float64, device=device)
    if o.dim() == 0:
        o = o.expand(b, 2)
    elif o.dim() == 1 and o.shape[0] == 2:
        o = o.expand(b, 2)
    if o.shape != (b, 2) or not bool(torch.isfinite(o).all()):
        raise XraylensError(f"offset must be finite: a float, (x0, y0) or per image [B, 2]; got {tuple(o.shape)}")
    return o[:, 0], o[:, 1]


def _segment_distance(pts: np.ndarray, x: float, y: float) -> float:
    """Distance from (x, y) to the closed polyline through `pts` [E, 2] (the polygon's boundary)."""
    a, b = pts, np.roll(pts, -1, axis=0)
    ab = b - a
    ap = np.array([x, y]) - a
    t = np.clip((ap * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-300), 0.0, 1.0)
    return float(np.sqrt(((ap - t[:, None] * ab) ** 2).sum(1)).min())


def _ellipse_polygon(s, n: int = 512) -> np.ndarray:
    cx, cy = (s.x0 + s.x1) / 2, (s.y0 + s.y1) / 2
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + (s.x1 - s.x0) / 2 * np.cos(t), cy + (s.y1 - s.y0) / 2 * np.sin(t)], -1)


def shape_distance(shape, x: float, y: float) -> float:
    """Euclidean distance in original pixels from the point (x, y) to a continuous annotation shape of
    `xraylens.data.annotations` (0 inside; boundaries inside). Rectangles and polygons exactly; an
    ellipse through a 512-gon (error below 2e-5 of its radius); a mask as the union of its pixel squares
    [c, c+1) x [r, r+1), so a point inside an annotated pixel is at distance 0 (CheXlocalize's
    `gt_mask[row][col]` test) and any other point measures to the nearest pixel's edge."""
    from xraylens.data.annotations import Ellipse, Mask, Polygon, Rectangle, _inside_polygon

    if isinstance(shape, Rectangle):
        dx = max(shape.x0 - x, 0.0, x - shape.x1)
        dy = max(shape.y0 - y, 0.0, y - shape.y1)
        return math.hypot(dx, dy)
    if isinstance(shape, Ellipse):
        ax, ay = (shape.x1 - shape.x0) / 2, (shape.y1 - shape.y0) / 2
        cx, cy = (shape.x0 + shape.x1) / 2, (shape.y0 + shape.y1) / 2
        if ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0:
            return 0.0
        return _segment_distance(_ellipse_polygon(shape), x, y)
    if isinstance(shape, Polygon):
        pts = np.asarray(shape.points, dtype=np.float64)
        if _inside_polygon(pts, np.array([x]), np.array([y]))[0, 0]:
            return 0.0
        return _segment_distance(pts, x, y)
    if isinstance(shape, Mask):
        a = shape.array
        r, c = math.floor(y), math.floor(x)
        if 0 <= r < a.shape[0] and 0 <= c < a.shape[1] and a[r, c]:
            return 0.0
        rows, cols = np.nonzero(a)
        if rows.size == 0:
            return math.inf
        dx = np.maximum(np.maximum(cols - x, 0.0), x - (cols + 1))
        dy = np.maximum(np.maximum(rows - y, 0.0), y - (rows + 1))
        return float(np.sqrt(dx * dx + dy * dy).min())
    raise TypeError(f"unknown shape {type(shape).__name__}")


@torch.no_grad()
def pointing_game_original(
    maps: torch.Tensor,
    *,
    boxes: torch.Tensor | np.ndarray | None = None,
    shapes: Sequence[Sequence[object]] | None = None,
    scale: ScaleLike = 1.0,
    offset: ScaleLike = 0.0,
    tolerance: float = 15.0,
    smooth_sigma: float = 0.0,
    mode: str = "any",
    subpixel: bool = True,
    chunk_size: int = 1024,
) -> PointingResult:
    """Pointing game measured in the ORIGINAL image, as TorchRay and CheXlocalize do, instead of on the
    model-input grid (`pointing_game`): a 128-px model on 512-px images has 4-px steps there, and a
    verdict near the tolerance can flip (e.g. 16.0 px on the grid for a true 13.9 px).

    The peak is the map's first maximum (as `pointing_game`), refined to sub-pixel by a parabola per axis
    (`subpixel`), then taken back through the run's geometry: x = x_in / sx + x0, y = y_in / sy + y0
    (`scale` = (sx, sy) input pixels per original pixel, `offset` = the crop's corner (x0, y0), both per
    image or shared). Its Euclidean distance to each annotation is measured to the continuous shape in
    original pixels: `boxes` [B, K, 4] (x0, y0, x1, y1, original coordinates, NaN rows = padding; fast,
    batched) or `shapes` (per image, lists of `annotations` shapes on the decoded original image).
    Hit = distance <= `tolerance`; `hit_rate` = distance 0 (the peak lies inside a shape: CheXlocalize's
    hit). Constant maps miss, images without a shape are skipped (module docstring)."""
    if mode not in ("any", "all"):
        raise XraylensError(f"pointing game mode must be 'any' or 'all', got {mode!r}")
    if tolerance < 0:
        raise XraylensError(f"tolerance must be >= 0 original pixels, got {tolerance}")
    if (boxes is None) == (shapes is None):
        raise XraylensError("pass exactly one of boxes= ([B, K, 4] original x0 y0 x1 y1) or shapes= (per image)")
    m = _bhw(maps)
    b = m.shape[0]
    dev = m.device
    sx, sy = _scale(scale, b, dev)
    ox, oy = _offset(offset, b, dev)
    pr, pc, constant, sub = _peaks(m, chunk_size, smooth_sigma, offsets=True)
    if not subpixel:
        sub = torch.zeros_like(sub)
    px = (pc.double() + 0.5 + sub[:, 0]) / sx.double() + ox
    py = (pr.double() + 0.5 + sub[:, 1]) / sy.double() + oy
    if boxes is not None:
        bx = torch.as_tensor(boxes, dtype=torch.float64, device=dev)
        if bx.dim() == 2:
            bx = bx[:, None]
        if bx.dim() != 3 or bx.shape[-1] != 4 or bx.shape[0] != b:
            raise XraylensError(f"boxes must be [B, K, 4] with B = {b}, got {tuple(bx.shape)}")
        valid = torch.isfinite(bx).all(-1)
        x0, y0, x1, y1 = bx.nan_to_num(0.0).unbind(-1)
        dx = torch.maximum(x0 - px[:, None], px[:, None] - x1).clamp(min=0)
        dy = torch.maximum(y0 - py[:, None], py[:, None] - y1).clamp(min=0)
        d = torch.sqrt(dx * dx + dy * dy)
    else:
        if len(shapes) != b:
            raise XraylensError(f"shapes must hold one list per map: {len(shapes)} lists for {b} maps")
        k = max([len(s) for s in shapes] + [1])
        d = torch.full((b, k), math.inf, dtype=torch.float64)
        valid = torch.zeros(b, k, dtype=torch.bool)
        xs, ys = px.cpu().tolist(), py.cpu().tolist()
        for i, per in enumerate(shapes):
            for j, s in enumerate(per):
                d[i, j] = shape_distance(s, xs[i], ys[i])
                valid[i, j] = math.isfinite(float(d[i, j]))
        d, valid = d.to(dev), valid.to(dev)
    dist_any = torch.where(valid, d, torch.full_like(d, math.inf)).amin(-1)
    dist_all = torch.where(valid, d, torch.zeros_like(d)).amax(-1)
    skipped = ~valid.any(-1)
    eps = 1e-9 * (1.0 + tolerance)
    nan = torch.full((b,), math.nan, dtype=torch.float32, device=dev)

    def verdict(dist: torch.Tensor, tol: float) -> torch.Tensor:
        hit = torch.where(constant, 0.0, (dist <= tol + eps).float())
        return torch.where(skipped, nan, hit)

    dist = dist_any if mode == "any" else dist_all
    return PointingResult(
        hit=verdict(dist, tolerance),
        distance=torch.where(skipped | constant, math.nan, dist).float(),
        peak=torch.stack([pr, pc], -1),
        constant=constant,
        skipped=skipped,
        hit_all=verdict(dist_all, tolerance),
        point=torch.stack([px, py], -1),
        hit_rate=verdict(dist_any, 0.0),
    )


# ---------------------------------------------------------------- CheXlocalize-style segmentation
#
# Saporta et al. 2022 (github.com/rajpurkarlab/cheXlocalize, heatmap_to_segmentation.py / eval.py):
# each map is upsampled bilinearly to the original image, min-max normalised, and binarised by Otsu's
# threshold on its 8-bit version (regions filled) or by a per-class threshold tuned on a validation
# split (grid 0.2 ... 0.8, maximising mIoU); a predicted probability below a cutoff gives an empty
# mask. IoU per image; by default (their true_pos_only=True) only images where both the predicted and
# the true mask are non-empty count, else every image where either is non-empty (an empty prediction
# against a lesion, or a prediction on a normal image, scores 0).

TUNE_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # CheXlocalize's np.arange(0.2, .8, .1), which ends at 0.8
IOU_COUNTS = ("both-nonempty", "all")


def map_to_original(map_in: torch.Tensor, geometry) -> torch.Tensor:
    """A model-input map [H, W] (or [1, H, W]) back on the original image [orig_h, orig_w] float32:
    bilinear (align_corners=False, as CheXlocalize) onto the crop region, the map's minimum outside it
    (the model saw nothing there, so a normalised map is 0 there)."""
    import torch.nn.functional as F

    m = map_in.reshape(map_in.shape[-2], map_in.shape[-1]).float()
    x0, y0, cw, ch = geometry.crop
    c0, r0 = int(round(x0)), int(round(y0))
    c1, r1 = min(geometry.orig_w, int(round(x0 + cw))), min(geometry.orig_h, int(round(y0 + ch)))
    up = F.interpolate(m[None, None], size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False)[0, 0]
    if (r0, c0, r1, c1) == (0, 0, geometry.orig_h, geometry.orig_w):
        return up
    out = torch.full((geometry.orig_h, geometry.orig_w), float(m.min()), device=m.device)
    out[r0:r1, c0:c1] = up
    return out


def normalise01(m: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """(m - min) / (max - min); a constant map gives all zeros (nothing stands out). Numpy in, numpy
    out: one original-size map is small work that torch's thread pool only slows down on a busy CPU."""
    if isinstance(m, np.ndarray):
        lo, hi = float(m.min()), float(m.max())
        return (m - lo) * np.float32(1.0 / (hi - lo)) if hi > lo else np.zeros_like(m)
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if bool(hi > lo) else torch.zeros_like(m)


def otsu_threshold(u8: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image (OpenCV's THRESH_OTSU): the level t maximising the
    between-class variance of {<= t} and {> t}; the first such t on ties."""
    hist = np.bincount(np.asarray(u8, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * levels)
    mt = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where((w0 > 0) & (w1 > 0), (mt * w0 - m0) ** 2 / (w0 * w1), -1.0)
    return int(np.argmax(var))


def segment_map(norm: torch.Tensor | np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Binary mask (bool numpy) from a normalised [0, 1] map: `threshold` None = Otsu on
    uint8(255 * map), `> t`, with holes filled (CheXlocalize fills every contour it finds); a number t
    = `map > t`. An all-zero map (constant input) gives an empty mask."""
    from scipy.ndimage import binary_fill_holes

    a = norm.detach().cpu().numpy() if isinstance(norm, torch.Tensor) else np.asarray(norm)
    if threshold is not None:
        return a > threshold
    u8 = (255.0 * a).astype(np.uint8)  # truncation, as np.uint8(255 * mask)
    if u8.max() == 0:
        return np.zeros(a.shape, dtype=bool)
    return binary_fill_holes(u8 > otsu_threshold(u8))


def mask_iou(pred: np.ndarray, gt: np.ndarray, count: str = "both-nonempty") -> float:
    """IoU of two bool masks; NaN (not counted) when `count` is "both-nonempty" and either is empty,
    or when both are empty under "all" (CheXlocalize's calculate_iou, true_pos_only True / False)."""
    if count not in IOU_COUNTS:
        raise XraylensError(f"--iou-count must be one of {', '.join(IOU_COUNTS)}, got {count!r}")
    ps, gs = bool(pred.any()), bool(gt.any())
    if (count == "both-nonempty" and not (ps and gs)) or not (ps or gs):
        return math.nan
    return float(np.logical_and(pred, gt).sum() / np.logical_or(pred, gt).sum())


def ious_at_thresholds(
    norm: torch.Tensor | np.ndarray,
    gt: np.ndarray,
    thresholds: Sequence[float] = TUNE_GRID,
    count: str = "both-nonempty",
) -> np.ndarray:
    """IoU of `norm > t` against `gt` for each t, [T] (NaN where it does not count): the tuning table."""
    return np.array([mask_iou(segment_map(norm, t), gt, count) for t in thresholds])


def tune_thresholds(
    ious: Sequence[np.ndarray], classes: Sequence[str], thresholds: Sequence[float] = TUNE_GRID
) -> dict[str, float]:
    """Per class, the threshold of `thresholds` with the highest mIoU (NaN-skipping mean over that
    class's images of the [T] rows in `ious`; first on ties), as CheXlocalize's tune_heatmap_threshold.
    A class whose images never count keeps the middle of the grid (0.5)."""
    if len(ious) != len(classes):
        raise XraylensError(f"{len(ious)} IoU rows but {len(classes)} classes; pass one class per image")
    table = np.stack([np.asarray(r, dtype=np.float64) for r in ious]) if len(ious) else np.zeros((0, len(thresholds)))
    labels = np.asarray([str(c) for c in classes], dtype=object)
    out: dict[str, float] = {}
    for c in sorted(set(labels)):
        rows = table[labels == c]
        ok = np.isfinite(rows)
        n = ok.sum(0)
        if not n.any():
            out[c] = 0.5
            continue
        miou = np.where(n > 0, np.where(ok, rows, 0.0).sum(0) / np.maximum(n, 1), -1.0)
        out[c] = float(thresholds[int(np.argmax(miou))])
    return out


def representative_point(mask: np.ndarray) -> tuple[float, float] | None:
    """The (x, y) pixel centre of a reader's mask that lies farthest inside it (Euclidean distance
    transform): the second reader's "most representative point" for the hit rate, as CheXlocalize's
    human benchmark marks one point per finding. None for an empty mask."""
    from scipy.ndimage import distance_transform_edt

    if not mask.any():
        return None
    r, c = np.unravel_index(int(np.argmax(distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1])), mask.shape)
    return (float(c) + 0.5, float(r) + 0.5)


# -------------------------------------------------------------------------------------------- energy


def _window_sum(
    c: torch.Tensor, rmin: torch.Tensor, rmax: torch.Tensor, cmin: torch.Tensor, cmax: torch.Tensor
) -> torch.Tensor:
    """Sum of c[n, rmin:rmax+1, cmin:cmax+1] for each map of c [n, H, W] (inclusive, in-grid ranges).

    Reads a [hb, wb] window per map (the chunk's largest box extent) through a strided view - a virtual
    tensor of every window start - indexed once at each map's start: no per-image loop, no [n, H, W]
    mask. Windows are shifted inside the grid at the bottom/right edges; the separable row/column
    weights then select exactly the box."""
    n, h, w = c.shape
    dev = c.device
    c = c.contiguous()
    hb = int((rmax - rmin + 1).max())
    wb = int((cmax - cmin + 1).max())
    sr = rmin.clamp(max=h - hb)
    sc = cmin.clamp(max=w - wb)
    starts = c.as_strided((n, h * w - (hb - 1) * w - (wb - 1), hb, wb), (h * w, 1, w, 1))
    blk = starts[torch.arange(n, device=dev), sr * w + sc]  # [n, hb, wb] copy of each window
    i = torch.arange(hb, device=dev)[None]
    j = torch.arange(wb, device=dev)[None]
    okr = ((i >= (rmin - sr)[:, None]) & (i <= (rmax - sr)[:, None])).to(c.dtype)
    okc = ((j >= (cmin - sc)[:, None]) & (j <= (cmax - sc)[:, None])).to(c.dtype)
    return torch.bmm(torch.bmm(okr[:, None, :], blk), okc[:, :, None]).view(n)


def _box_union_energy(p: torch.Tensor, boxes: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, ...]:
    """Positive energy inside the union of boxes and in total, [B] each, without building [B, H, W]
    masks for single boxes: the box sum reads only a window per map (`_window_sum`); the total is one
    `sum` pass, plus an `amin` pass telling which maps have negative values (only those pay for relu)."""
    b, h, w = p.shape
    dev = p.device
    rmin, rmax, cmin, cmax, valid = _box_ranges(boxes, h, w)
    rr = torch.arange(h, device=dev)
    cc = torch.arange(w, device=dev)
    rowm = (rr[None, None] >= rmin[..., None]) & (rr[None, None] <= rmax[..., None]) & valid[..., None]
    colm = (cc[None, None] >= cmin[..., None]) & (cc[None, None] <= cmax[..., None]) & valid[..., None]
    e_in = torch.empty(b, dtype=torch.float32, device=dev)
    e_tot = torch.empty(b, dtype=torch.float32, device=dev)
    for sl in _chunks(b, chunk_size):
        c = p[sl]
        c = c if c.dtype == torch.float32 else c.float()
        neg = c.amin(dim=(1, 2)) < 0  # CAMs are usually >= 0 already: relu only where needed
        any_neg = bool(neg.any())
        if any_neg:
            c = c.clone()
            c[neg] = c[neg].clamp(min=0)
        if boxes.shape[1] == 1:
            e_tot[sl] = c.sum(dim=(1, 2))
            e_in[sl] = _window_sum(c, rmin[sl, 0], rmax[sl, 0], cmin[sl, 0], cmax[sl, 0]) * valid[sl, 0]
        else:  # several boxes: a union is not separable, build the chunk's mask
            mk = (rowm[sl, :, :, None] & colm[sl, :, None, :]).any(1)
            e_in[sl] = (c * mk).sum(dim=(-2, -1))
            e_tot[sl] = c.sum(dim=(-2, -1))
    return e_in, e_tot, valid.any(-1)


@torch.no_grad()
def energy_pointing_game(
    maps: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    boxes: torch.Tensor | np.ndarray | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Energy-based pointing game (Score-CAM, Wang et al. 2020): the share of the map's POSITIVE energy
    that falls inside the annotation, sum(relu(map) * mask) / sum(relu(map)), per image [B] float32.
    NaN when the image has no annotation (skipped); 0 when the map has no positive energy."""
    m = _bhw(maps)
    masks_t, boxes_t = _annotation_args(maps, masks, boxes)
    if boxes_t is not None:
        e_in, e_tot, has = _box_union_energy(m, boxes_t, chunk_size)
    else:
        mk = masks_t[:, 0]
        p = m.float().clamp(min=0)
        e_in, e_tot, has = (p * mk).sum((-2, -1)), p.sum((-2, -1)), mk.flatten(1).any(-1)
    frac = torch.where(e_tot > 0, e_in / e_tot.clamp(min=1e-30), torch.zeros_like(e_in))
    return torch.where(has, frac, torch.full_like(frac, math.nan))


@dataclass
class MaskEnergy:
    """CAM-in-mask energy measures for (lung) masks, [B] float32 each, on relu(map):

    - energy_fraction = E_in / E_total (same as the energy pointing game);
    - area_normalised = energy_fraction / (mask area / image area): 1 = no better than a uniform map,
      > 1 = energy concentrated in the mask;
    - mean_ratio = mean map value inside / mean map value outside the mask: inf when nothing is outside
      the mask's energy-wise but some inside, NaN when both are 0 or the mask is empty or full.
    """

    energy_fraction: torch.Tensor
    area_normalised: torch.Tensor
    mean_ratio: torch.Tensor


@torch.no_grad()
def mask_energy_ratio(maps: torch.Tensor, masks: torch.Tensor) -> MaskEnergy:
    """CAM-in-mask energy ratio for lung masks; see `MaskEnergy` for the two definitions."""
    m = _bhw(maps)
    mk = _annotation_args(maps, masks, None)[0][:, 0]
    p = m.float().clamp(min=0)
    n = float(mk.shape[-1] * mk.shape[-2])
    a_in = mk.sum((-2, -1)).float()
    a_out = n - a_in
    e_in = (p * mk).sum((-2, -1))
    e_tot = p.sum((-2, -1))
    e_out = e_tot - e_in
    nan = torch.full_like(e_in, math.nan)
    frac = torch.where(e_tot > 0, e_in / e_tot.clamp(min=1e-30), torch.zeros_like(e_in))
    frac = torch.where(a_in > 0, frac, nan)
    norm = torch.where((a_in > 0) & (a_out > 0), frac / (a_in / n), nan)
    mean_in = e_in / a_in.clamp(min=1)
    mean_out = e_out / a_out.clamp(min=1)
    ratio = torch.where(mean_out > 0, mean_in / mean_out.clamp(min=1e-30), torch.where(mean_in > 0, math.inf, nan))
    ratio = torch.where((a_in > 0) & (a_out > 0), ratio, nan)
    return MaskEnergy(frac, norm, ratio)


def border_region(h: int, w: int, width: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [H, W]: the band of `width` (a fraction of each side: round(width*H) rows at the top and
    bottom, round(width*W) columns left and right, at least one pixel) along the image edge."""
    if not 0 < width < 0.5:
        raise XraylensError(f"--border must be in (0, 0.5) (a fraction of the side), got {width}")
    bh, bw = max(1, round(width * h)), max(1, round(width * w))
    r = torch.zeros(h, w, dtype=torch.bool, device=device)
    r[:bh], r[-bh:], r[:, :bw], r[:, -bw:] = True, True, True, True
    return r


def corner_region(h: int, w: int, size: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [H, W]: the four corner rectangles of round(size*H) x round(size*W) pixels (at least one)."""
    if not 0 < size <= 0.5:
        raise XraylensError(f"--corner must be in (0, 0.5] (a fraction of the side), got {size}")
    ch, cw = max(1, round(size * h)), max(1, round(size * w))
    r = torch.zeros(h, w, dtype=torch.bool, device=device)
    for rows in (slice(0, ch), slice(h - ch, h)):
        for cols in (slice(0, cw), slice(w - cw, w)):
            r[rows, cols] = True
    return r


@torch.no_grad()
def region_energy(maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Share of each map's POSITIVE energy inside one fixed `region` (bool [H, W], the same for every
    image: a border band, the corners), [B] float32; 0 when the map has no positive energy. A uniform
    map scores the region's area share, so compare with the baselines."""
    m = _bhw(maps)
    if region.shape != m.shape[-2:]:
        raise XraylensError(f"region {tuple(region.shape)} does not match maps {tuple(m.shape)}")
    p = m.float().clamp(min=0)
    e_in = (p * region.to(p.device)).sum((-2, -1))
    e_tot = p.sum((-2, -1))
    return torch.where(e_tot > 0, e_in / e_tot.clamp(min=1e-30), torch.zeros_like(e_in))


@torch.no_grad()
def border_energy(maps: torch.Tensor, width: float = 0.1) -> torch.Tensor:
    """Share of positive CAM energy in the edge band of `width` (fraction of the side), [B]: where
    burned-in markers, collimation edges and the void around the body live."""
    m = _bhw(maps)
    return region_energy(m, border_region(m.shape[-2], m.shape[-1], width, m.device))


@torch.no_grad()
def corner_energy(maps: torch.Tensor, size: float = 0.15) -> torch.Tensor:
    """Share of positive CAM energy in the four corner squares of side `size` (fraction of the side), [B]."""
    m = _bhw(maps)
    return region_energy(m, corner_region(m.shape[-2], m.shape[-1], size, m.device))


@torch.no_grad()
def iou_at_percentile(maps: torch.Tensor, masks: torch.Tensor, percentile: float = 90.0) -> torch.Tensor:
    """IoU between the annotation and the map thresholded at its own percentile, [B] float32.

    The binary map keeps the n_keep = max(1, round((1 - percentile/100) * H*W)) highest pixels: it is
    `map >= t` with t the n_keep-th largest value, so ties at t are all kept (a constant map keeps
    everything). NaN when the image has no annotation."""
    if not 0.0 <= percentile < 100.0:
        raise XraylensError(f"percentile must be in [0, 100), got {percentile}")
    m = _bhw(maps)
    mk = _annotation_args(maps, masks, None)[0][:, 0]
    flat = m.reshape(m.shape[0], -1).float()
    n = flat.shape[1]
    keep = max(1, int(round((1.0 - percentile / 100.0) * n)))
    t = torch.kthvalue(flat, n - keep + 1, dim=1).values  # the keep-th largest
    binary = flat >= t[:, None]
    mflat = mk.reshape(mk.shape[0], -1)
    inter = (binary & mflat).sum(-1).float()
    union = (binary | mflat).sum(-1).float()
    iou = inter / union.clamp(min=1)
    return torch.where(mflat.any(-1), iou, torch.full_like(iou, math.nan))


# ------------------------------------------------------------------------------------------ baselines


def center_map(b: int, h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Baseline map [B, 1, H, W]: 1 at the image centre falling linearly with distance (0 at the corners).
    With an even size the four central pixels tie and the peak is the top-left one (argmax rule)."""
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5 - h / 2
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5 - w / 2
    d = torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    m = 1.0 - d / math.hypot(h / 2, w / 2)
    return m.expand(b, 1, h, w).contiguous()


def random_map(b: int, h: int, w: int, seed: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Baseline map [B, 1, H, W] of uniform [0, 1) noise, reproducible from `seed` (CPU generator, then
    moved, so every device gets the same maps)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, h, w, generator=g).to(device)


# ---------------------------------------------------------------------------------------- aggregation


@dataclass
class AggregateRow:
    method: str
    cls: str  # a class name, or "all"
    mean: float  # mean over counted images (NaN if none)
    n: int  # images counted
    n_skipped: int  # images without annotation (NaN values)


def aggregate(
    values: Mapping[str, torch.Tensor | np.ndarray | Sequence[float]],
    classes: Sequence[str] | None = None,
) -> list[AggregateRow]:
    """Per-image results -> mean per method and class, plus "all". `values[method]` holds one value per
    image (hits 0/1, energies...; NaN = skipped), `classes` the class of each image (same order)."""
    rows: list[AggregateRow] = []
    for method, v in values.items():
        arr = v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
        arr = arr.reshape(-1)
        labels = np.asarray(["all"] * arr.size if classes is None else list(classes), dtype=object)
        if labels.size != arr.size:
            raise XraylensError(f"{method}: {arr.size} values but {labels.size} classes; pass one class per image")
        groups = ([] if classes is None else sorted({str(c) for c in labels})) + ["all"]
        for g in groups:
            sel = arr if g == "all" else arr[labels == g]
            ok = ~np.isnan(sel)
            mean = float(sel[ok].mean()) if ok.any() else math.nan
            rows.append(AggregateRow(method, g, mean, int(ok.sum()), int((~ok).sum())))
    return rows
