"""Localisation annotations: shapes in ORIGINAL image coordinates, parsers for the formats the field
uses, and rasterisation onto the model-input grid through a `Geometry`.

Coordinates follow `xraylens.data.records`: a point is (x, y) = (column, row), continuous, and pixel
(r, c) covers [c, c+1) x [r, r+1). Arrays (masks, rasters) are indexed [row, col] = [y, x].

Formats:
- object-CXR `dev.csv`: `image_name,annotation`; annotation = `;`-separated entries `type x1 y1 x2 y2 ...`
  with type 0 rectangle (x1 y1 x2 y2), 1 ellipse (its bounding box x1 y1 x2 y2), 2 polygon (x y pairs);
  an empty annotation is a normal image.
- NIH `BBox_List_2017.csv`: `Image Index,Finding Label,Bbox [x,y,w,h],,,` (one box per row), or any CSV
  with columns `image,label,x,y,w,h`.
- COCO JSON: `images` / `annotations` (`bbox` [x, y, w, h], polygon `segmentation` when present) /
  `categories`.
- A folder of binary mask images (any non-zero pixel is inside), one per image, same file name.

Row numbers in error messages are spreadsheet rows: the header is row 1, the first data row is row 2.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xraylens.data.records import Geometry
from xraylens.errors import XraylensError

# --------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class _Box:
    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None = None

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class Rectangle(_Box):
    """Axis-aligned box [x0, x1] x [y0, y1] (x = column, y = row), original-image coordinates."""


@dataclass(frozen=True)
class Ellipse(_Box):
    """The axis-aligned ellipse inscribed in the box [x0, x1] x [y0, y1] (object-CXR type 1)."""


@dataclass(frozen=True)
class Polygon:
    """Closed polygon through `points` ((x, y) vertices, in order); interior by the even-odd rule."""

    points: tuple[tuple[float, float], ...]
    label: str | None = None

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        p = np.asarray(self.points, dtype=np.float64)
        return (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max()))


@dataclass(frozen=True, eq=False)
class Mask:
    """Binary mask on the original pixel grid: `array[row, col]` is True where pixel (row, col) is inside."""

    array: np.ndarray
    label: str | None = None

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        rows, cols = np.nonzero(self.array)
        if rows.size == 0:
            return (0.0, 0.0, 0.0, 0.0)
        return (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))


Shape = Rectangle | Ellipse | Polygon | Mask


@dataclass
class Annotation:
    """What is annotated on one image. `shapes == []` means a normal image (nothing to point at)."""

    shapes: list[Shape] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # image-level findings, in order of appearance
    # (width, height) of the image the coordinates were drawn on, when the file says (COCO does);
    # None = the image file itself. Images are often shared downscaled, their annotations not.
    size: tuple[int, int] | None = None

    @property
    def is_empty(self) -> bool:
        return not self.shapes

    def select(self, label: str) -> list[Shape]:
        """The shapes of one finding (e.g. the NIH boxes labelled "Effusion")."""
        return [s for s in self.shapes if s.label == label]

    def _add(self, shape: Shape | None, label: str | None) -> None:
        if shape is not None:
            self.shapes.append(shape)
        if label and label not in self.labels:
            self.labels.append(label)


class AnnotationSet(dict[str, Annotation]):
    """`{image file name as written in the file: Annotation}` plus what was skipped.

    `skipped` holds `(row, reason)` for rows dropped with `skip_bad=True` (row = spreadsheet row, or the
    index in the COCO `annotations` list, or the mask file name). `dropped` holds, per image key,
    `(count, reason)` for shapes that `shapes_on_images` left out because the model sees none of them
    (outside the image or its centre crop)."""

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.source = source
        self.skipped: list[tuple[int | str, str]] = []
        self.dropped: dict[str, tuple[int, str]] = {}

    def _get(self, key: str) -> Annotation:
        if key not in self:
            self[key] = Annotation()
        return self[key]


# -------------------------------------------------------------------------------------------- parsers


def _float(tok: str, what: str) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise ValueError(f"{what} {tok!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} {tok!r} is not finite")
    return v


def _check_box(x0: float, y0: float, x1: float, y1: float, kind: str) -> None:
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"{kind} needs x2 > x1 and y2 > y1, got {x0:g} {y0:g} {x1:g} {y1:g}")


def _parse_object_cxr_entry(entry: str, label: str) -> Shape:
    toks = entry.split()
    try:
        kind = int(toks[0])
    except ValueError:
        raise ValueError(f"shape type {toks[0]!r} is not 0 (rectangle), 1 (ellipse) or 2 (polygon)") from None
    nums = [_float(t, "coordinate") for t in toks[1:]]
    if kind in (0, 1):
        name = "rectangle" if kind == 0 else "ellipse"
        if len(nums) != 4:
            raise ValueError(f"{name} needs exactly 4 coordinates x1 y1 x2 y2, got {len(nums)}")
        _check_box(*nums, kind=name)
        return (Rectangle if kind == 0 else Ellipse)(*nums, label=label)
    if kind == 2:
        if len(nums) < 6 or len(nums) % 2:
            raise ValueError(f"polygon needs an even number of coordinates >= 6, got {len(nums)}")
        pts = tuple(zip(nums[0::2], nums[1::2], strict=True))
        return Polygon(pts, label=label)
    raise ValueError(f"shape type {kind} is not 0 (rectangle), 1 (ellipse) or 2 (polygon)")


def _open_csv(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise XraylensError(f"annotation file not found: {path}; pass the path of an existing CSV file")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise XraylensError(f"{path.name} is empty; expected a header row and one row per image")
    return rows


def _where(row: int | str) -> str:
    return f"row {row}" if isinstance(row, int) else str(row)


def _bad(out: AnnotationSet, name: str, row: int | str, reason: str, skip_bad: bool, hint: str) -> None:
    if not skip_bad:
        raise XraylensError(f"{name} {_where(row)}: {reason}; {hint}")
    out.skipped.append((row, reason))


def _require_usable(out: AnnotationSet, name: str) -> AnnotationSet:
    """Refuse a file that yields nothing to evaluate, so the caller never works on an empty set."""
    if any(a.shapes for a in out.values()):
        return out
    if out.skipped:
        first = "; ".join(f"{_where(r)}: {why}" for r, why in out.skipped[:3])
        raise XraylensError(
            f"{name}: no usable annotations, {len(out.skipped)} bad entr"
            f"{'y' if len(out.skipped) == 1 else 'ies'} skipped and no shape left "
            f"(first: {first}); fix the file"
        )
    if not out:
        raise XraylensError(f"{name} lists no images; expected one entry per annotated image")
    return out  # every image normal (no shape): a valid, if unusual, file


def read_object_cxr(path: str | os.PathLike, skip_bad: bool = False, label: str = "object") -> AnnotationSet:
    """Parse an object-CXR `dev.csv` (`image_name,annotation`).

    Every shape gets `label` (object-CXR has one finding: a foreign object). A row with an empty annotation
    is a normal image (`Annotation.shapes == []`). A row with a malformed entry raises `XraylensError`
    naming the file and row, or with `skip_bad=True` drops the whole row and records it in `.skipped`.
    """
    path = Path(path)
    rows = _open_csv(path)
    header = [h.strip().lower() for h in rows[0]]
    if "image_name" not in header or "annotation" not in header:
        raise XraylensError(
            f"{path.name} row 1: header {rows[0]!r} lacks 'image_name,annotation'; "
            "is this an object-CXR dev.csv? (NIH box lists go through read_nih)"
        )
    i_img, i_ann = header.index("image_name"), header.index("annotation")
    out = AnnotationSet(str(path))
    hint = "fix or delete the row, or pass --skip-bad to skip it"
    for rownum, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue  # blank line
        if len(row) <= i_img:
            _bad(out, path.name, rownum, "missing image_name", skip_bad, hint)
            continue
        key = row[i_img].strip()
        text = row[i_ann].strip() if len(row) > i_ann else ""
        if not key:
            _bad(out, path.name, rownum, "empty image_name", skip_bad, hint)
            continue
        try:
            shapes = [_parse_object_cxr_entry(e, label) for e in text.split(";") if e.strip()]
        except ValueError as exc:
            _bad(out, path.name, rownum, str(exc), skip_bad, hint)
            continue
        ann = out._get(key)
        for s in shapes:
            ann._add(s, label)
    return _require_usable(out, path.name)


def read_nih(path: str | os.PathLike, skip_bad: bool = False) -> AnnotationSet:
    """Parse an NIH box list: `Image Index,Finding Label,Bbox [x,y,w,h],,,` (x, y, w, h in the columns
    3-6), or a CSV with named columns `image,label,x,y,w,h`. Several rows per image are merged; each
    rectangle keeps its finding label. NIH lists only abnormal images, so no key maps to an empty
    annotation here."""
    path = Path(path)
    rows = _open_csv(path)
    header = [h.strip().lower() for h in rows[0]]
    if header and header[0] == "image index":
        cols = (0, 1, 2, 3, 4, 5)
    elif all(c in header for c in ("image", "label", "x", "y", "w", "h")):
        cols = tuple(header.index(c) for c in ("image", "label", "x", "y", "w", "h"))
    else:
        raise XraylensError(
            f"{path.name} row 1: header {rows[0]!r} is neither NIH "
            "'Image Index,Finding Label,Bbox [x,y,w,h]' nor 'image,label,x,y,w,h'; fix the header"
        )
    out = AnnotationSet(str(path))
    hint = "fix or delete the row, or pass --skip-bad to skip it"
    for rownum, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(cols):
            _bad(
                out,
                path.name,
                rownum,
                f"expected 6 fields image,label,x,y,w,h, got {len(row)}",
                skip_bad,
                hint,
            )
            continue
        key, lab = row[cols[0]].strip(), row[cols[1]].strip()
        try:
            if not key:
                raise ValueError("empty image name")
            x, y, w, h = (_float(row[c], n) for c, n in zip(cols[2:], "xywh", strict=True))
            if w <= 0 or h <= 0:
                raise ValueError(f"box width and height must be > 0, got w={w:g} h={h:g}")
        except ValueError as exc:
            _bad(out, path.name, rownum, str(exc), skip_bad, hint)
            continue
        out._get(key)._add(Rectangle(x, y, x + w, y + h, label=lab or None), lab)
    return _require_usable(out, path.name)


def read_coco(path: str | os.PathLike, skip_bad: bool = False, use_segmentation: bool = True) -> AnnotationSet:
    """Parse COCO detection JSON. Keys are `images[].file_name`; every listed image appears, those without
    annotations as normal images. Each annotation becomes a `Polygon` per polygon of its `segmentation`
    when `use_segmentation` and one is given, else a `Rectangle` from `bbox` [x, y, w, h]; its label is the
    category name. Errors name the index in the `annotations` list (`annotations[3]`)."""
    path = Path(path)
    if not path.is_file():
        raise XraylensError(f"annotation file not found: {path}; pass the path of an existing COCO JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images, anns = data["images"], data.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise XraylensError(
            f"{path.name}: not COCO JSON with 'images' and 'annotations' ({exc}); check the file"
        ) from None
    cats = {c.get("id"): c.get("name") for c in data.get("categories", []) if isinstance(c, dict)}
    out = AnnotationSet(str(path))
    by_id: dict[object, str] = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or "file_name" not in im or "id" not in im:
            raise XraylensError(f"{path.name} images[{i}]: needs 'id' and 'file_name'; fix the entry")
        by_id[im["id"]] = im["file_name"]
        entry = out._get(im["file_name"])
        if isinstance(im.get("width"), (int, float)) and isinstance(im.get("height"), (int, float)):
            entry.size = (int(im["width"]), int(im["height"]))
    hint = "fix the entry, or pass --skip-bad to skip it"
    for i, a in enumerate(anns):
        where = f"annotations[{i}]"
        try:
            if not isinstance(a, dict) or a.get("image_id") not in by_id:
                raise ValueError(f"image_id {a.get('image_id') if isinstance(a, dict) else None!r} is not in 'images'")
            label = cats.get(a.get("category_id"))
            label = str(label) if label is not None else (str(a["category_id"]) if "category_id" in a else None)
            shapes: list[Shape] = []
            seg = a.get("segmentation")
            if use_segmentation and isinstance(seg, dict):  # RLE (compressed or not): a pixel mask
                m = decode_rle(seg)
                shapes.extend([Mask(m, label=label)] if m.any() else [])
            elif use_segmentation and isinstance(seg, list) and seg:
                for poly in seg:
                    nums = [_float(str(v), "coordinate") for v in poly]
                    if len(nums) < 6 or len(nums) % 2:
                        raise ValueError(f"polygon needs an even number of coordinates >= 6, got {len(nums)}")
                    shapes.append(Polygon(tuple(zip(nums[0::2], nums[1::2], strict=True)), label=label))
            else:
                bbox = a.get("bbox")
                if not isinstance(bbox, list) or len(bbox) != 4:
                    raise ValueError(f"bbox needs 4 numbers [x, y, w, h], got {bbox!r}")
                x, y, w, h = (_float(str(v), n) for v, n in zip(bbox, "xywh", strict=True))
                if w <= 0 or h <= 0:
                    raise ValueError(f"bbox width and height must be > 0, got w={w:g} h={h:g}")
                shapes.append(Rectangle(x, y, x + w, y + h, label=label))
        except ValueError as exc:
            _bad(out, path.name, where, str(exc), skip_bad, hint)
            continue
        ann = out[by_id[a["image_id"]]]
        for s in shapes:
            ann._add(s, label)
    return _require_usable(out, path.name)


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO run-length-encoded mask ({"size": [h, w], "counts": str | bytes | [ints]}) -> bool [h, w],
    through pycocotools (column-major counts, as the COCO and CheXlocalize files store them)."""
    import warnings

    from pycocotools import mask as mask_utils

    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):  # uncompressed RLE: let pycocotools compress it first
            counts = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"]
        elif isinstance(counts, str):
            counts = counts.encode("ascii")
        with warnings.catch_warnings():  # pycocotools 2.0.x and numpy 2: a harmless copy= deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            m = mask_utils.decode({"size": [h, w], "counts": counts})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a COCO RLE mask ({type(exc).__name__}: {exc})") from None
    return np.asarray(m, dtype=bool)


