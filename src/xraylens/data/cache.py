"""Decode a split once into fixed-size uint8 arrays on disk; every later epoch and run reads those.

One preprocessing path for everything: `prepare_image` (centre crop of the original, then bilinear
resize) is what the cache calls per image and what predict calls for a single image.

The cache folder holds one entry per (dataset, split, settings, file versions): `<key>.npy` with the
pixels and `<key>.json` with the rest; the JSON is written last and marks the entry complete, and its
mtime is the entry's last use. The folder stays bounded: a new entry replaces the entry of an older
version of the same files, least recently used entries go when the total passes the size limit
(`XRAYLENS_CACHE_MAX`, default 20 GiB), and leftovers of killed writers are removed on the next open.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xraylens.data.decode import MIN_SIDE, decode_image, max_pixels_setting
from xraylens.data.records import Geometry, Record, SourceSet, center_crop_box
from xraylens.errors import DecodeError, XraylensError
from xraylens.io import atomic_path, write_text
from xraylens.progress import progress_bar

# bump when preprocessing or the file layout changes: old cache entries are then never read
CACHE_FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 20 * 1024**3
# a temp file this old belongs to a killed writer, not a live one (a split is written in seconds)
ORPHAN_AGE_S = 3600.0
# only names this module writes are ever deleted: a cache_dir may point at a folder holding other files
_ENTRY_RE = re.compile(r"^([^.]+-[0-9a-f]{32})\.(npy|json)$")
_TEMP_RE = re.compile(r"^\.([^.]+-[0-9a-f]{32})\.(npy|json)\.[^.]+\.(npy|tmp)$")
_LINEAGE_HEX = 12  # the key is "<split>-<12 hex of what the files are><20 hex of their versions>"

log = logging.getLogger("xraylens.cache")


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
    """The cache folder: `cache_dir`, else $XRAYLENS_CACHE, else ~/.cache/xraylens."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("XRAYLENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xraylens"


def prepare_image(
    path_or_array: str | os.PathLike | np.ndarray, image_size: int | Sequence[int], center_crop: float = 1.0
) -> tuple[np.ndarray, Geometry]:
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


def split_key(source: SourceSet, split: str, image_size: int | Sequence[int], center_crop: float = 1.0) -> str:
    """Cache key: format version, every file's id + size + mtime_ns + label, size and crop.

    Its first part (the lineage) hashes everything but the file versions, so the entry of an edited
    dataset can find and replace the entry of the same files before the edit.
    """
    records = source.split(split)
    lineage = hashlib.sha256()
    head = {
        "v": CACHE_FORMAT_VERSION,
        "kind": source.kind,
        "classes": list(source.classes),
        "size": list(resolve_size(image_size)),
        "crop": float(center_crop),
        "root": str(source.root),
        "split": split,
        # a file skipped for its size decodes once the user raises the limit: a new entry
        "max_pixels": max_pixels_setting(),
        "min_side": MIN_SIDE,
    }
    lineage.update(json.dumps(head, sort_keys=True).encode())
    for r in records:
        lineage.update(f"\n{r.id}\t{r.label}".encode())
    h = hashlib.sha256(lineage.digest())
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
    return f"{safe}-{lineage.hexdigest()[:_LINEAGE_HEX]}{h.hexdigest()[: 32 - _LINEAGE_HEX]}"


def _npz_identity(source: SourceSet, split: str) -> str:
    root = Path(source.root)
    arr = source.arrays.get(split)
    shape = list(arr.shape) if arr is not None else None
    if root.is_file():
        st = root.stat()
        return f"{root.name}:{st.st_size}:{st.st_mtime_ns}:{shape}:{source.split_info.get('val')}"
    # an in-memory array set: hash the pixels themselves
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() if arr is not None else ""


