"""Pictures and files from CAMs: overlays, side-by-side panels, titled grids, and raw-map archives.

Colour maps come from matplotlib, images are written with Pillow, every file through ``xraylens.io``'s
atomic writers. Inputs may be numpy arrays or torch tensors (moved to the CPU here, at the edge).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xraylens.errors import XraylensError
from xraylens.io import atomic_path, write_csv


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            a = a.float()
        a = a.numpy()
    return np.asarray(a)


def _grey(image: Any) -> np.ndarray:
    g = _np(image)
    if g.ndim == 3 and g.shape[0] in (1, 3) and g.shape[-1] not in (1, 3):
        g = g.transpose(1, 2, 0)  # CHW -> HWC
    if g.ndim == 3:
        g = g[..., 0] if g.shape[-1] == 1 else g.mean(axis=-1)
    if g.ndim != 2:
        raise XraylensError(f"expected a greyscale image [H,W], got shape {g.shape}")
    if g.dtype != np.uint8:
        # floats in [0,1] or [0,255]: scale rather than wrap around
        g = np.clip(g * 255.0 if g.max(initial=0) <= 1.0 else g, 0, 255).round().astype(np.uint8)
    return g


def _cam(cam: Any, shape: tuple[int, int]) -> np.ndarray:
    c = _np(cam).astype(np.float32)
    c = c.reshape(c.shape[-2:]) if c.ndim > 2 and np.prod(c.shape[:-2]) == 1 else c
    if c.shape != shape:
        raise XraylensError(f"CAM shape {c.shape} does not match image shape {shape}; upsample the map first")
    return np.clip(np.nan_to_num(c), 0.0, 1.0)


def colorize(cam: Any, cmap: str = "jet") -> np.ndarray:
    """float map in [0, 1] -> uint8 RGB [H,W,3] with a matplotlib colour map."""
    import matplotlib

    c = np.clip(np.nan_to_num(_np(cam).astype(np.float32)), 0.0, 1.0)
    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise XraylensError(f"unknown colour map {cmap!r}; use a matplotlib name such as jet, turbo, inferno") from None
    return (cm(c)[..., :3] * 255.0).round().astype(np.uint8)


def overlay(grey: Any, cam: Any, cmap: str = "jet", alpha: float = 0.4) -> np.ndarray:
    """Blend a colourised CAM over a greyscale image: uint8 [H,W] + float [H,W] -> uint8 [H,W,3]."""
    if not 0.0 <= alpha <= 1.0:
        raise XraylensError(f"alpha={alpha} must lie in [0, 1]")
    g = _grey(grey)
    heat = colorize(_cam(cam, g.shape), cmap).astype(np.float32)
    base = np.repeat(g[..., None], 3, axis=2).astype(np.float32)
    return np.clip((1.0 - alpha) * base + alpha * heat, 0, 255).round().astype(np.uint8)


def side_by_side(
    grey: Any, cams: Any | Sequence[Any], cmap: str = "jet", alpha: float = 0.4, gap: int = 4
) -> np.ndarray:
    """The image, then one overlay per CAM, left to right with a white gap: uint8 [H, W', 3]."""
    g = _grey(grey)
    cam_list = list(cams) if isinstance(cams, (list, tuple)) else [cams]
    panels = [np.repeat(g[..., None], 3, axis=2)] + [overlay(g, c, cmap, alpha) for c in cam_list]
    spacer = np.full((g.shape[0], gap, 3), 255, np.uint8)
    out: list[np.ndarray] = []
    for i, p in enumerate(panels):
        out += [spacer, p] if i else [p]
    return np.concatenate(out, axis=1)


def _indices(idx: Any, n: int, what: str) -> list[int | None]:
    """Class indices, one per image; None, NaN or a negative index (-1) = unknown for that image."""
    if idx is None:
        return [None] * n
    vals = list(idx) if isinstance(idx, (list, tuple)) else list(_np(idx).reshape(-1))
    if len(vals) != n:
        raise XraylensError(f"{len(vals)} {what} values for {n} images; pass one per image (None or -1 if unknown)")
    out: list[int | None] = []
    for v in vals:
        v = v.item() if hasattr(v, "item") else v
        out.append(None if v is None or (isinstance(v, float) and math.isnan(v)) or int(v) < 0 else int(v))
    return out


def _name(names: Sequence[str] | None, v: int | None) -> str | None:
    if v is None:
        return None
    return names[v] if names is not None and 0 <= v < len(names) else str(v)


def cam_grid(
    images: Any,
    cams: Any,
    titles: Sequence[str] | None = None,
    true: Any = None,
    pred: Any = None,
    probs: Any = None,
    class_names: Sequence[str] | None = None,
    good_threshold: float = 0.85,
    blank_wrong: bool = False,
    ncols: int | None = None,
    cmap: str = "jet",
    alpha: float = 0.4,
    path: str | os.PathLike | None = None,
    tile_inches: float = 2.2,
) -> bytes:
    """A grid of CAM overlays as PNG bytes (also written to ``path`` if given).

    Each tile is titled ``<true class> | pred <predicted> <prob>``. When the true class is known the
    title is green for a correct prediction and red with ``| wrong`` for a wrong one; ``| Good`` marks a
    correct prediction whose probability reaches ``good_threshold`` (the convention of the pneumonia
    CAM-cycle notebooks: "Good" = correct with a score >= 85 %). With ``blank_wrong`` a wrongly predicted
    image is drawn as an empty tile, so only correct localisations are on show.

    ``true``/``pred`` are class indices (named through ``class_names``), one per image, or None. An
    unlabelled image (``true=None``, or None / -1 for that tile) shows no true class and is marked
    neither right nor wrong: black title, no Good, never blanked. ``probs`` is the probability of the
    predicted class.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    imgs = _np(images)
    if imgs.ndim == 4:
        imgs = imgs[:, 0] if imgs.shape[1] == 1 else imgs.mean(axis=1)
    maps = _np(cams)
    maps = maps.reshape(maps.shape[0], *maps.shape[-2:])
    n = len(imgs)
    if len(maps) != n:
        raise XraylensError(f"{n} images but {len(maps)} CAMs; pass one CAM per image")
    tvals, pvals = _indices(true, n, "true"), _indices(pred, n, "pred")
    p = [None] * n if probs is None else [float(v) for v in _np(probs).reshape(-1)]
    if len(p) != n:
        raise XraylensError(f"{len(p)} probabilities for {n} images; pass one per image")
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(ncols * tile_inches, nrows * (tile_inches + 0.35)), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(nrows * ncols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_axis_off()
        if i >= n:
            continue
        # right / wrong only when both classes are known: an unlabelled image is neither
        judged = tvals[i] is not None and pvals[i] is not None
        wrong = judged and tvals[i] != pvals[i]
        if not (blank_wrong and wrong):
            ax.imshow(overlay(imgs[i], maps[i], cmap, alpha))
        parts = [titles[i]] if titles is not None else []
        if tvals[i] is not None:
            parts.append(str(_name(class_names, tvals[i])))
        if pvals[i] is not None:
            parts.append(f"pred {_name(class_names, pvals[i])}" + (f" {p[i]:.2f}" if p[i] is not None else ""))
        elif p[i] is not None:
            parts.append(f"{p[i]:.2f}")
        if wrong:
            parts.append("wrong")  # in words too: red and green alone fail colour-blind readers
        elif judged and p[i] is not None and p[i] >= good_threshold:
            parts.append("Good")
        color = ("red" if wrong else "green") if judged else "black"
        ax.set_title(" | ".join(parts), fontsize=7, color=color)
    fig.tight_layout(pad=0.4)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    buf = io.BytesIO()
    Image.fromarray(rgba[..., :3].copy()).save(buf, format="PNG")
    data = buf.getvalue()
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return data


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write a uint8 [H,W] or [H,W,3] array as PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")


def save_maps_npz(path: str | os.PathLike, ids: Sequence[str], maps: Mapping[str, Any]) -> None:
    """Store raw maps (e.g. ``CamResult.raw`` flattened to ``{"gradcam/layer4": [N,1,h,w]}``) as float16.

    Keys may also be nested ``{method: {layer: tensor}}``; they are stored as ``method/layer``. ``ids``
    (one per image) are stored under ``__ids__`` so maps stay attached to their images.
    """
    flat: dict[str, np.ndarray] = {}
    for key, val in maps.items():
        items = val.items() if isinstance(val, Mapping) else [(None, val)]
        for sub, arr in items:
            a = _np(arr)
            if len(a) != len(ids):
                raise XraylensError(f"map {key!r} has {len(a)} entries for {len(ids)} ids; pass one id per image")
            flat[f"{key}/{sub}" if sub is not None else str(key)] = a.astype(np.float16)
    if "__ids__" in flat:
        raise XraylensError("'__ids__' is reserved; rename that map")
    flat["__ids__"] = np.asarray([str(i) for i in ids])
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file handle: numpy adds no ".npz" suffix
        np.savez_compressed(fh, **flat)


def load_maps_npz(path: str | os.PathLike) -> tuple[list[str], dict[str, np.ndarray]]:
    """Inverse of ``save_maps_npz``: (ids, {key: float16 array})."""
    with np.load(path, allow_pickle=False) as z:
        ids = [str(i) for i in z["__ids__"]]
        return ids, {k: z[k] for k in z.files if k != "__ids__"}


def write_index_csv(path: str | os.PathLike, ids: Sequence[str], columns: Mapping[str, Any] | None = None) -> None:
    """CSV index of explained images: ``id`` then one column per entry of ``columns`` (one value per id).

    Typical columns: true, pred, prob, method, file (relative PNG path), constant.
    """
    cols = {
        k: [v.item() if hasattr(v, "item") else v for v in _np(c).reshape(-1)]
        if hasattr(c, "detach") or isinstance(c, np.ndarray)
        else list(c)
        for k, c in (columns or {}).items()
    }
    for k, c in cols.items():
        if len(c) != len(ids):
            raise XraylensError(f"column {k!r} has {len(c)} values for {len(ids)} ids; pass one per id")
    rows = ([i, *(cols[k][r] for k in cols)] for r, i in enumerate(ids))
    write_csv(path, ["id", *cols], rows)


def save_marked(
    path: str | os.PathLike,
    grey: np.ndarray,
    cam: np.ndarray,
    mask: np.ndarray,
    peak: tuple[int, int],
    radius_xy: tuple[float, float],
    min_side: int = 320,
) -> None:
    """The CAM overlay with the annotation outline (green), the peak (red cross) and the pointing
    game's tolerance (red ellipse), zoomed with nearest-neighbour to at least `min_side` pixels."""
    from PIL import Image, ImageDraw

    rgb = overlay(grey, cam)
    edge = mask & ~_erode(mask)
    rgb[edge] = (0, 255, 0)
    zoom = max(1, int(math.ceil(min_side / max(rgb.shape[:2]))))
    img = Image.fromarray(rgb).resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.NEAREST)
    d = ImageDraw.Draw(img)
    cy, cx = (peak[0] + 0.5) * zoom, (peak[1] + 0.5) * zoom
    k = 3 * zoom
    d.line([(cx - k, cy), (cx + k, cy)], fill=(255, 0, 0), width=2)
    d.line([(cx, cy - k), (cx, cy + k)], fill=(255, 0, 0), width=2)
    rx, ry = radius_xy[0] * zoom, radius_xy[1] * zoom
    if rx > 0 and ry > 0:
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=(255, 0, 0), width=1)
    save_png(path, np.asarray(img))


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, constant_values=False)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
