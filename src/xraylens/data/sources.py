"""Data sources: class folders (with or without split folders), a CSV manifest, or a MedMNIST .npz.

Every source yields the same `SourceSet` of `Record`s, so the cache, the loader and every command
downstream never care where the images came from.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from xraylens.data.records import Record, SourceSet
from xraylens.errors import XraylensError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
# split folder names we recognise; the aliases of "val" collapse so every command can ask for "val"
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "dev",
                 "test": "test"}


def natural_key(name: str) -> tuple:
    """Sort key for "2" < "10" and "img2" < "img10"; the raw name breaks ties so the order is total."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p.casefold()) for p in parts if p) + (name,)


def natural_sorted(names) -> list[str]:
    return sorted(names, key=natural_key)


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def normalise_split(name: str) -> str:
    return SPLIT_ALIASES.get(name.strip().lower(), name.strip())


def load_source(path: str | os.PathLike, *, val_fraction: float = 0.15, seed: int = 0) -> SourceSet:
    """Read a dataset description: a folder tree, a `.csv` manifest or a MedMNIST `.npz`.

    Without a "val" split, one is carved from "train" (stratified, deterministic in `seed`).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise XraylensError(f"data path {p} does not exist; pass a folder, a .csv manifest or an .npz file")
    if not 0.0 <= val_fraction < 1.0:
        raise XraylensError(f"val_fraction must be in [0, 1), got {val_fraction}; use e.g. 0.15")
    if p.is_dir():
        source = _load_folders(p)
    elif p.suffix.lower() == ".csv":
        source = _load_manifest(p)
    elif p.suffix.lower() == ".npz":
        source = _load_npz(p)
    else:
        raise XraylensError(f"cannot read data from {p}: pass a folder, a .csv manifest or a MedMNIST .npz")
    if "val" not in source.splits and "train" in source.splits and val_fraction > 0:
        _split_val(source, val_fraction, seed)
    return source


# ---------------------------------------------------------------------------------------------- folders


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    # hidden files/folders (.DS_Store, .ipynb_checkpoints) are neither data nor "ignored" noise
    with os.scandir(folder) as it:
        return [e for e in it if not e.name.startswith(".")]


def _scan_class_folder(folder: Path) -> tuple[list[Path], int]:
    """Image files anywhere under `folder` (natural order) and the count of other files."""
    images: list[Path] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if f.startswith("."):
                continue
            if is_image_file(f):
                images.append(Path(dirpath) / f)
            else:
                ignored += 1
    images.sort(key=lambda q: natural_key(q.as_posix()))
    return images, ignored


def _scan_split(folder: Path) -> tuple[dict[str, list[Path]], int]:
    """{class folder name: image files} for one folder of class folders, and the ignored-file count."""
    classes: dict[str, list[Path]] = {}
    ignored = 0
    for e in _visible_entries(folder):
        if e.is_dir():
            classes[e.name], n = _scan_class_folder(Path(e.path))
            ignored += n
        else:
            ignored += 1  # a stray file beside the class folders (a README, a CSV of boxes...)
    return classes, ignored


def _load_folders(root: Path) -> SourceSet:
    dirs = [e for e in _visible_entries(root) if e.is_dir()]
    if not dirs:
        raise XraylensError(f"{root} holds no folders; expected root/{{class}}/images or "
                            "root/{train,val,test}/{class}/images")
    split_dirs = [e for e in dirs if e.name.lower() in SPLIT_ALIASES]
    ignored = 0
    per_split: dict[str, dict[str, list[Path]]] = {}
    split_folder: dict[str, Path] = {}
    if split_dirs:
        others = [e.name for e in dirs if e.name.lower() not in SPLIT_ALIASES]
        if others:
            raise XraylensError(
                f"{root} mixes split folders ({', '.join(e.name for e in split_dirs)}) with other folders "
                f"({', '.join(natural_sorted(others))}); move every class folder inside a split folder")
        for e in sorted(split_dirs, key=lambda e: e.name):
            name = normalise_split(e.name)
            if name in per_split:
                raise XraylensError(f"{root} has two folders for split {name!r} ({split_folder[name].name}, "
                                    f"{e.name}); keep one")
            per_split[name], n = _scan_split(Path(e.path))
            split_folder[name] = Path(e.path)
            ignored += n
        ignored += sum(1 for e in _visible_entries(root) if not e.is_dir())  # files beside split folders
        layout = "split_folders"
    else:
        per_split["train"], n = _scan_split(root)
        split_folder["train"] = root
        ignored += n
        layout = "class_folders"

    for name, classes in per_split.items():
        if not any(classes.values()):
            raise XraylensError(f"split {name!r} ({split_folder[name]}) holds no image files "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder")

    # class set = class folders holding >= 1 image; it must be the same in every split
    class_sets = {name: {c for c, files in classes.items() if files} for name, classes in per_split.items()}
    ref = "train" if "train" in class_sets else next(iter(class_sets))
    for name, have in class_sets.items():
        missing, extra = class_sets[ref] - have, have - class_sets[ref]
        if missing or extra:
            parts = [f"split {name!r} differs from {ref!r}:"]
            if missing:
                parts.append(f"lacks class(es) {natural_sorted(missing)}")
            if extra:
                parts.append(f"has extra class(es) {natural_sorted(extra)}")
            empty = [str(split_folder[s] / c) for s in (name, ref) for c in natural_sorted(missing | extra)
                     if c in per_split[s] and not per_split[s][c]]
            if empty:
                parts.append(f"(empty folder: {', '.join(empty)})")
            raise XraylensError(" ".join(parts) + "; give every split the same class folders, with images")
    all_classes = class_sets[ref]
    for name, classes in per_split.items():
        empty = [c for c, files in classes.items() if not files]
        if empty:
            folders = ", ".join(str(split_folder[name] / c) for c in natural_sorted(empty))
            raise XraylensError(f"class folder(s) {folders} hold no image files; add images or remove them")

    class_names = natural_sorted(all_classes)
    index = {c: i for i, c in enumerate(class_names)}
    records = []
    for name in _split_order(per_split):
        for c in class_names:
            for f in per_split[name][c]:
                records.append(Record(id=f.relative_to(root).as_posix(), label=index[c], split=name,
                                      path=str(f.resolve())))
    info: dict[str, Any] = {"layout": layout, "ignored_files": ignored}
    return SourceSet(root=str(root.resolve()), classes=class_names, records=records, kind="folders",
                     split_info=info)


def _split_order(names) -> list[str]:
    known = ["train", "val", "dev", "test"]
    return [n for n in known if n in names] + natural_sorted(n for n in names if n not in known)


# ---------------------------------------------------------------------------------------------- manifest


def _load_manifest(path: Path) -> SourceSet:
    base = path.resolve().parent
    with open(path, newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: Excel's BOM
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise XraylensError(f"manifest {path} is empty; add a header path,label[,split]") from None
        cols = [h.strip() for h in header]
        lower = [h.lower() for h in cols]
        if "path" not in lower or "label" not in lower:
            raise XraylensError(f"manifest {path} has columns {cols}; it needs 'path' and 'label' "
                                "(and optionally 'split')")
        i_path, i_label = lower.index("path"), lower.index("label")
        i_split = lower.index("split") if "split" in lower else None
        extra = [(i, c) for i, c in enumerate(cols) if i not in (i_path, i_label, i_split)]
        rows = []
        seen: dict[str, int] = {}
        for row_no, row in enumerate(reader, start=1):
            if not any(cell.strip() for cell in row):
                continue  # blank lines are harmless
            row = row + [""] * (len(cols) - len(row))
            rel, label = row[i_path].strip(), row[i_label].strip()
            line = reader.line_num
            for col, val in (("path", rel), ("label", label)):
                if not val:
                    raise XraylensError(f"manifest {path} row {row_no} (line {line}) has an empty {col!r}; "
                                        "fill it in or delete the row")
            split = normalise_split(row[i_split]) if i_split is not None and row[i_split].strip() else "train"
            f = Path(rel).expanduser()
            f = f if f.is_absolute() else base / f
            f = Path(os.path.normpath(f))
            try:
                rid = f.relative_to(base).as_posix()
            except ValueError:
                rid = f.as_posix()  # outside the manifest's folder: the absolute path is the stable id
            if rid in seen:
                raise XraylensError(f"manifest {path} row {row_no} (line {line}) repeats {rel!r} from row "
                                    f"{seen[rid]}; list each image once")
            seen[rid] = row_no
            clinical = {c: row[i].strip() for i, c in extra} or None
            rows.append((rid, str(f), label, split, clinical))
    if not rows:
        raise XraylensError(f"manifest {path} lists no images; add rows path,label[,split]")
    class_names = natural_sorted({r[2] for r in rows})
    index = {c: i for i, c in enumerate(class_names)}
    records = [Record(id=rid, label=index[label], split=split, path=f, clinical=clin)
               for rid, f, label, split, clin in rows]
    return SourceSet(root=str(base), classes=class_names, records=records, kind="manifest",
                     split_info={"layout": "manifest", "manifest": str(path.resolve()), "ignored_files": 0})


# ---------------------------------------------------------------------------------------------- npz


def _to_grey(images: np.ndarray) -> np.ndarray:
    """RGB uint8 -> luminance with Pillow's exact integer formula, so npz and files agree."""
    rgb = images.astype(np.uint32)
    grey = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return grey.astype(np.uint8)