def encode_rle(mask: np.ndarray) -> dict:
    """bool [h, w] -> compressed COCO RLE with `counts` as text (JSON-ready; CheXlocalize's format)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def read_rle_json(path: str | os.PathLike, skip_bad: bool = False) -> AnnotationSet:
    """CheXlocalize's segmentation JSON: {image id: {finding: COCO RLE}} (gt_segmentations_*.json).
    Each non-empty mask is a `Mask` labelled with its finding; an image whose masks are all empty is a
    normal image. Errors name the entry (`image/finding`)."""
    path = Path(path)
    if not path.is_file():
        raise XraylensError(f"annotation file not found: {path}; pass an RLE JSON file {{image: {{finding: RLE}}}}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise XraylensError(f"{path.name}: not JSON ({exc.msg} at line {exc.lineno}); check the file") from None
    if not isinstance(data, dict):
        raise XraylensError(f"{path.name}: expected {{image: {{finding: RLE}}}}, got a {type(data).__name__}")
    out = AnnotationSet(str(path))
    hint = "fix the entry, or pass --skip-bad to skip it"
    for key, per in data.items():
        if not isinstance(per, dict):
            _bad(out, path.name, str(key), "expected {finding: RLE}", skip_bad, hint)
            continue
        entry = out._get(str(key))
        for label, rle in per.items():
            try:
                m = decode_rle(rle)
            except ValueError as exc:
                _bad(out, path.name, f"{key}/{label}", str(exc), skip_bad, hint)
                continue
            entry.size = (m.shape[1], m.shape[0])
            entry._add(Mask(m, label=str(label)) if m.any() else None, str(label) if m.any() else None)
    return _require_usable(out, path.name)


_MASK_EXT = {".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".gif"}


def read_mask_folder(folder: str | os.PathLike, skip_bad: bool = False, label: str = "mask") -> AnnotationSet:
    """One binary mask image per image (same file name): any non-zero pixel is inside. An all-zero mask is
    a normal image. Unreadable files raise, or with `skip_bad=True` are recorded in `.skipped` by name."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise XraylensError(f"mask folder not found: {folder}; pass a folder of mask images")
    out = AnnotationSet(str(folder))
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in _MASK_EXT or not p.is_file():
            continue
        try:
            with Image.open(p) as im:
                arr = np.asarray(im)
        except (OSError, UnidentifiedImageError) as exc:
            _bad(
                out,
                folder.name,
                p.name,
                f"cannot read mask ({exc})",
                skip_bad,
                "replace or remove the file, or pass --skip-bad to skip it",
            )
            continue
        if arr.ndim == 3:  # RGB(A) masks: inside where any colour channel is set, alpha ignored
            arr = arr[..., :3].any(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
        m = np.asarray(arr) != 0
        ann = out._get(p.name)
        ann._add(Mask(m, label=label) if m.any() else None, label if m.any() else None)
    if not out and not out.skipped:
        raise XraylensError(f"no mask images in {folder}; expected PNG/BMP/TIFF/JPEG files named like the images")
    return _require_usable(out, folder.name)


# ------------------------------------------------------------------------------------ geometry mapping


def rescale_shapes(
    shapes: Sequence[Shape], from_size: tuple[float, float], to_size: tuple[float, float]
) -> list[Shape]:
    """Shapes drawn on an image of `from_size` (width, height) moved onto the same image at `to_size`:
    coordinates scale by to/from per axis (continuous coordinates, so corners map to corners)."""
    fw, fh = from_size
    tw, th = to_size
    if fw <= 0 or fh <= 0:
        raise XraylensError(f"annotation image size must be positive, got {from_size}")
    sx, sy = tw / fw, th / fh
    if sx == 1.0 and sy == 1.0:
        return list(shapes)
    out: list[Shape] = []
    for s in shapes:
        if isinstance(s, (Rectangle, Ellipse)):
            out.append(type(s)(s.x0 * sx, s.y0 * sy, s.x1 * sx, s.y1 * sy, label=s.label))
        elif isinstance(s, Polygon):
            out.append(Polygon(tuple((x * sx, y * sy) for x, y in s.points), label=s.label))
        else:  # a mask: nearest-neighbour onto the new grid, pixel centres mapped back
            rows = np.minimum(((np.arange(int(th)) + 0.5) / sy).astype(np.int64), s.array.shape[0] - 1)
            cols = np.minimum(((np.arange(int(tw)) + 0.5) / sx).astype(np.int64), s.array.shape[1] - 1)
            out.append(Mask(s.array[rows[:, None], cols[None, :]], label=s.label))
    return out


def shape_to_input(shape: Shape, geometry: Geometry) -> Shape:
    """Map a shape from original to model-input coordinates (crop offset, then per-axis scale). Masks
    cannot be expressed in input coordinates without resampling: use `rasterize` for them."""
    if isinstance(shape, Rectangle | Ellipse):
        (x0, y0), (x1, y1) = geometry.to_input(np.array([[shape.x0, shape.y0], [shape.x1, shape.y1]]))
        return type(shape)(float(x0), float(y0), float(x1), float(y1), label=shape.label)
    if isinstance(shape, Polygon):
        pts = geometry.to_input(np.asarray(shape.points, dtype=np.float64))
        return Polygon(tuple((float(x), float(y)) for x, y in pts), label=shape.label)
    raise TypeError(f"shape_to_input cannot map {type(shape).__name__}; rasterize it instead")


def boxes_to_input(shapes: Sequence[Shape], geometry: Geometry) -> np.ndarray:
    """Rectangles as float64 [K, 4] (x0, y0, x1, y1) in model-input coordinates: the fast path of the
    localisation metrics. Only rectangles: ellipses, polygons and masks must be rasterised, since their
    bounding box is not the annotation."""
    out = np.zeros((len(shapes), 4))
    for k, s in enumerate(shapes):
        if not isinstance(s, Rectangle):
            raise XraylensError(
                f"boxes_to_input got a {type(s).__name__}; only rectangles have an exact box form, "
                "use rasterize / rasterize_batch for ellipses, polygons and masks"
            )
        out[k] = shape_to_input(s, geometry).bbox
    return out


def pack_boxes(per_image: Sequence[Sequence[Shape]], geometries: Sequence[Geometry]) -> np.ndarray:
    """Per-image rectangle lists -> float64 [B, K, 4] in input coordinates, padded with NaN rows (K = the
    most boxes any image has, at least 1). An image with no box is all NaN: skipped by the metrics."""
    k = max([len(s) for s in per_image] + [1])
    out = np.full((len(per_image), k, 4), np.nan)
    for b, (shapes, g) in enumerate(zip(per_image, geometries, strict=True)):
        if shapes:
            out[b, : len(shapes)] = boxes_to_input(shapes, g)
    return out


# --------------------------------------------------------------------------------------- rasterisation


def _centres(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Original-image (x, y) of the model-input pixel centres: xs [out_w] per column, ys [out_h] per row.
    The geometry is separable (no rotation), so one vector per axis is exact."""
    cols = (np.arange(geometry.out_w) + 0.5) / geometry.scale_x + geometry.crop[0]
    rows = (np.arange(geometry.out_h) + 0.5) / geometry.scale_y + geometry.crop[1]
    return cols, rows


def _inside(shape: Shape, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """bool [len(ys), len(xs)]: is (xs[c], ys[r]) inside the shape (boundaries count as inside)."""
    if isinstance(shape, Rectangle):
        return ((ys >= shape.y0) & (ys <= shape.y1))[:, None] & ((xs >= shape.x0) & (xs <= shape.x1))[None, :]
    if isinstance(shape, Ellipse):
        cx, cy = (shape.x0 + shape.x1) / 2, (shape.y0 + shape.y1) / 2
        ax, ay = (shape.x1 - shape.x0) / 2, (shape.y1 - shape.y0) / 2
        return (((xs - cx) / ax) ** 2)[None, :] + (((ys - cy) / ay) ** 2)[:, None] <= 1.0
    if isinstance(shape, Polygon):
        return _inside_polygon(np.asarray(shape.points, dtype=np.float64), xs, ys)
    if isinstance(shape, Mask):
        # nearest-neighbour: the original pixel that holds the centre (floor), outside the image = False
        h, w = shape.array.shape
        ci, ri = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
        okc, okr = (ci >= 0) & (ci < w), (ri >= 0) & (ri < h)
        out = shape.array[np.clip(ri, 0, h - 1)][:, np.clip(ci, 0, w - 1)]
        return out & okr[:, None] & okc[None, :]
    raise TypeError(f"unknown shape {type(shape).__name__}")


def _inside_polygon(pts: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd rule by horizontal ray casting, vectorised over rows x edges, then over columns.
    A point on an edge counts as inside (checked separately), so rectangles drawn as polygons match
    `Rectangle` exactly."""
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    Y = ys[:, None]  # [R, 1] against edges [E]
    straddle = (y0 <= Y) != (y1 <= Y)  # edge crosses the row's horizontal line (half-open rule)
    with np.errstate(divide="ignore", invalid="ignore"):
        xcross = np.where(straddle, x0 + (Y - y0) * (x1 - x0) / (y1 - y0), np.nan)  # [R, E]
    # crossings strictly to the right of x, counted per (row, col)
    inside = (xcross[:, None, :] > xs[None, :, None]).sum(-1) % 2 == 1  # [R, C]
    # boundary points: on a segment (within 1e-9 of it, within its box)
    X = xs[None, :, None]
    Yb = ys[:, None, None]
    cross = (x1 - x0) * (Yb - y0) - (y1 - y0) * (X - x0)
    on = (
        (np.abs(cross) <= 1e-9 * (np.abs(x1 - x0) + np.abs(y1 - y0) + 1.0))
        & (X >= np.minimum(x0, x1) - 1e-12)
        & (X <= np.maximum(x0, x1) + 1e-12)
        & (Yb >= np.minimum(y0, y1) - 1e-12)
        & (Yb <= np.maximum(y0, y1) + 1e-12)
    ).any(-1)
    return inside | on


def rasterize_instances(shapes: Sequence[Shape], geometry: Geometry) -> np.ndarray:
    """One bool raster [K, out_h, out_w] per shape, indexed [k, row, col], on the model-input grid.

    Rule: an input pixel is inside when its CENTRE, mapped back to original coordinates, lies inside the
    true shape (ellipses and polygons as themselves, not their bounding boxes; boundaries inclusive).
    A shape too small to contain any pixel centre still marks the one pixel holding its bbox centre,
    so a small nodule never vanishes after downscaling (if that centre lies on the input grid)."""
    xs, ys = _centres(geometry)
    out = np.zeros((len(shapes), geometry.out_h, geometry.out_w), dtype=bool)
    for k, s in enumerate(shapes):
        out[k] = _inside(s, xs, ys)
        if not out[k].any() and not (isinstance(s, Mask) and not s.array.any()):
            x0, y0, x1, y1 = s.bbox
            ((cx, cy),) = geometry.to_input(np.array([[(x0 + x1) / 2, (y0 + y1) / 2]]))
            c, r = int(math.floor(cx)), int(math.floor(cy))
            if 0 <= r < geometry.out_h and 0 <= c < geometry.out_w:
                out[k, r, c] = True
    return out


def rasterize(shapes: Sequence[Shape], geometry: Geometry) -> np.ndarray:
    """Union of `shapes` as a bool array [out_h, out_w] indexed [row, col] on the model-input grid.
    See `rasterize_instances` for the inside rule. No shapes -> all False (a normal image)."""
    if not shapes:
        return np.zeros((geometry.out_h, geometry.out_w), dtype=bool)
    return rasterize_instances(shapes, geometry).any(0)


def rasterize_batch(
    per_image: Sequence[Sequence[Shape]], geometries: Sequence[Geometry], instances: bool = False
) -> np.ndarray:
    """Stack rasters for a batch: [B, 1, H, W] unions, or with `instances=True` [B, K, H, W] with one
    channel per shape, padded with all-False channels (K = most shapes on any image, at least 1). All
    geometries must share (out_h, out_w)."""
    sizes = {(g.out_h, g.out_w) for g in geometries}
    if len(sizes) > 1:
        raise XraylensError(f"rasterize_batch needs one input size, got {sorted(sizes)}; resize images alike")
    h, w = sizes.pop() if sizes else (0, 0)
    if not instances:
        return np.stack([rasterize(s, g) for s, g in zip(per_image, geometries, strict=True)])[:, None]
    k = max([len(s) for s in per_image] + [1])
    out = np.zeros((len(per_image), k, h, w), dtype=bool)
    for b, (s, g) in enumerate(zip(per_image, geometries, strict=True)):
        if s:
            out[b, : len(s)] = rasterize_instances(s, g)
    return out


def annotations_for(
    keys: Iterable[str], annotations: dict[str, Annotation], label: str | None = None
) -> list[list[Shape]]:
    """Shape lists in the order of `keys` (optionally only one finding). A key that is not annotated
    gives [] (treated as a normal image, skipped by the pointing game)."""
    out = []
    for k in keys:
        ann = annotations.get(k)
        shapes = [] if ann is None else (ann.shapes if label is None else ann.select(label))
        out.append(list(shapes))
    return out


# ------------------------------------------------------------------------------ shapes the model sees


def shapes_on_images(
    keys: Sequence[str | None],
    annots: AnnotationSet,
    geometries: Sequence[Geometry],
    label: str | None = None,
    ref_size: tuple[float, float] | None = None,
) -> list[list[Shape]]:
    """Shapes per image, ready to rasterise on each geometry's input grid: moved from the frame they
    were drawn in (`ref_size` (width, height), else the annotation's declared size, else the image
    itself) onto the decoded image, then without the shapes that cover no model-input pixel (outside
    the image or its centre crop). Those are recorded in `annots.dropped[key]` as (count, reason),
    rather than silently turning an annotated image into a "normal" one. A key of None or one not in
    `annots` gives []."""
    out: list[list[Shape]] = []
    for key, g in zip(keys, geometries, strict=True):
        ann = annots.get(key) if key is not None else None
        if ann is None:
            out.append([])
            continue
        drawn = list(ann.shapes if label is None else ann.select(label))
        frame = ref_size or ann.size or (g.orig_w, g.orig_h)
        moved = rescale_shapes(drawn, frame, (g.orig_w, g.orig_h))
        kept, reasons = [], []
        for orig, s in zip(drawn, moved, strict=True):
            if rasterize_instances([s], g)[0].any():
                kept.append(s)
            else:
                reasons.append(_why_unseen(orig, s, g, frame))
        if reasons:
            shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
            annots.dropped[key] = (len(reasons), f"{len(reasons)} of {len(drawn)} shape(s) dropped: {shown}")
        out.append(kept)
    return out


def _why_unseen(orig: Shape, moved: Shape, g: Geometry, frame: tuple[float, float]) -> str:
    """Why a shape covers no input pixel, in the coordinates of the annotation file (`orig`, `frame`)."""
    kind = type(orig).__name__.lower()
    ox0, oy0, ox1, oy1 = orig.bbox
    what = f"{kind} x {ox0:g}-{ox1:g}, y {oy0:g}-{oy1:g}"
    x0, y0, x1, y1 = moved.bbox  # decoded-image coordinates, where the image and crop boxes live
    if x1 <= 0 or y1 <= 0 or x0 >= g.orig_w or y0 >= g.orig_h:
        return f"{what} lies outside the {frame[0]:g}x{frame[1]:g} image"
    cx, cy, cw, ch = g.crop
    if x1 <= cx or y1 <= cy or x0 >= cx + cw or y0 >= cy + ch:
        fx, fy = frame[0] / g.orig_w, frame[1] / g.orig_h
        return (
            f"{what} lies outside the centre crop the model sees "
            f"(x {cx * fx:g}-{(cx + cw) * fx:g}, y {cy * fy:g}-{(cy + ch) * fy:g})"
        )
    return f"{what} covers no pixel centre of the {g.out_w}x{g.out_h} model input"


# ------------------------------------------------------------------------------------------- by format

FORMATS = ("object-cxr", "nih", "coco", "masks", "rle")


def read_annotations(path: str | os.PathLike, fmt: str, skip_bad: bool = False) -> AnnotationSet:
    """Read an annotation file in one of `FORMATS` (the CLI's --format)."""
    readers = {"object-cxr": read_object_cxr, "nih": read_nih, "coco": read_coco, "masks": read_mask_folder}
    readers["rle"] = read_rle_json  # CheXlocalize's {image: {finding: COCO RLE}} JSON
    if fmt not in readers:
        raise XraylensError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not Path(path).exists():
        raise XraylensError(f"annotations not found: {path}")
    return readers[fmt](path, skip_bad=skip_bad)


def match_keys(ids: Sequence[str], annotations: AnnotationSet) -> list[str | None]:
    """The annotation key of each image id: the id itself (relative path), else its file name, else its
    file name without extension (images re-encoded as PNG), each only when unique among the keys."""
    by_name: dict[str, list[str]] = {}
    by_stem: dict[str, list[str]] = {}
    for k in annotations:
        by_name.setdefault(Path(k).name, []).append(k)
        by_stem.setdefault(Path(k).stem.lower(), []).append(k)
    out: list[str | None] = []
    for i in ids:
        if i in annotations:
            out.append(i)
            continue
        cands = by_name.get(Path(i).name) or by_stem.get(Path(i).stem.lower(), [])
        out.append(cands[0] if len(cands) == 1 else None)
    return out
