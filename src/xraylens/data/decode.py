"""Decode one radiograph file to a uint8 greyscale array [H, W].

PNG / JPEG / BMP / TIFF go through Pillow, DICOM through pydicom. Anything that cannot be read
raises `DecodeError` with a short reason; callers skip and report the file instead of crashing.

Size limits, checked from the header before the pixels are decoded, for every format alike:

- at most `max_pixels` pixels (width x height): the environment variable ``XRAYLENS_MAX_PIXELS``,
  default 64,000,000 (8000 x 8000; the largest detectors, mammography included, stay under
  25 megapixels). Larger files are refused rather than risk gigabytes per decoding thread (DICOM
  pixels pass through float64). Pillow's own "decompression bomb" limit is raised to match a larger
  setting (process-wide, never lowered), so this one setting governs and Pillow's raw warning never
  reaches the console.
- at least `MIN_SIDE` (8) pixels on each side: a 1x1 placeholder or a thumbnail strip would be
  resized to a flat, meaningless model input.
- a multi-frame DICOM decodes its first frame only, so a compressed file cannot expand into many
  frames of the maximum size.

`decode_bytes` decodes an upload held in memory (the web server's, never written to disk) through the
same decoders, limits and messages. DICOM patient fields (group 0010) are dropped unread right after
parsing, so no later warning, log line or error message can quote them.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from xraylens.errors import DecodeError, XraylensError

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

MAX_PIXELS_ENV = "XRAYLENS_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 64_000_000
MIN_SIDE = 8

# Pillow's limit and warning filters are process-wide: one lock for every change to them here
_PIL_LOCK = threading.Lock()


def max_pixels_setting() -> int:
    """The pixel limit in force: ``XRAYLENS_MAX_PIXELS`` when set, else `DEFAULT_MAX_PIXELS`."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise XraylensError(
            f"{MAX_PIXELS_ENV}={raw!r} is not a positive whole number of pixels; "
            f"set it like {MAX_PIXELS_ENV}=200000000, or unset it for {DEFAULT_MAX_PIXELS:,}"
        )
    return value


def decode_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """The image at `path` as a C-contiguous uint8 array [H, W].

    `max_pixels` caps width x height (None: `max_pixels_setting()`); a larger image, or one with a side
    under `MIN_SIDE`, raises `DecodeError` before its pixels are decoded."""
    limit = _limit(max_pixels)
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise DecodeError(f"{p.name}: cannot open ({exc.strerror or exc})") from None
    if size == 0:
        raise DecodeError(f"{p.name}: empty file (0 bytes)")
    if p.suffix.lower() in DICOM_SUFFIXES or head[128:132] == b"DICM":
        return _decode_dicom(p, p.name, limit)
    return _decode_pillow(p, p.name, limit)


def decode_bytes(
    data: bytes | bytearray | memoryview, name: str = "upload", max_pixels: int | None = None
) -> np.ndarray:
    """`decode_image` for a file held in memory: same decoders, limits and messages, nothing on disk.

    `name` only labels error messages and, by a .dcm / .dicom suffix, picks the DICOM reader (as a
    file name does); the "DICM" magic at byte 128 picks it too."""
    limit = _limit(max_pixels)
    if len(data) == 0:
        raise DecodeError(f"{name}: empty file (0 bytes)")
    src = io.BytesIO(data)
    if Path(name).suffix.lower() in DICOM_SUFFIXES or bytes(data[128:132]) == b"DICM":
        return _decode_dicom(src, name, limit)
    return _decode_pillow(src, name, limit)


def _limit(max_pixels: int | None) -> int:
    limit = max_pixels_setting() if max_pixels is None else int(max_pixels)
    if limit <= 0:
        raise XraylensError(f"max_pixels={max_pixels} must be a positive number of pixels")
    _raise_pillow_limit(limit)
    return limit