def _load_npz(path: Path) -> SourceSet:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile / numpy raise several types for a bad file
        raise XraylensError(f"cannot read {path} as .npz ({exc}); pass a MedMNIST .npz file") from None
    with data:
        keys = set(data.files)
        splits = [k[: -len("_images")] for k in keys if k.endswith("_images")]
        if not splits:
            raise XraylensError(f"{path} has keys {sorted(keys)}; a MedMNIST .npz needs train_images/"
                                "train_labels (and val_, test_)")
        arrays: dict[str, np.ndarray] = {}
        labels: dict[str, np.ndarray] = {}
        for s in splits:
            if f"{s}_labels" not in keys:
                raise XraylensError(f"{path} has {s}_images but no {s}_labels; add the labels array")
            img, lab = data[f"{s}_images"], data[f"{s}_labels"]
            if img.dtype != np.uint8 or img.ndim not in (3, 4) or (img.ndim == 4 and img.shape[-1] != 3):
                raise XraylensError(f"{path}: {s}_images is {img.dtype} {list(img.shape)}; expected uint8 "
                                    "[N,H,W] or [N,H,W,3]")
            if lab.ndim == 2 and lab.shape[1] == 1:
                lab = lab[:, 0]
            if lab.ndim != 1 or len(lab) != len(img) or not np.issubdtype(lab.dtype, np.integer) or \
                    (len(lab) and lab.min() < 0):
                raise XraylensError(f"{path}: {s}_labels is {lab.dtype} {list(lab.shape)}; expected "
                                    f"{len(img)} non-negative integer labels ([N] or [N,1]; multi-label is "
                                    "not supported)")
            arrays[normalise_split(s)] = np.ascontiguousarray(_to_grey(img) if img.ndim == 4 else img)
            labels[normalise_split(s)] = lab.astype(np.int64)
    k = int(max((int(v.max()) for v in labels.values() if len(v)), default=0)) + 1
    classes = [str(i) for i in range(k)]
    records = []
    for s in _split_order(arrays):
        records += [Record(id=f"{path.name}:{s}:{i}", label=int(y), split=s, array_index=i)
                    for i, y in enumerate(labels[s])]
    return SourceSet(root=str(path.resolve()), classes=classes, records=records, kind="npz",
                     split_info={"layout": "npz", "ignored_files": 0}, arrays=arrays)


