"""Decode a split once into fixed-size uint8 arrays on disk; every later epoch and run reads those.

One preprocessing path for everything: `prepare_image` (centre crop of the original, then bilinear
resize) is what the cache calls per image and what predict / serve call for a single image.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xraylens.data.decode import decode_image
from xraylens.data.records import Geometry, Record, SourceSet, center_crop_box
from xraylens.errors import DecodeError, XraylensError
from xraylens.io import atomic_path, write_json
from xraylens.progress import progress_bar

# bump when preprocessing or the file layout changes: old cache entries are then never read
CACHE_FORMAT_VERSION = 1


@dataclass
class CachedSplit:
    """One split, decoded and preprocessed, in memory."""

    images: np.ndarray  # uint8 [N, H, W]
    labels: np.ndarray  # int64 [N]
    ids: list[str]
    geometry: list[Geometry]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) of unreadable files
    classes: list[str] = field(default_factory=list)
    key: str = ""
    split: str = ""

    def __len__(self) -> int:
        return int(len(self.labels))


def resolve_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """`image_size` as (h, w): an int means a square."""
    if isinstance(image_size, int | np.integer):
        hw = (int(image_size), int(image_size))
    else:
        vals = list(image_size)
        if len(vals) != 2:
            raise XraylensError(f"image_size must be an int or (height, width), got {image_size!r}")
        hw = (int(vals[0]), int(vals[1]))
    if min(hw) < 1:
        raise XraylensError(f"image_size must be positive, got {image_size!r}; use e.g. 224")
    return hw


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("XRAYLENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xraylens"


def prepare_image(path_or_array: str | os.PathLike | np.ndarray, image_size: int | Sequence[int],
                  center_crop: float = 1.0) -> tuple[np.ndarray, Geometry]:
    """Decode (if a path), keep the central `center_crop` of each side, resize to `image_size`.

    Returns the uint8 [H, W] model image and the `Geometry` that maps original coordinates onto it.
    """
    out_h, out_w = resolve_size(image_size)
    if not 0.0 < center_crop <= 1.0:
        raise XraylensError(f"center_crop must be in (0, 1], got {center_crop}; 1.0 keeps the whole image")
    if isinstance(path_or_array, np.ndarray):
        arr = path_or_array
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2 or arr.dtype != np.uint8:
            raise ValueError(f"prepare_image needs a uint8 [H, W] array, got {arr.dtype} {arr.shape}")
    else:
        arr = decode_image(path_or_array)
    h, w = arr.shape
    crop = center_crop_box(h, w, center_crop)
    x0, y0, cw, ch = crop
    # one Pillow op crops (sub-pixel box) and resizes, so Geometry describes exactly what was done
    img = Image.fromarray(np.ascontiguousarray(arr))
    out = np.array(img.resize((out_w, out_h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)))  # writable
    return out, Geometry(orig_h=h, orig_w=w, crop=crop, out_h=out_h, out_w=out_w)


def split_key(source: SourceSet, split: str, image_size: int | Sequence[int],
              center_crop: float = 1.0) -> str:
    """Cache key: format version, every file's id + size + mtime_ns + label, size and crop."""
    records = source.split(split)
    h = hashlib.sha256()
    head = {"v": CACHE_FORMAT_VERSION, "kind": source.kind, "classes": list(source.classes),
            "size": list(resolve_size(image_size)), "crop": float(center_crop)}
    h.update(json.dumps(head, sort_keys=True).encode())
    if source.kind == "npz":
        h.update(_npz_identity(source, split).encode())
    for r in records:
        if r.path is not None:
            try:
                st = os.stat(r.path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1  # missing now: decoding will report it as skipped
        else:
            size, mtime = -1, r.array_index
        h.update(f"\n{r.id}\t{size}\t{mtime}\t{r.label}".encode())
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in split)
    return f"{safe}-{h.hexdigest()[:32]}"


def _npz_identity(source: SourceSet, split: str) -> str:
    root = Path(source.root)
    arr = source.arrays.get(split)
    shape = list(arr.shape) if arr is not None else None
    if root.is_file():
        st = root.stat()
        return f"{root.name}:{st.st_size}:{st.st_mtime_ns}:{shape}:{source.split_info.get('val')}"
    # an in-memory array set: hash the pixels themselves
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() if arr is not None else ""