def _check_size(name: str, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise DecodeError(
            f"{name}: {width}x{height} image ({width * height:,} pixels) is above the limit of "
            f"{limit:,} pixels; set {MAX_PIXELS_ENV}={width * height} (or more) to decode it"
        )
    if min(width, height) < MIN_SIDE:
        raise DecodeError(
            f"{name}: {width}x{height} image is smaller than {MIN_SIDE} pixels on a side, too "
            "small to hold a radiograph; replace or remove the file"
        )


def _raise_pillow_limit(limit: int) -> None:
    # Pillow warns above Image.MAX_IMAGE_PIXELS and refuses above twice that, at open and again for some
    # formats (TIFF tiles, GIF frames) at load: never below ours, so a raised setting really decodes
    with _PIL_LOCK:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
            Image.MAX_IMAGE_PIXELS = limit


def _open_quiet(src: Path | BinaryIO, name: str, limit: int) -> Image.Image:
    """`Image.open` (header only) without Pillow's DecompressionBombWarning: our own check reports."""
    with _PIL_LOCK, warnings.catch_warnings():  # the lock: catch_warnings is not thread-safe
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(src)
        except Image.DecompressionBombError as exc:  # over twice Pillow's limit, which is >= ours
            m = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(m.group(1)):,} pixels" if m else f"over {2 * limit:,} pixels"
            raise DecodeError(
                f"{name}: image of {size} is above the limit of {limit:,} pixels; set "
                f"{MAX_PIXELS_ENV} higher to decode it"
            ) from None


def minmax_uint8(arr: np.ndarray) -> np.ndarray:
    """Linear min-max stretch to 0..255; a constant image gives zeros (no division by zero, no NaN).

    Raises ValueError on empty or non-finite input (the decoders turn it into a DecodeError)."""
    a = np.asarray(arr, dtype=np.float64)
    if a.size == 0 or not np.isfinite(a).all():
        raise ValueError("pixel data is empty or holds NaN/inf")
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.ascontiguousarray(np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8))


def _decode_pillow(src: Path | BinaryIO, name: str, limit: int) -> np.ndarray:
    try:
        with _open_quiet(src, name, limit) as im:
            _check_size(name, *im.size, limit)
            im.load()  # decode now: a truncated file must fail here, not later in a worker
            mode = im.mode
            if mode in _HIGH_DEPTH_MODES:
                # 16-bit / 32-bit radiographs: stretch the used range, don't just drop the low byte
                return minmax_uint8(np.asarray(im))
            # L as is; RGB, P, CMYK... -> Pillow's ITU-R 601 luminance. RGBA / LA / PA: Pillow's "L"
            # conversion discards alpha (no compositing): a radiograph's transparency carries no meaning
            out = np.asarray(im if mode == "L" else im.convert("L"))
    except DecodeError:
        raise
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise DecodeError(f"{name}: not a readable image ({_short(exc)})") from None
    if out.ndim != 2 or out.size == 0:
        raise DecodeError(f"{name}: unexpected image shape {out.shape}")
    _check_size(name, out.shape[1], out.shape[0], limit)  # the decoded size, should a header have lied
    return np.array(out, dtype=np.uint8, order="C")  # a writable copy (Pillow's buffer is read-only)


def _decode_dicom(src: Path | BinaryIO, name: str, limit: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    try:
        ds = pydicom.dcmread(src, force=True)
    except Exception as exc:
        raise DecodeError(f"{name}: not a readable DICOM file ({_short(exc)})") from None
    # Patient fields go unread (values convert lazily, and pydicom quotes invalid ones in warnings): no
    # later access, warning or error message can reach them
    for tag in [t for t in ds.keys() if t.group == 0x0010]:
        del ds[tag]
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError(f"{name}: DICOM has no pixel data")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if isinstance(rows, int) and isinstance(cols, int):
        _check_size(name, cols, rows, limit)  # from the header, before any pixel is decoded
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        # multi-frame: the first frame is the radiograph we classify, and the only one decoded (the
        # pixel limit is per frame, so decoding them all would let a small compressed file explode)
        arr = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
        arr = apply_modality_lut(arr, ds)  # rescale slope / intercept (or a modality LUT)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            arr = apply_voi_lut(arr, ds)
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim == 3 and arr.shape[-1] == 3:  # colour DICOM: same luminance weights as Pillow
            arr = arr @ np.array([0.299, 0.587, 0.114])
        if arr.ndim != 2:
            raise DecodeError(f"{name}: unexpected DICOM pixel shape {arr.shape}")
        _check_size(name, arr.shape[1], arr.shape[0], limit)
        out = minmax_uint8(arr)
    except DecodeError:
        raise
    except Exception as exc:  # missing codec, bad lengths, malformed LUT, NaN pixels...
        raise DecodeError(f"{name}: cannot decode DICOM pixels ({_short(exc)})") from None
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: high values are dark; flip so bone is bright like everywhere else
    return out


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."