# ---------------------------------------------------------------------------------------------- val split


def _split_val(source: SourceSet, fraction: float, seed: int) -> None:
    """Move a stratified `fraction` of train to "val" in place; every class with >= 2 images gives >= 1."""
    rng = np.random.default_rng(seed)
    train = [r for r in source.records if r.split == "train"]
    to_val: set[str] = set()
    for label in range(len(source.classes)):
        ids = [r.id for r in train if r.label == label]  # already in a stable (natural) order
        if len(ids) < 2:
            continue
        k = min(len(ids) - 1, max(1, int(round(len(ids) * fraction))))
        to_val.update(ids[i] for i in rng.permutation(len(ids))[:k])
    if source.kind == "npz":
        # keep SourceSet.arrays[split][record.array_index] valid: split the train array too
        arr = source.arrays["train"]
        val_idx = [r.array_index for r in train if r.id in to_val]
        keep_idx = [r.array_index for r in train if r.id not in to_val]
        source.arrays["val"], source.arrays["train"] = arr[val_idx], arr[keep_idx]
        new_pos = {i: n for n, i in enumerate(val_idx)} | {i: n for n, i in enumerate(keep_idx)}
    records = []
    for r in source.records:
        if r.split == "train" and r.id in to_val:
            r = replace(r, split="val")
        if source.kind == "npz" and r.split in ("train", "val") and r.id.split(":")[-2] == "train":
            r = replace(r, array_index=new_pos[r.array_index])
        records.append(r)
    source.records = [r for r in records if r.split != "val"] + [r for r in records if r.split == "val"]
    source.split_info["val"] = {"from": "train", "fraction": fraction, "seed": seed, "n": len(to_val)}


# ------------------------------------------------------------------------------------- unlabelled images


UNLABELLED = "unlabelled"


def is_plain_image_folder(path: str | os.PathLike) -> bool:
    """A folder holding image files and no sub-folders (no classes, no splits)."""
    p = Path(path)
    if not p.is_dir():
        return False
    entries = _visible_entries(p)
    return any(e.is_file() and is_image_file(e.name) for e in entries) and not any(e.is_dir() for e in entries)


def load_image_folder(path: str | os.PathLike) -> SourceSet:
    """Every image under `path` as one split "all" of one class (labels unknown): for explaining or
    localising a folder of annotated images such as NIH's, through the same cache as any split."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise XraylensError(f"image folder {p} does not exist")
    images, ignored = _scan_class_folder(p)
    if not images:
        raise XraylensError(f"no image files (.png, .jpg, .dcm, ...) under {p}")
    records = [Record(id=q.relative_to(p).as_posix(), label=0, split="all", path=str(q)) for q in images]
    return SourceSet(root=str(p), classes=[UNLABELLED], records=records, kind="images",
                     split_info={"ignored_files": ignored})
