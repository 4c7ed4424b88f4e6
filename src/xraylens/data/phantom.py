"""Synthetic chest-radiograph phantoms with a known lesion box, for the embedded demo and tests.

Each image is a frontal "chest film": dark surround, a body silhouette, two dark lung fields, a
bright spine / mediastinum / heart, rib arcs, smooth exposure variation, film-grain texture and a
slight blur. Half the images (by default) carry a lesion: a soft, bright elliptical opacity inside
one lung field. Its box is its visible extent (centre +- 2 sigma), in image pixel coordinates
(x, y, w, h), x = column, pixel (r, c) covering [c, c+1) x [r, r+1) (see `data.records`).

Everything is vectorised over the batch and drawn from one seeded generator, so the same
arguments give bit-identical arrays, and a few hundred 96 px images take about a second.

Planted shortcut (`marker`): a bright letter "L" burned into the top-left corner, like a film's side
marker, whose presence agrees with the label with a chosen probability per split (e.g. 95 % in train
and val, 50 % = independent of the label in test). A model that learns it is right for the wrong
reason, and the shortcut audit (`xraylens audit`) must say so. It is drawn from its own generator, so
the images without the option stay bit-identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from xraylens.errors import XraylensError

CLASSES = ("normal", "opacity")  # label 0, 1: folder names; sorted order too, so the positive class is last
SPLITS = ("train", "val", "test")

# lesion visible diameter (4 sigma) as a fraction of the image side, and its peak brightness
# (image intensities are 0..1 before contrast); rib arcs add ~0.07, lungs sit around 0.2-0.3
LESION_DIAMETER = (0.08, 0.16)
LESION_AMPLITUDE = (0.24, 0.34)
_CHUNK = 128  # images per vectorised chunk: bounds memory at [chunk, H, W] float32 temporaries
# the burned-in "L": inset and height as fractions of the side (inside the audit's default 0.15 corner)
MARKER_INSET, MARKER_SIZE, MARKER_VALUE = 0.03, 0.10, 245


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Smooth step: 1 inside (d < 0), 0 outside, over about `width` (normalised units)."""
    return 1.0 / (1.0 + np.exp(np.clip(d / width, -30, 30)))