def load_split(
    source: SourceSet,
    split: str,
    image_size: int | Sequence[int],
    *,
    center_crop: float = 1.0,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = False,
    max_bytes: int | str | None = None,
) -> CachedSplit:
    """The preprocessed split, from the disk cache or decoded once (then cached atomically).

    `max_bytes` bounds the cache folder (int bytes, or a size like "20G" / "unlimited"); None reads
    $XRAYLENS_CACHE_MAX, default 20 GiB.
    """
    records = source.split(split)
    if not records:
        raise XraylensError(
            f"{source.root} has no {split!r} split (found: {', '.join(source.splits)}); pick one of those"
        )
    out_h, out_w = resolve_size(image_size)
    limit = resolve_max_bytes(max_bytes)  # a bad setting fails before minutes of decoding
    key = split_key(source, split, (out_h, out_w), center_crop)
    folder = cache_root(cache_dir)
    _tidy(folder)
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
        raise XraylensError(
            f"none of the {len(records)} images of split {split!r} in {source.root} could be "
            f"decoded{first}; check the files"
        )
    keep = np.flatnonzero(ok)
    result = CachedSplit(
        images=np.ascontiguousarray(images[keep]) if len(keep) < len(records) else images,
        labels=np.array([records[i].label for i in keep], dtype=np.int64),
        ids=[records[i].id for i in keep],
        geometry=[geometry[i] for i in keep],  # type: ignore[misc]
        skipped=skipped,
        classes=list(source.classes),
        key=key,
        split=split,
    )
    _write_cache(folder, result, center_crop, limit, str(source.root))
    return result


def _note(skipped: list[tuple[str, str]], r: Record, reason: str | None) -> None:
    if reason is not None:
        skipped.append((r.id, reason))


def _geometry_to_json(g: Geometry) -> list:
    return [g.orig_h, g.orig_w, list(g.crop), g.out_h, g.out_w]


def _geometry_from_json(v: list) -> Geometry:
    return Geometry(
        orig_h=int(v[0]),
        orig_w=int(v[1]),
        crop=tuple(float(c) for c in v[2]),  # type: ignore
        out_h=int(v[3]),
        out_w=int(v[4]),
    )


def _write_cache(folder: Path, c: CachedSplit, center_crop: float, limit: int | None, source: str) -> None:
    meta: dict[str, Any] = {
        "format": CACHE_FORMAT_VERSION,
        "split": c.split,
        "source": source,
        "created": time.time(),
        "classes": c.classes,
        "center_crop": center_crop,
        "shape": list(c.images.shape),
        "ids": c.ids,
        "labels": c.labels.tolist(),
        "geometry": [_geometry_to_json(g) for g in c.geometry],
        "skipped": [list(s) for s in c.skipped],
    }
    text = json.dumps(meta, indent=2) + "\n"
    size = c.images.nbytes + 128 + len(text.encode())  # 128: the .npy header
    if limit is not None and size > limit:
        log.warning(
            "split %r (%s) is larger than the cache limit (%s); not cached, so it is decoded again "
            "next time: raise XRAYLENS_CACHE_MAX",
            c.split,
            format_bytes(size),
            format_bytes(limit),
        )
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{c.key}.npy", suffix=".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, c.images)
        # the JSON is written last: its presence marks a complete entry
        write_text(folder / f"{c.key}.json", text)
    except OSError:
        # a read-only or full cache folder costs speed, not correctness: carry on uncached
        return
    _shrink(folder, c.key, limit)


