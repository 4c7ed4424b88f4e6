"""Decode a split once into fixed-size uint8 arrays on disk; every later epoch and run maps those.

One preprocessing path for everything: `prepare_image` (centre crop of the original, then bilinear
resize) is what the cache calls per image and what predict calls for a single image.

The cache folder holds one entry per (dataset, split, settings, file versions): `<key>.npy` with the
pixels ([N, H, W] or [N, C, H, W] uint8) and `<key>.json` with the rest (ids, labels, geometry, each
file's size + mtime, a CRC-32 per chunk of `CHUNK_ROWS` rows); the JSON is written last and marks the
entry complete, and its mtime is the entry's last use.

* Memory-mapped: a split is opened with `np.load(mmap_mode="r")`, never read whole, so a split larger
  than RAM trains; the loader gathers each batch from the map (and may pin it or put it on the GPU
  when it fits: `data.loader.stage_images`).
* Incremental: a build writes rows one by one (bounded RAM) and takes every file whose size and mtime
  are unchanged from the previous entry of the same split and settings, so one changed, added or
  removed file decodes that file only. A chunk whose checksum fails on open is decoded again (its
  rows only; the check reads the file once, about 2 GB/s, and `XRAYLENS_CACHE_VERIFY=0` skips it); a
  file that failed to decode and is unchanged is not retried.
* Bounded and tidy: a new entry replaces the entry of an older version of the same files, least
  recently used entries go when the total passes the size limit (`XRAYLENS_CACHE_MAX`, default
  20 GiB), and leftovers of killed writers are removed on the next open.
* Concurrent builders of one entry each write their own temp file and rename it into place: the last
  one wins, and both wrote the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import time
import zlib
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
from xraylens.io import _create_temp, write_text
from xraylens.progress import progress_bar

# bump when preprocessing or the file layout changes: old cache entries are then never read
CACHE_FORMAT_VERSION = 2
DEFAULT_MAX_BYTES = 20 * 1024**3
# a temp file untouched this long belongs to a killed writer: a live one writes rows every moment
ORPHAN_AGE_S = 3600.0
# only names this module writes are ever deleted: a cache_dir may point at a folder holding other files
_ENTRY_RE = re.compile(r"^([^.]+-[0-9a-f]{32})\.(npy|json)$")
_TEMP_RE = re.compile(r"^\.([^.]+-[0-9a-f]{32})\.(npy|json)\.[^.]+\.(npy|tmp)$")
_LINEAGE_HEX = 12  # the key is "<split>-<12 hex of what the files are><20 hex of their versions>"

log = logging.getLogger("xraylens.cache")


@dataclass
class CachedSplit:
    """One split, decoded and preprocessed: pixels memory-mapped from the cache file."""

    images: np.ndarray  # uint8 [N, H, W] (or [N, C, H, W]); a read-only np.memmap when loaded from disk
    labels: np.ndarray  # int64 [N]
    ids: list[str]
    geometry: list[Geometry]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) of unreadable files
    classes: list[str] = field(default_factory=list)
    key: str = ""
    split: str = ""
    # (device, placement) -> the pixels staged on the GPU or in pinned memory (data.loader.stage_images)
    staged: dict = field(default_factory=dict, repr=False, compare=False)
    # float32 [N, F] clinical features in cache order (data.clinical.attach_clinical); None without fusion
    clinical: np.ndarray | None = field(default=None, repr=False, compare=False)

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
    """Cache key: format version, settings, every file's id + size + mtime_ns + label.

    Its first part (the lineage) hashes the settings, the dataset's root and the split only, so the
    entry of an edited dataset (a file changed, added or removed) finds the entry of the same split
    before the edit: it replaces it, and its unchanged rows are copied instead of decoded.
    """
    return _key_and_stamps(source, split, image_size, center_crop)[0]


def _key_and_stamps(
    source: SourceSet, split: str, image_size: int | Sequence[int], center_crop: float
) -> tuple[str, list[str]]:
    records = source.split(split)
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
    lineage = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    h = hashlib.sha256(lineage.digest())
    npz = _npz_identity(source, split) if source.kind == "npz" else ""
    stamps = [_stamp(r, npz) for r in records]
    for r, s in zip(records, stamps, strict=True):
        h.update(f"\n{r.id}\t{s}\t{r.label}".encode())
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in split)
    return f"{safe}-{lineage.hexdigest()[:_LINEAGE_HEX]}{h.hexdigest()[: 32 - _LINEAGE_HEX]}", stamps


def _stamp(r: Record, npz: str) -> str:
    """What one file's pixels depend on besides the settings: its size and mtime (or its array row)."""
    if r.path is None:
        return f"row {r.array_index} of {npz}"
    try:
        st = os.stat(r.path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"  # decoding will report it as skipped


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
    """The preprocessed split, memory-mapped from the disk cache; decoded where the cache lacks it.

    The pixels come back as a read-only `np.memmap` of the cache file, so a split larger than RAM
    works (pages are read as batches touch them). Only files that are new, changed, or whose chunk of
    the cache file fails its checksum are decoded; every other row is copied from the previous entry.
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
    key, stamps = _key_and_stamps(source, split, (out_h, out_w), center_crop)
    folder = cache_root(cache_dir)
    _tidy(folder)
    entry = _open_entry(folder, key)
    if entry is not None and not entry.bad_rows:
        _touch(folder / f"{key}.json")
        return entry.cached(source, key, split)
    if entry is None:  # nothing for these exact files: start from the previous version of the split
        entry = _previous_entry(folder, key)
    elif entry.bad_rows:
        log.warning("cache entry %s: %d row(s) failed their checksum; decoding those again", key, len(entry.bad_rows))

    def job(r: Record) -> tuple[np.ndarray, Geometry]:
        if r.path is None:
            if r.array_index is None or split not in source.arrays:
                raise DecodeError("record has neither a path nor an array row")
            return prepare_image(source.arrays[split][r.array_index], (out_h, out_w), center_crop)
        return prepare_image(r.path, (out_h, out_w), center_crop)

    meta: dict[str, Any] = {
        "format": CACHE_FORMAT_VERSION,
        "split": split,
        "source": str(source.root),
        "created": time.time(),
        "classes": list(source.classes),
        "center_crop": center_crop,
        "ids": [],
        "labels": [],
        "geometry": [],
        "stamps": [],
        "skipped": [],
        "skipped_stamps": [],
        "chunk_rows": CHUNK_ROWS,
        "crc": [],
    }
    writer = _RowWriter(folder, key, len(records))
    try:
        n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        reuse = entry.reusable() if entry is not None else {}
        with progress_bar(progress, f"decoding {split}", len(records)) as advance:
            pool = ThreadPoolExecutor(n_workers) if n_workers > 1 and len(records) > 1 else None
            try:
                for lo in range(0, len(records), _BLOCK):
                    block = range(lo, min(lo + _BLOCK, len(records)))
                    todo = [i for i in block if reuse.get(records[i].id, (None,))[0] != stamps[i]]
                    # Pillow releases the GIL while decoding and resizing, so threads scale without copies
                    done = dict(zip(todo, (pool.map if pool else map)(_guarded(job, records), todo), strict=True))
                    for i in block:
                        r = records[i]
                        if i in done:
                            got = done[i]
                        else:
                            got = entry.row(reuse[r.id][1])  # type: ignore[union-attr]
                        if isinstance(got, str):
                            meta["skipped"].append([r.id, got])
                            meta["skipped_stamps"].append(stamps[i])
                        else:
                            writer.add(got[0])
                            meta["ids"].append(r.id)
                            meta["labels"].append(int(r.label))
                            meta["geometry"].append(_geometry_to_json(got[1]))
                            meta["stamps"].append(stamps[i])
                        advance()
            finally:
                if pool is not None:
                    pool.shutdown()
        if not meta["ids"]:
            first = f" (first: {meta['skipped'][0][0]}: {meta['skipped'][0][1]})" if meta["skipped"] else ""
            raise XraylensError(
                f"none of the {len(records)} images of split {split!r} in {source.root} could be "
                f"decoded{first}; check the files"
            )
        meta["crc"] = writer.seal()
        meta["shape"] = [len(meta["ids"]), *writer.row_shape]
        text = json.dumps(meta, indent=1) + "\n"
        images = writer.finish(text, limit)
    except BaseException:
        writer.abort()
        raise
    if writer.cached:
        _shrink(folder, key, limit)
    return _Entry(meta, images, set()).cached(source, key, split)


_BLOCK = 256  # records decoded per round: bounds the RAM a build holds besides the output file
CHUNK_ROWS = 64  # rows per checksum: a damaged chunk re-decodes these rows only


def _guarded(job, records: list[Record]):
    def run(i: int) -> tuple[np.ndarray, Geometry] | str:
        try:
            return job(records[i])
        except DecodeError as exc:
            return str(exc)  # the reason it was skipped

    return run


def _npy_header(shape: Sequence[int], length: int | None = None) -> bytes:
    """A .npy v1.0 header for uint8 C-order `shape`, padded to `length` bytes (default: the next
    multiple of 64). Written first with the most rows a build can yield, rewritten in place with the
    rows it did yield: fewer rows never need more header bytes."""
    dims = tuple(int(v) for v in shape)
    text = "{'descr': '|u1', 'fortran_order': False, 'shape': " + repr(dims) + ", }"
    if length is None:
        length = -(-(10 + len(text) + 1) // 64) * 64
    pad = length - 10 - len(text) - 1
    if pad < 0:
        raise AssertionError("npy header grew")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length - 10) + text.encode("latin1") + b" " * pad + b"\n"


class _RowWriter:
    """Writes rows one by one into a temp .npy beside the entry (checksum per chunk), then publishes
    it atomically (.npy renamed first, the .json last marks the entry complete)."""

    def __init__(self, folder: Path, key: str, max_rows: int) -> None:
        self.folder, self.key, self.max_rows = folder, key, max_rows
        self.row_shape: tuple[int, ...] = ()
        self.crcs: list[int] = []
        self.cached = False
        self._fh = None
        self._tmp: Path | None = None
        self._rows = 0
        self._crc = 0
        self._header_len = 0

    def _open(self, row: np.ndarray) -> None:
        self.row_shape = tuple(row.shape)
        header = _npy_header((self.max_rows, *self.row_shape))
        self._header_len = len(header)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._tmp = _create_temp(self.folder, f".{self.key}.npy.", ".npy")
        except OSError:
            # a read-only or full cache folder costs speed, not correctness: build in the temp dir
            fd, name = tempfile.mkstemp(prefix="xraylens-", suffix=".npy")
            os.close(fd)
            self._tmp = Path(name)
        self._fh = open(self._tmp, "wb")
        self._fh.write(header)

    def add(self, row: np.ndarray) -> None:
        if self._fh is None:
            self._open(row)
        if tuple(row.shape) != self.row_shape or row.dtype != np.uint8:
            raise AssertionError(f"image {row.dtype} {row.shape} differs from the split's {self.row_shape}")
        data = np.ascontiguousarray(row)
        self._fh.write(data.data)  # type: ignore[union-attr]
        self._crc = zlib.crc32(data.data, self._crc)
        self._rows += 1
        if self._rows % CHUNK_ROWS == 0:
            self.crcs.append(self._crc)
            self._crc = 0

    def seal(self) -> list[int]:
        """The checksums of every chunk, the last (partial) one included; no row may follow."""
        if self._rows % CHUNK_ROWS:
            self.crcs.append(self._crc)
            self._crc = 0
        return self.crcs

    def finish(self, meta_text: str, limit: int | None) -> np.ndarray:
        """Publish the entry (when it fits `limit` and the folder is writable); return the memmap."""
        fh, tmp = self._fh, self._tmp
        assert fh is not None and tmp is not None
        fh.seek(0)
        fh.write(_npy_header((self._rows, *self.row_shape), self._header_len))
        fh.truncate(self._header_len + self._rows * int(np.prod(self.row_shape)))
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        self._fh = None
        images = np.load(tmp, mmap_mode="r")
        size = tmp.stat().st_size + len(meta_text.encode())
        if tmp.parent != self.folder or (limit is not None and size > limit):
            if tmp.parent == self.folder:
                log.warning(
                    "split %r (%s) is larger than the cache limit (%s); not cached, so it is decoded again "
                    "next time: raise XRAYLENS_CACHE_MAX",
                    self.key.rsplit("-", 1)[0],
                    format_bytes(size),
                    format_bytes(limit or 0),
                )
            tmp.unlink()  # the mapping keeps the pages readable until it is dropped (POSIX)
            self._tmp = None
            return images
        try:
            os.replace(tmp, self.folder / f"{self.key}.npy")
            self._tmp = None
            images = np.load(self.folder / f"{self.key}.npy", mmap_mode="r")  # mapped under its own name
            # the JSON is written last: its presence marks a complete entry
            write_text(self.folder / f"{self.key}.json", meta_text)
            self.cached = True
        except OSError:
            pass  # a full disk: the mapping still serves this run
        return images

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


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


@dataclass
class _Entry:
    """A complete entry on disk: its JSON and its memory-mapped pixels; `bad_rows` failed a checksum."""

    meta: dict[str, Any]
    images: np.ndarray
    bad_rows: set[int]

    def cached(self, source: SourceSet, key: str, split: str) -> CachedSplit:
        m = self.meta
        return CachedSplit(
            images=self.images,
            labels=np.asarray(m["labels"], dtype=np.int64),
            ids=list(m["ids"]),
            geometry=[_geometry_from_json(g) for g in m["geometry"]],
            skipped=[(s[0], s[1]) for s in m["skipped"]],
            classes=list(source.classes),
            key=key,
            split=split,
        )

    def reusable(self) -> dict[str, tuple[str, int | str]]:
        """id -> (stamp, row or skip reason) of everything this entry can give a new build."""
        m = self.meta
        out: dict[str, tuple[str, int | str]] = {}
        for (rid, why), st in zip(m["skipped"], m["skipped_stamps"], strict=True):
            out[rid] = (st, why)  # a file that failed to decode, unchanged, fails again: not retried
        for row, (rid, st) in enumerate(zip(m["ids"], m["stamps"], strict=True)):
            if row not in self.bad_rows:
                out[rid] = (st, row)
        return out

    def row(self, ref: int | str) -> tuple[np.ndarray, Geometry] | str:
        if isinstance(ref, str):
            return ref
        return np.array(self.images[ref]), _geometry_from_json(self.meta["geometry"][ref])


def _open_entry(folder: Path, key: str) -> _Entry | None:
    """The entry `key`, mapped and checksummed; None when missing or unreadable (then rebuilt)."""
    npy, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT_VERSION:
            return None
        images = np.load(npy, mmap_mode="r", allow_pickle=False)
        n = len(meta["ids"])
        if (
            list(images.shape) != meta["shape"]
            or images.dtype != np.uint8
            or len(images) != n
            or not (len(meta["labels"]) == len(meta["geometry"]) == len(meta["stamps"]) == n)
            or len(meta["skipped"]) != len(meta["skipped_stamps"])
        ):
            return None
        rows = int(meta["chunk_rows"])
        crcs = list(meta["crc"])
        if len(crcs) != -(-n // rows):
            return None
        bad: set[int] = set()
        if os.environ.get("XRAYLENS_CACHE_VERIFY", "1").strip() == "0":
            crcs = []  # the user trusts the disk: skip the pass over the file (about 1 s per GB)
        for c, want in enumerate(crcs):
            # one sequential pass over the file: a flipped byte costs its chunk's rows, not the split
            if zlib.crc32(np.ascontiguousarray(images[c * rows : (c + 1) * rows]).data) != want:
                bad.update(range(c * rows, min(n, (c + 1) * rows)))
        return _Entry(meta, images, bad)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # a damaged entry is rebuilt, not trusted


def _previous_entry(folder: Path, key: str) -> _Entry | None:
    """The most recently used complete entry of the same split and settings (other file versions)."""
    lineage = key[: -(32 - _LINEAGE_HEX)]
    same = [(meta.st_mtime, k) for k, (_, meta) in _complete(folder).items() if k != key and k.startswith(lineage)]
    for _, k in sorted(same, reverse=True):
        entry = _open_entry(folder, k)
        if entry is not None:
            return entry
    return None


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
            split, n, hw = str(m.get("split", "?")), shape[0], (shape[-2], shape[-1])
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