def load_split(source: SourceSet, split: str, image_size: int | Sequence[int], *, center_crop: float = 1.0,
               cache_dir: str | os.PathLike | None = None, workers: int | None = None,
               progress: bool = False) -> CachedSplit:
    """The preprocessed split, from the disk cache or decoded once (then cached atomically)."""
    records = source.split(split)
    if not records:
        raise XraylensError(f"{source.root} has no {split!r} split (found: {', '.join(source.splits)}); "
                            "pick one of those")
    out_h, out_w = resolve_size(image_size)
    key = split_key(source, split, (out_h, out_w), center_crop)
    folder = cache_root(cache_dir)
    cached = _read_cache(folder, key, source, split)
    if cached is not None:
        return cached

    def job(r: Record) -> tuple[np.ndarray, Geometry]:
        if r.path is None:
            if r.array_index is None or split not in source.arrays:
                raise DecodeError("record has neither a path nor an array row")
            return prepare_image(source.arrays[split][r.array_index], (out_h, out_w), center_crop)
        return prepare_image(r.path, (out_h, out_w), center_crop)

    images = np.empty((len(records), out_h, out_w), dtype=np.uint8)
    ok = np.zeros(len(records), dtype=bool)
    geometry: list[Geometry | None] = [None] * len(records)
    skipped: list[tuple[str, str]] = []

    def run(i: int) -> tuple[int, str | None]:
        try:
            images[i], geometry[i] = job(records[i])
        except DecodeError as exc:
            return i, str(exc)
        ok[i] = True
        return i, None

    n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    with progress_bar(progress, f"decoding {split}", len(records)) as advance:
        if n_workers <= 1 or len(records) < 2:
            results = (run(i) for i in range(len(records)))
            for i, reason in results:
                _note(skipped, records[i], reason)
                advance()
        else:
            # Pillow releases the GIL while decoding and resizing, so threads scale without copies
            with ThreadPoolExecutor(n_workers) as pool:
                for i, reason in pool.map(run, range(len(records))):
                    _note(skipped, records[i], reason)
                    advance()
    if not ok.any():
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise XraylensError(f"none of the {len(records)} images of split {split!r} in {source.root} could be "
                            f"decoded{first}; check the files")
    keep = np.flatnonzero(ok)
    result = CachedSplit(
        images=np.ascontiguousarray(images[keep]) if len(keep) < len(records) else images,
        labels=np.array([records[i].label for i in keep], dtype=np.int64),
        ids=[records[i].id for i in keep],
        geometry=[geometry[i] for i in keep],  # type: ignore[misc]
        skipped=skipped, classes=list(source.classes), key=key, split=split,
    )
    _write_cache(folder, result, center_crop)
    return result


def _note(skipped: list[tuple[str, str]], r: Record, reason: str | None) -> None:
    if reason is not None:
        skipped.append((r.id, reason))


def _geometry_to_json(g: Geometry) -> list:
    return [g.orig_h, g.orig_w, list(g.crop), g.out_h, g.out_w]


def _geometry_from_json(v: list) -> Geometry:
    return Geometry(orig_h=int(v[0]), orig_w=int(v[1]), crop=tuple(float(c) for c in v[2]),  # type: ignore
                    out_h=int(v[3]), out_w=int(v[4]))


def _write_cache(folder: Path, c: CachedSplit, center_crop: float) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{c.key}.npy", suffix=".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, c.images)
        # the JSON is written last: its presence marks a complete entry
        meta: dict[str, Any] = {
            "format": CACHE_FORMAT_VERSION, "split": c.split, "classes": c.classes,
            "center_crop": center_crop,
            "shape": list(c.images.shape), "ids": c.ids, "labels": c.labels.tolist(),
            "geometry": [_geometry_to_json(g) for g in c.geometry], "skipped": [list(s) for s in c.skipped],
        }
        write_json(folder / f"{c.key}.json", meta)
    except OSError:
        # a read-only or full cache folder costs speed, not correctness: carry on uncached
        return


def _read_cache(folder: Path, key: str, source: SourceSet, split: str) -> CachedSplit | None:
    npy, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(npy, allow_pickle=False)
        if meta.get("format") != CACHE_FORMAT_VERSION or list(images.shape) != meta["shape"] \
                or images.dtype != np.uint8 or len(meta["ids"]) != len(images):
            return None
        return CachedSplit(images=images, labels=np.asarray(meta["labels"], dtype=np.int64),
                           ids=list(meta["ids"]),
                           geometry=[_geometry_from_json(g) for g in meta["geometry"]],
                           skipped=[(s[0], s[1]) for s in meta["skipped"]], classes=list(source.classes),
                           key=key, split=split)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # a damaged entry is rebuilt, not trusted