def _read_cache(folder: Path, key: str, source: SourceSet, split: str) -> CachedSplit | None:
    npy, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(npy, allow_pickle=False)
        if (
            meta.get("format") != CACHE_FORMAT_VERSION
            or list(images.shape) != meta["shape"]
            or images.dtype != np.uint8
            or len(meta["ids"]) != len(images)
        ):
            return None
        _touch(meta_path)
        return CachedSplit(
            images=images,
            labels=np.asarray(meta["labels"], dtype=np.int64),
            ids=list(meta["ids"]),
            geometry=[_geometry_from_json(g) for g in meta["geometry"]],
            skipped=[(s[0], s[1]) for s in meta["skipped"]],
            classes=list(source.classes),
            key=key,
            split=split,
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # a damaged entry is rebuilt, not trusted


# ---- keeping the folder bounded and tidy -------------------------------------------------------


@dataclass
class CacheEntry:
    """One complete cache entry, as `cache_entries` lists it."""

    key: str
    split: str  # "?" when the entry's JSON is unreadable
    source: str  # the dataset it was decoded from ("" for entries written before this was recorded)
    n_images: int
    image_shape: tuple[int, int]  # (h, w) of each image
    bytes: int  # .npy + .json
    last_used: float  # epoch seconds: written or last read
    created: float  # epoch seconds


def parse_size(text: str) -> int | None:
    """A byte count from "20G", "500M", "1.5GiB", "123" (bytes) or "0"; None for "unlimited"."""
    t = str(text).strip().lower()
    if t in ("unlimited", "none", "inf"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", t)
    if not m:
        raise XraylensError(
            f"cache size {text!r} is not understood; use e.g. 20G, 500M, 0 (cache nothing) or unlimited"
        )
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def parse_age(text: str) -> float:
    """Seconds from "7d", "12h", "30m" or "90s"."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", str(text).strip().lower())
    if not m:
        raise XraylensError(f"age {text!r} is not understood; use a number and a unit, e.g. 7d, 12h or 30m")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def resolve_max_bytes(max_bytes: int | str | None = None) -> int | None:
    """The cache size limit in bytes (None: unlimited): `max_bytes`, else $XRAYLENS_CACHE_MAX, else 20 GiB."""
    if max_bytes is None:
        env = os.environ.get("XRAYLENS_CACHE_MAX", "").strip()
        if not env:
            return DEFAULT_MAX_BYTES
        try:
            return parse_size(env)
        except XraylensError:
            raise XraylensError(
                f"XRAYLENS_CACHE_MAX={env!r} is not a size; set it to e.g. 20G, 500M, 0 (cache nothing) or unlimited"
            ) from None
    if isinstance(max_bytes, str):
        return parse_size(max_bytes)
    if int(max_bytes) < 0:
        raise XraylensError(f"max_bytes must be >= 0, got {max_bytes}; use None for the default limit")
    return int(max_bytes)


def cache_entries(cache_dir: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Complete entries of the cache folder, most recently used first (removes stale leftovers first)."""
    folder = cache_root(cache_dir)
    _tidy(folder)
    out = []
    for key, (npy, meta) in _complete(folder).items():
        try:
            m = json.loads((folder / f"{key}.json").read_text())
            shape = [int(v) for v in m["shape"]]
            split, n, hw = str(m.get("split", "?")), shape[0], (shape[1], shape[2])
            source, created = str(m.get("source", "")), float(m.get("created", npy.st_mtime))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            split, n, hw, source, created = "?", 0, (0, 0), "", npy.st_mtime
        out.append(
            CacheEntry(
                key=key,
                split=split,
                source=source,
                n_images=n,
                image_shape=hw,
                bytes=npy.st_size + meta.st_size,
                last_used=meta.st_mtime,
                created=created,
            )
        )
    return sorted(out, key=lambda e: -e.last_used)


def clear_cache(cache_dir: str | os.PathLike | None = None, older_than: float | None = None) -> tuple[int, int]:
    """Delete every entry, or those not used for `older_than` seconds; returns (entries, bytes) freed.

    Entries are rebuilt when next needed. Temp files of writers still running are left alone.
    """
    folder = cache_root(cache_dir)
    freed = _tidy(folder)
    now = time.time()
    n = 0
    for key, (_, meta) in _complete(folder).items():
        if older_than is None or now - meta.st_mtime >= older_than:
            freed += _remove(folder, key)
            n += 1
    return n, freed


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    s = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return "just now"


def format_cache_table(entries: Sequence[CacheEntry], folder: Path, limit: int | None) -> str:
    """The `xraylens cache list` text: one line per entry, then the total and where the cache lives."""
    now = time.time()
    cap = "unlimited" if limit is None else format_bytes(limit)
    rows = [("entry", "split", "images", "shape", "size", "last used", "source")]
    rows += [
        (
            e.key,
            e.split,
            str(e.n_images),
            f"{e.image_shape[0]}x{e.image_shape[1]}",
            format_bytes(e.bytes),
            format_age(now - e.last_used),
            e.source,
        )
        for e in entries
    ]
    lines = []
    if entries:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        # the last column (source) is free width; images right-aligned
        lines = [
            "  ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r[:-1], widths, strict=True)))
            + "  "
            + r[-1]
            for r in rows
        ]
    total = sum(e.bytes for e in entries)
    lines.append(f"{_count(len(entries))}, {format_bytes(total)} of {cap} (XRAYLENS_CACHE_MAX) in {folder}")
    return "\n".join(line.rstrip() for line in lines)


def _count(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _touch(meta_path: Path) -> None:
    try:
        os.utime(meta_path)  # the JSON's mtime is the entry's last use, for LRU eviction
    except OSError:
        pass  # a read-only shared cache: hits still work, only the LRU order goes stale


def _scan(folder: Path) -> tuple[dict[str, dict[str, os.stat_result]], list[tuple[Path, os.stat_result]]]:
    """({key: {"npy": stat, "json": stat}}, [(temp file, stat)]) of the files this module writes."""
    entries: dict[str, dict[str, os.stat_result]] = {}
    temps = []
    try:
        it = list(os.scandir(folder))
    except OSError:
        return entries, temps
    for d in it:
        try:
            if (m := _ENTRY_RE.match(d.name)) and d.is_file(follow_symlinks=False):
                entries.setdefault(m.group(1), {})[m.group(2)] = d.stat(follow_symlinks=False)
            elif _TEMP_RE.match(d.name) and d.is_file(follow_symlinks=False):
                temps.append((Path(d.path), d.stat(follow_symlinks=False)))
        except OSError:
            continue  # deleted meanwhile by another process
    return entries, temps


def _complete(folder: Path) -> dict[str, tuple[os.stat_result, os.stat_result]]:
    return {k: (v["npy"], v["json"]) for k, v in _scan(folder)[0].items() if "npy" in v and "json" in v}


def _tidy(folder: Path) -> int:
    """Remove leftovers of killed writers; returns the bytes freed.

    Temp files and .npy files without their .json (the JSON is written a moment after the .npy) go
    once older than ORPHAN_AGE_S, so a writer still running keeps its files; a .json without its
    .npy is never a writer's intermediate state and goes at once.
    """
    entries, temps = _scan(folder)
    now = time.time()
    freed = 0
    stale = [(p, st) for p, st in temps if now - st.st_mtime > ORPHAN_AGE_S]
    for key, v in entries.items():
        if "json" not in v and now - v["npy"].st_mtime > ORPHAN_AGE_S:
            stale.append((folder / f"{key}.npy", v["npy"]))
        elif "npy" not in v:
            stale.append((folder / f"{key}.json", v["json"]))
    for p, st in stale:
        try:
            p.unlink()
            freed += st.st_size
        except FileNotFoundError:
            pass
        except OSError:
            return freed  # a read-only cache folder: nothing to tidy here
    return freed


def _remove(folder: Path, key: str) -> int:
    """Delete one entry, JSON first so no reader ever sees it complete with its pixels gone."""
    freed = 0
    for ext in ("json", "npy"):
        p = folder / f"{key}.{ext}"
        try:
            size = p.stat().st_size
            p.unlink()
            freed += size
        except FileNotFoundError:
            pass
    return freed


def _shrink(folder: Path, keep: str, limit: int | None) -> None:
    """After writing `keep`: drop entries of older versions of the same files, then least recently
    used entries until the folder fits `limit`. `keep` itself always stays."""
    try:
        entries = _complete(folder)
        lineage = keep[: -(32 - _LINEAGE_HEX)]
        for key in [k for k in entries if k != keep and k.startswith(lineage)]:
            _remove(folder, key)  # same files, same settings, older contents: never read again
            del entries[key]
        if limit is None:
            return
        total = sum(npy.st_size + meta.st_size for npy, meta in entries.values())
        for key, (npy, meta) in sorted(entries.items(), key=lambda kv: kv[1][1].st_mtime):
            if total <= limit:
                break
            if key != keep:
                _remove(folder, key)
                total -= npy.st_size + meta.st_size
    except OSError:
        return  # eviction is housekeeping; a failure here must not fail the run
