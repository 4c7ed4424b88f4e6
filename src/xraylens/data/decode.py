"""Decode one radiograph file to a uint8 greyscale array [H, W].

PNG / JPEG / BMP / TIFF go through Pillow, DICOM through pydicom. Anything that cannot be read
raises `DecodeError` with a short reason; callers skip and report the file instead of crashing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from xraylens.errors import DecodeError

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """The image at `path` as a C-contiguous uint8 array [H, W]."""
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
        return _decode_dicom(p)
    return _decode_pillow(p)


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


def _decode_pillow(p: Path) -> np.ndarray:
    try:
        with Image.open(p) as im:
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
    return np.array(out, dtype=np.uint8, order="C")  # a writable copy (Pillow's buffer is read-only)


def _decode_dicom(p: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(p, force=True)
    except Exception as exc:
        raise DecodeError(f"{p.name}: not a readable DICOM file ({_short(exc)})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError(f"{p.name}: DICOM has no pixel data")
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