def _render(p: dict[str, np.ndarray], u: np.ndarray, v: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one chunk. `p` holds per-image parameters as [n, 1, 1] arrays; u, v are [1, H, W]
    normalised pixel-centre coordinates (column, row) in [0, 1]."""
    n = p["cx"].shape[0]
    cx, cy, s = p["cx"], p["cy"], p["scale"]
    du = (u - cx) / s  # body frame: patient centred, scaled
    dv = (v - cy) / s

    # body silhouette: wide superellipse, open at top and bottom like a cropped chest film
    body_d = (np.abs(du) / 0.43) ** 4 + (np.abs(dv) / 0.62) ** 6 - 1.0
    body = _soft(body_d, 0.08)
    img = 0.06 + 0.40 * body

    # lung fields: ellipses either side of the midline, a little narrower at the top
    lungs = np.zeros_like(img)
    for side in (-1.0, 1.0):
        lx = du - side * p["lung_dx"]
        ly = dv - p["lung_dy"]
        a = p["lung_a"] * (1.0 + 0.25 * np.clip(ly / p["lung_b"], -1, 1))  # apex narrower than base
        d = (lx / a) ** 2 + (ly / p["lung_b"]) ** 2 - 1.0
        lungs = np.maximum(lungs, _soft(d, 0.12))
    img -= p["lung_depth"] * lungs * body

    # mediastinum + heart (bright, dense): a central band and a heart bulging to the patient's left
    # (image right), both suppressing the lung behind them
    medi = _soft(np.abs(du) / 0.07 - 1.0, 0.15) * _soft(dv - 0.45, 0.05)
    heart_d = ((du - 0.07) / 0.17) ** 2 + ((dv - 0.20) / 0.13) ** 2 - 1.0
    dense = np.maximum(medi, _soft(heart_d, 0.2))
    img += 0.26 * dense * body

    # spine: narrow bright column with vertebral bodies (periodic along v)
    vert = 0.75 + 0.25 * np.cos(2 * np.pi * dv / 0.075 + p["phase"])
    img += 0.12 * _soft(np.abs(du) / 0.035 - 1.0, 0.2) * vert * body

    # ribs: thin bright arcs leaving the spine and curving down towards the flanks
    ribs = np.zeros_like(img)
    ax = np.abs(du)
    for i in range(9):
        v0 = -0.42 + i * 0.085 * p["rib_gap"]
        curve = v0 + 0.9 * ax**2 + 0.15 * ax
        ribs = np.maximum(ribs, np.exp(-0.5 * ((dv - curve) / 0.012) ** 2) * (ax > 0.04))
    img += p["rib_amp"] * ribs * body

    # smooth exposure variation: a few random low-frequency waves per image
    for j in range(3):
        img += 0.025 * np.cos(2 * np.pi * (p[f"fu{j}"] * u + p[f"fv{j}"] * v) + p[f"ph{j}"])

    # lesion: soft elliptical opacity (sigma-parameterised, slightly flattened top)
    if "lx" in p:
        r2 = ((u * size - p["lx"]) / p["lsx"]) ** 2 + ((v * size - p["ly"]) / p["lsy"]) ** 2
        blob = np.exp(-0.5 * r2**1.3)  # exponent > 1: plateau-ish core, still soft
        img += p["lamp"] * p["has"] * blob

    # film grain: smoothed noise (texture) + white noise, then a slight blur
    tex = gaussian_filter(rng.standard_normal((n, size, size)).astype(np.float32), (0, 1.5, 1.5))
    img += 0.10 * tex + 0.015 * rng.standard_normal((n, size, size)).astype(np.float32)
    img = gaussian_filter(img.astype(np.float32), (0, 0.6, 0.6))

    # per-image contrast / brightness and a gamma, like different exposures and processing
    img = np.clip((img - 0.25) * p["contrast"] + 0.25 + p["bright"], 0.0, 1.0) ** p["gamma"]
    return np.round(img * 255.0).astype(np.uint8)


def marker_box(size: int) -> tuple[int, int, int]:
    """(top/left inset, height, stroke) of the "L" marker in pixels for an image of side `size`."""
    return max(1, round(MARKER_INSET * size)), max(3, round(MARKER_SIZE * size)), max(1, round(0.03 * size))


def burn_marker(images: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Burn a bright "L" (a vertical and a horizontal bar) into the top-left corner of the images
    [N, H, W] uint8 where `which` [N] is true; in place, returns `images`."""
    size = images.shape[-1]
    inset, height, stroke = marker_box(size)
    width = max(stroke + 1, round(0.7 * height))
    sel = np.asarray(which, dtype=bool)
    images[sel, inset : inset + height, inset : inset + stroke] = MARKER_VALUE
    images[sel, inset + height - stroke : inset + height, inset : inset + width] = MARKER_VALUE
    return images


def marker_presence(labels: np.ndarray, agreement: float, seed: int) -> np.ndarray:
    """Bool [N]: the marker is present where the label is 1 for a fraction `agreement` of the images
    and where it is 0 for the rest (0.5: independent of the label), from its own seeded generator."""
    if not 0.0 <= agreement <= 1.0:
        raise XraylensError(f"marker agreement must be in [0, 1], got {agreement}")
    agree = np.random.default_rng(seed).random(len(labels)) < agreement
    return np.where(agree, labels == 1, labels == 0)


def make_phantom_arrays(
    n: int, size: int = 96, seed: int = 0, lesion_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` phantoms: images uint8 [N, H, W], labels int64 [N] (1 = lesion), boxes float64 [N, 4]
    (x, y, w, h in pixels; NaN rows for normal images). round(n * lesion_fraction) carry a lesion.
    (`burn_marker` + `marker_presence` add the planted shortcut.)"""
    if n < 0:
        raise XraylensError(f"phantom count must be >= 0, got {n}")
    if size < 32:
        raise XraylensError(f"phantom size {size} is too small to draw anatomy; use 32 or more (e.g. 96)")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise XraylensError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=np.int64)
    labels[: int(round(n * lesion_fraction))] = 1
    labels = rng.permutation(labels)

    # every parameter for all images first, so a chunk's content never depends on chunking
    U = rng.uniform
    p: dict[str, np.ndarray] = {
        "cx": U(0.46, 0.54, n),
        "cy": U(0.46, 0.54, n),
        "scale": U(0.90, 1.08, n),
        "lung_dx": U(0.19, 0.23, n),
        "lung_dy": U(-0.08, -0.03, n),
        "lung_a": U(0.12, 0.15, n),
        "lung_b": U(0.29, 0.34, n),
        "lung_depth": U(0.20, 0.28, n),
        "phase": U(0, 2 * np.pi, n),
        "rib_gap": U(0.92, 1.08, n),
        "rib_amp": U(0.05, 0.09, n),
        "contrast": U(0.8, 1.25, n),
        "bright": U(-0.05, 0.05, n),
        "gamma": U(0.85, 1.2, n),
    }
    for j in range(3):
        p[f"fu{j}"], p[f"fv{j}"] = U(-1.2, 1.2, n), U(-1.2, 1.2, n)
        p[f"ph{j}"] = U(0, 2 * np.pi, n)

    # lesion: side, position within the inner part of that lung (in the body frame), size, shape
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    ang = U(0, 2 * np.pi, n)
    rad = np.sqrt(U(0, 1, n)) * 0.55  # uniform over a disc of 55 % of the lung's radii
    ldu = side * p["lung_dx"] + rad * np.cos(ang) * p["lung_a"]
    ldv = p["lung_dy"] + rad * np.sin(ang) * p["lung_b"]
    diam = U(*LESION_DIAMETER, n) * size
    aspect = U(0.75, 1.33, n)
    lsx, lsy = diam / 4.0 * np.sqrt(aspect), diam / 4.0 / np.sqrt(aspect)
    p.update(
        lx=(p["cx"] + ldu * p["scale"]) * size,
        ly=(p["cy"] + ldv * p["scale"]) * size,
        lsx=lsx,
        lsy=lsy,
        lamp=U(*LESION_AMPLITUDE, n),
        has=labels.astype(np.float64),
    )

    # pixel centres, normalised: pixel (r, c) covers [c, c+1), so its centre is c + 0.5
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = coords[None, None, :], coords[None, :, None]
    images = np.empty((n, size, size), dtype=np.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        chunk = {k: a[lo:hi, None, None].astype(np.float32) for k, a in p.items()}
        images[lo:hi] = _render(chunk, u, v, rng, size)

    boxes = np.full((n, 4), np.nan)
    x0 = np.clip(p["lx"] - 2 * lsx, 0, size)
    y0 = np.clip(p["ly"] - 2 * lsy, 0, size)
    x1 = np.clip(p["lx"] + 2 * lsx, 0, size)
    y1 = np.clip(p["ly"] + 2 * lsy, 0, size)
    les = labels == 1
    boxes[les] = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)[les]
    return images, labels, boxes


def write_phantom(
    out_dir: str | os.PathLike,
    n_train: int = 240,
    n_val: int = 60,
    n_test: int = 100,
    size: int = 96,
    seed: int = 0,
    marker: tuple[float, float, float] | None = None,
) -> Path:
    """Write a folder dataset `out/{train,val,test}/{normal,opacity}/phantom_00001.png` plus the
    lesion boxes as `boxes.csv` (NIH BBox_List layout) and `annotations_objectcxr.csv` (object-CXR
    dev.csv layout: `0 x1 y1 x2 y2`, empty for normal images). File names are unique across splits.
    Each split has its own derived seed, so it is class-balanced on its own.

    `marker` (train, val, test agreement, e.g. (0.95, 0.95, 0.5)): burn the "L" shortcut marker
    (see the module docstring) and list which images carry it in `markers.csv` (image, split, label,
    marker)."""
    from PIL import Image

    from xraylens.io import atomic_path, write_csv

    out = Path(out_dir)
    counts = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
    if any(c < 0 for c in counts.values()) or sum(counts.values()) == 0:
        raise XraylensError(f"phantom split sizes must be >= 0 and not all 0, got {counts}")
    if marker is not None and len(marker) != 3:
        raise XraylensError(f"marker takes one agreement per split (train, val, test), got {marker}")
    nih_rows: list[list[object]] = []
    ocxr_rows: list[list[object]] = []
    marker_rows: list[list[object]] = []
    idx = 0
    for k, split in enumerate(SPLITS):
        if counts[split] == 0:
            continue
        split_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        images, labels, boxes = make_phantom_arrays(counts[split], size=size, seed=split_seed)
        has_marker = np.zeros(len(labels), dtype=bool)
        if marker is not None:
            marker_seed = int(np.random.SeedSequence([seed, k, 1]).generate_state(1)[0])
            has_marker = marker_presence(labels, marker[k], marker_seed)
            burn_marker(images, has_marker)
        for img, lab, box, mk in zip(images, labels, boxes, has_marker, strict=True):
            idx += 1
            name = f"phantom_{idx:05d}.png"
            marker_rows.append([name, split, CLASSES[lab], int(mk)])
            path = out / split / CLASSES[lab] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path, suffix=".png") as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
            if lab == 1:
                x, y, w, h = (float(b) for b in box)
                nih_rows.append([name, "opacity", f"{x:.2f}", f"{y:.2f}", f"{w:.2f}", f"{h:.2f}"])
                # integer corners covering the whole box, as object-CXR stores them
                x1, y1 = int(np.floor(x)), int(np.floor(y))
                x2, y2 = int(np.ceil(x + w)), int(np.ceil(y + h))
                ocxr_rows.append([name, f"0 {x1} {y1} {x2} {y2}"])
            else:
                ocxr_rows.append([name, ""])
    write_csv(out / "boxes.csv", ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""], nih_rows)
    write_csv(out / "annotations_objectcxr.csv", ["image_name", "annotation"], ocxr_rows)
    if marker is not None:
        write_csv(out / "markers.csv", ["image", "split", "label", "marker"], marker_rows)
    return out


def dicom_phantom(pixels: np.ndarray | None, photometric: str = "MONOCHROME2"):
    """A minimal secondary-capture CR DICOM dataset holding `pixels` as uint16 (16 bits stored), for
    tests and benchmarks of the DICOM path; None leaves the pixel data out. Callers set further fields
    (rescale, window, patient) and `save_as` a path or a buffer."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    if pixels is not None:
        ds.set_pixel_data(pixels.astype(np.uint16), photometric_interpretation=photometric, bits_stored=16)
    return ds
