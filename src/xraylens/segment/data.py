"""Image/mask pairs of a segmentation dataset, their patient groups and a grouped held-out split.

A dataset is a folder with `images/` and `masks/` (same file names), optionally a `pairs.csv`
(columns image, mask relative to the folder; rows whose `status` is not "ok" are left out) and a
`covid_metadata.csv` (the COVID-19 image data collection's: `patientid`, `filename`) that gives each
image its patient, so no patient is on both sides of the split. Without one, each image is its own group.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xraylens.data.cache import prepare_image
from xraylens.data.decode import decode_image
from xraylens.data.sources import is_image_file, natural_key
from xraylens.errors import XraylensError


@dataclass(frozen=True)
class Pair:
    id: str  # image path relative to the dataset folder
    image: Path
    mask: Path
    group: str  # patient id, else the image stem


def read_pairs(root: str | Path) -> tuple[list[Pair], str]:
    """The pairs of `root` and how they were grouped ("patientid (covid_metadata.csv)" or "image")."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise XraylensError(f"segmentation data {root} does not exist; pass a folder with images/ and masks/")
    rows: list[tuple[str, str, str]] = []  # image, mask, original file name
    table = root / "pairs.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                if r.get("status", "ok") not in ("ok", ""):
                    continue
                if not r.get("image") or not r.get("mask"):
                    raise XraylensError(f"{table}: every row needs image and mask columns")
                rows.append((r["image"], r["mask"], Path(r.get("orig_file") or r["image"]).name))
    else:
        if not (root / "images").is_dir() or not (root / "masks").is_dir():
            raise XraylensError(f"{root} has neither pairs.csv nor images/ and masks/; pass a segmentation dataset")
        for p in sorted((root / "images").iterdir(), key=lambda q: natural_key(q.name)):
            if is_image_file(p) and (root / "masks" / p.name).is_file():
                rows.append((f"images/{p.name}", f"masks/{p.name}", p.name))
    patients = _patients(root / "covid_metadata.csv")
    pairs, grouped = [], 0
    for image, mask, orig in rows:
        pid = patients.get(orig.lower())
        grouped += pid is not None
        pairs.append(Pair(image, root / image, root / mask, f"patient:{pid}" if pid else f"image:{Path(image).stem}"))
    if not pairs:
        raise XraylensError(f"no image/mask pairs in {root}; expected images/X.png with masks/X.png")
    how = f"patientid (covid_metadata.csv, {grouped} of {len(pairs)} images)" if grouped else "image"
    return pairs, how


def _patients(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        return {
            r["filename"].lower(): r["patientid"]
            for r in csv.DictReader(fh)
            if r.get("filename") and r.get("patientid")
        }


def split_groups(pairs: list[Pair], val_fraction: float, seed: int) -> list[str]:
    """ "train" / "val" per pair: whole groups in a seeded order go to val until it holds `val_fraction`
    of the images (at least one group, and at least one left for training)."""
    groups = sorted({p.group for p in pairs})
    if len(groups) < 2:
        raise XraylensError(f"{len(pairs)} pairs in {len(groups)} group: need at least 2 groups to hold one out")
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    sizes = {g: 0 for g in groups}
    for p in pairs:
        sizes[p.group] += 1
    val: set[str] = set()
    n_val = 0
    for g in order[:-1]:
        if val and n_val >= val_fraction * len(pairs):
            break
        val.add(g)
        n_val += sizes[g]
    return ["val" if p.group in val else "train" for p in pairs]


def load_pairs(pairs: list[Pair], image_size: int) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
    """uint8 images [N, H, W] and bool masks [N, H, W] at `image_size`, through `prepare_image` (the
    classifier's preprocessing), the indices of the pairs kept, and notes naming the pairs left out
    (unreadable, or a mask of another size)."""
    images, masks, kept, notes = [], [], [], []
    for i, p in enumerate(pairs):
        try:
            img, geom = prepare_image(p.image, image_size)
            m = decode_image(p.mask)
        except Exception as exc:  # DecodeError, or a bad file Pillow cannot open: one pair lost, not the run
            notes.append(f"{p.id}: {exc}")
            continue
        if m.shape != (geom.orig_h, geom.orig_w):
            notes.append(f"{p.id}: mask {m.shape[1]}x{m.shape[0]} != image {geom.orig_w}x{geom.orig_h}")
            continue
        # the mask goes through the same crop+resize; bilinear then >= half keeps the boundary unbiased
        mk, _ = prepare_image(np.where(m > 0, 255, 0).astype(np.uint8), image_size)
        images.append(img)
        masks.append(mk >= 128)
        kept.append(i)
    if not images:
        raise XraylensError("no readable image/mask pair: " + "; ".join(notes[:3]))
    return np.stack(images), np.stack(masks), kept, notes
