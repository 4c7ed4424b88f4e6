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
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path

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
    limit = max_pixels_setting() if max_pixels is None else int(max_pixels)
    if limit <= 0:
        raise XraylensError(f"max_pixels={max_pixels} must be a positive number of pixels")
    _raise_pillow_limit(limit)
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
        return _decode_dicom(p, limit)
    return _decode_pillow(p, limit)


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


def _open_quiet(p: Path, limit: int) -> Image.Image:
    """`Image.open` (header only) without Pillow's DecompressionBombWarning: our own check reports."""
    with _PIL_LOCK, warnings.catch_warnings():  # the lock: catch_warnings is not thread-safe
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(p)
        except Image.DecompressionBombError as exc:  # over twice Pillow's limit, which is >= ours
            m = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(m.group(1)):,} pixels" if m else f"over {2 * limit:,} pixels"
            raise DecodeError(
                f"{p.name}: image of {size} is above the limit of {limit:,} pixels; set "
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


def _decode_pillow(p: Path, limit: int) -> np.ndarray:
    try:
        with _open_quiet(p, limit) as im:
            _check_size(p.name, *im.size, limit)
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
        raise DecodeError(f"{p.name}: not a readable image ({_short(exc)})") from None
    if out.ndim != 2 or out.size == 0:
        raise DecodeError(f"{p.name}: unexpected image shape {out.shape}")
    _check_size(p.name, out.shape[1], out.shape[0], limit)  # the decoded size, should a header have lied
    return np.array(out, dtype=np.uint8, order="C")  # a writable copy (Pillow's buffer is read-only)


def _decode_dicom(p: Path, limit: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(p, force=True)
    except Exception as exc:
        raise DecodeError(f"{p.name}: not a readable DICOM file ({_short(exc)})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError(f"{p.name}: DICOM has no pixel data")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if isinstance(rows, int) and isinstance(cols, int):
        _check_size(p.name, cols, rows, limit)  # before pixel_array: it decodes every frame at once
    try:
        arr = ds.pixel_array
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            arr = arr[0]  # multi-frame: the first frame is the radiograph we classify
        arr = apply_modality_lut(arr, ds)  # rescale slope / intercept (or a modality LUT)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            arr = apply_voi_lut(arr, ds)
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim == 3 and arr.shape[-1] == 3:  # colour DICOM: same luminance weights as Pillow
            arr = arr @ np.array([0.299, 0.587, 0.114])
        if arr.ndim != 2:
            raise DecodeError(f"{p.name}: unexpected DICOM pixel shape {arr.shape}")
        _check_size(p.name, arr.shape[1], arr.shape[0], limit)
        out = minmax_uint8(arr)
    except DecodeError:
        raise
    except Exception as exc:  # missing codec, bad lengths, malformed LUT, NaN pixels...
        raise DecodeError(f"{p.name}: cannot decode DICOM pixels ({_short(exc)})") from None
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: high values are dark; flip so bone is bright like everywhere else
    return out


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."
