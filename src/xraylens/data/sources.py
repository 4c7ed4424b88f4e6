"""Data sources: class folders (with or without split folders), a CSV manifest, or a MedMNIST .npz.

Every source yields the same `SourceSet` of `Record`s, so the cache, the loader and every command
downstream never care where the images came from.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from xraylens.data.records import Record, SourceSet
from xraylens.errors import XraylensError

log = logging.getLogger("xraylens.data")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
MAX_NAMED = 20  # group names listed in split_info (leaks, unmatched examples); the counts are always whole
# split folder names we recognise; the aliases of "val" collapse so every command can ask for "val"
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "dev", "test": "test"}


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


def load_source(
    path: str | os.PathLike,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    group_pattern: str | None = None,
    group_column: str | None = None,
) -> SourceSet:
    """Read a dataset description: a folder tree, a `.csv` manifest or a MedMNIST `.npz`.

    Without a "val" split, one is carved from "train" (stratified, deterministic in `seed`).
    With `group_pattern` (a regex searched in each file name: its first capture group, else the whole
    match, names the group) or `group_column` (a manifest column), images of one group (patient) are
    never split between train and the carved val, and groups found in two given splits are reported in
    `split_info["leaked_groups"]`. An image without a group is a group of its own.
    """
    p = Path(path).expanduser()
    rx = compile_group_pattern(group_pattern)  # before any file is read: a typo costs nothing
    group_column = (group_column or "").strip() or None
    if rx is not None and group_column is not None:
        raise XraylensError("give group_pattern or group_column, not both")
    if not p.exists():
        raise XraylensError(f"data path {p} does not exist; pass a folder, a .csv manifest or an .npz file")
    if not 0.0 <= val_fraction < 1.0:
        raise XraylensError(f"val_fraction must be in [0, 1), got {val_fraction}; use e.g. 0.15")
    is_manifest = p.is_file() and p.suffix.lower() == ".csv"
    if group_column is not None and not is_manifest:
        raise XraylensError(
            f"group_column {group_column!r} needs a CSV manifest, but {p} is not one; "
            "use group_pattern to group by file name"
        )
    if p.is_dir():
        source = _load_folders(p)
    elif is_manifest:
        source = _load_manifest(p, group_column)
    elif p.suffix.lower() == ".npz":
        if rx is not None:
            raise XraylensError(f"{p} is a MedMNIST .npz: it has no file names to group by; leave group_pattern unset")
        source = _load_npz(p)
    else:
        raise XraylensError(f"cannot read data from {p}: pass a folder, a .csv manifest or a MedMNIST .npz")
    if rx is not None:
        _groups_from_names(source, rx)
    elif group_column is not None:
        _summarise_groups(source, {"column": group_column}, f"group column {group_column!r} of {p}")
    if "val" not in source.splits and "train" in source.splits and val_fraction > 0:
        _split_val(source, val_fraction, seed)
    if rx is not None or group_column is not None:
        report_leaked_groups(source)
    return source


def compile_group_pattern(pattern: str | None) -> re.Pattern | None:
    """The compiled `group_pattern` (None when unset or blank); a bad regex is a one-line error."""
    if pattern is None or not pattern.strip():
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise XraylensError(
            f"group_pattern {pattern!r} is not a valid regular expression ({exc}); "
            r"fix it, e.g. '^(person\d+)_'"
        ) from None


def group_of(name: str, rx: re.Pattern) -> str | None:
    """The group `rx` names in a file name: the first capture group, else the whole match; None if none."""
    m = rx.search(name)
    if m is None:
        return None
    g = m.group(1) if rx.groups else None
    return (g or m.group(0)) or None  # an empty or absent capture falls back to the whole match


# ---------------------------------------------------------------------------------------------- folders


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    # hidden files/folders (.DS_Store, .ipynb_checkpoints) are neither data nor "ignored" noise
    with os.scandir(folder) as it:
        return [e for e in it if not e.name.startswith(".")]


def _scan_class_folder(folder: Path) -> tuple[list[Path], int]:
    """Image files anywhere under `folder` (natural order) and the count of other files."""
    images: list[Path] = []
    ignored = 0
    seen: set[str] = set()
    # follow symlinked sub-folders (data is often linked in from another disk), each real folder once
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
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
        raise XraylensError(
            f"{root} holds no folders; expected root/{{class}}/images or root/{{train,val,test}}/{{class}}/images"
        )
    split_dirs = [e for e in dirs if e.name.lower() in SPLIT_ALIASES]
    ignored = 0
    per_split: dict[str, dict[str, list[Path]]] = {}
    split_folder: dict[str, Path] = {}
    if split_dirs:
        others = [e.name for e in dirs if e.name.lower() not in SPLIT_ALIASES]
        if others:
            raise XraylensError(
                f"{root} mixes split folders ({', '.join(e.name for e in split_dirs)}) with other folders "
                f"({', '.join(natural_sorted(others))}); move every class folder inside a split folder"
            )
        for e in sorted(split_dirs, key=lambda e: e.name):
            name = normalise_split(e.name)
            if name in per_split:
                raise XraylensError(
                    f"{root} has two folders for split {name!r} ({split_folder[name].name}, {e.name}); keep one"
                )
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
            raise XraylensError(
                f"split {name!r} ({split_folder[name]}) holds no image files "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder"
            )

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
            empty = [
                str(split_folder[s] / c)
                for s in (name, ref)
                for c in natural_sorted(missing | extra)
                if c in per_split[s] and not per_split[s][c]
            ]
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
                records.append(
                    Record(id=f.relative_to(root).as_posix(), label=index[c], split=name, path=str(f.resolve()))
                )
    info: dict[str, Any] = {"layout": layout, "ignored_files": ignored}
    return SourceSet(root=str(root.resolve()), classes=class_names, records=records, kind="folders", split_info=info)


def _split_order(names) -> list[str]:
    known = ["train", "val", "dev", "test"]
    return [n for n in known if n in names] + natural_sorted(n for n in names if n not in known)


# ---------------------------------------------------------------------------------------------- manifest


def read_csv_text(path: Path, what: str) -> str:
    """The text of a UTF-8 CSV; UTF-16 (Excel's "Unicode text") or binary files are a one-line error."""
    raw = path.read_bytes()
    not_utf8 = f"{what} {path} is not a UTF-8 CSV file"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in raw[:65536]:
        raise XraylensError(f"{not_utf8} (UTF-16 or binary); save it as 'CSV UTF-8' and try again")
    try:
        return raw.decode("utf-8-sig")  # utf-8-sig: Excel's BOM
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise XraylensError(f"{not_utf8} (undecodable byte at line {line}); save it as 'CSV UTF-8'") from None


def _column(cols: list[str], name: str) -> int | None:
    """Index of column `name`: exact, else the one case-insensitive match."""
    if name in cols:
        return cols.index(name)
    hits = [i for i, c in enumerate(cols) if c.lower() == name.lower()]
    return hits[0] if len(hits) == 1 else None


def _load_manifest(path: Path, group_column: str | None = None) -> SourceSet:
    base = path.resolve().parent
    reader = csv.reader(io.StringIO(read_csv_text(path, "manifest"), newline=""))
    try:
        try:
            header = next(reader)
        except StopIteration:
            raise XraylensError(f"manifest {path} is empty; add a header path,label[,split]") from None
        cols = [h.strip() for h in header]
        lower = [h.lower() for h in cols]
        if "path" not in lower or "label" not in lower:
            raise XraylensError(
                f"manifest {path} has columns {cols}; it needs 'path' and 'label' (and optionally 'split')"
            )
        i_path, i_label = lower.index("path"), lower.index("label")
        i_split = lower.index("split") if "split" in lower else None
        i_group = None
        if group_column is not None:
            i_group = _column(cols, group_column)
            if i_group is None or i_group in (i_path, i_label, i_split):
                raise XraylensError(
                    f"group_column {group_column!r} is not a column of manifest {path} "
                    f"(columns: {', '.join(cols)}); name one of them"
                )
        # the group column is an identifier, not a clinical feature: keep it out of `clinical`
        extra = [(i, c) for i, c in enumerate(cols) if i not in (i_path, i_label, i_split, i_group)]
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
                    raise XraylensError(
                        f"manifest {path} row {row_no} (line {line}) has an empty {col!r}; fill it in or delete the row"
                    )
            split = normalise_split(row[i_split]) if i_split is not None and row[i_split].strip() else "train"
            f = Path(rel).expanduser()
            f = f if f.is_absolute() else base / f
            f = Path(os.path.normpath(f))
            try:
                rid = f.relative_to(base).as_posix()
            except ValueError:
                rid = f.as_posix()  # outside the manifest's folder: the absolute path is the stable id
            if rid in seen:
                raise XraylensError(
                    f"manifest {path} row {row_no} (line {line}) repeats {rel!r} from row "
                    f"{seen[rid]}; list each image once"
                )
            seen[rid] = row_no
            clinical = {c: row[i].strip() for i, c in extra} or None
            group = (row[i_group].strip() or None) if i_group is not None else None
            rows.append((rid, str(f), label, split, clinical, group))
    except csv.Error as exc:
        msg = f"manifest {path} line {reader.line_num} is not valid CSV ({exc}); fix that line"
        raise XraylensError(msg) from None
    if not rows:
        raise XraylensError(f"manifest {path} lists no images; add rows path,label[,split]")
    _check_labels_in_train(path, rows)
    class_names = natural_sorted({r[2] for r in rows})
    index = {c: i for i, c in enumerate(class_names)}
    records = [
        Record(id=rid, label=index[label], split=split, path=f, clinical=clin, group=group)
        for rid, f, label, split, clin, group in rows
    ]
    return SourceSet(
        root=str(base),
        classes=class_names,
        records=records,
        kind="manifest",
        split_info={"layout": "manifest", "manifest": str(path.resolve()), "ignored_files": 0},
    )


def _check_labels_in_train(path: Path, rows: list[tuple]) -> None:
    """A label with rows in val/test but none in train would be a class the model never learns."""
    in_train = {r[2] for r in rows if r[3] == "train"}
    if not in_train:
        return  # an evaluation-only manifest: there is no training to spoil
    where: dict[str, set[str]] = {}
    for r in rows:
        if r[2] not in in_train:
            where.setdefault(r[2], set()).add(r[3])
    if where:
        labels = natural_sorted(where)
        splits = _split_order(set().union(*where.values()))
        raise XraylensError(
            f"manifest {path}: label(s) {labels} appear only in split(s) {splits}, never in "
            "'train'; add training rows for them or fix the label"
        )


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
            raise XraylensError(
                f"{path} has keys {sorted(keys)}; a MedMNIST .npz needs train_images/train_labels (and val_, test_)"
            )
        arrays: dict[str, np.ndarray] = {}
        labels: dict[str, np.ndarray] = {}
        for s in splits:
            if f"{s}_labels" not in keys:
                raise XraylensError(f"{path} has {s}_images but no {s}_labels; add the labels array")
            img, lab = data[f"{s}_images"], data[f"{s}_labels"]
            if img.dtype != np.uint8 or img.ndim not in (3, 4) or (img.ndim == 4 and img.shape[-1] != 3):
                raise XraylensError(
                    f"{path}: {s}_images is {img.dtype} {list(img.shape)}; expected uint8 [N,H,W] or [N,H,W,3]"
                )
            if lab.ndim == 2 and lab.shape[1] == 1:
                lab = lab[:, 0]
            if (
                lab.ndim != 1
                or len(lab) != len(img)
                or not np.issubdtype(lab.dtype, np.integer)
                or (len(lab) and lab.min() < 0)
            ):
                raise XraylensError(
                    f"{path}: {s}_labels is {lab.dtype} {list(lab.shape)}; expected "
                    f"{len(img)} non-negative integer labels ([N] or [N,1]; multi-label is "
                    "not supported)"
                )
            arrays[normalise_split(s)] = np.ascontiguousarray(_to_grey(img) if img.ndim == 4 else img)
            labels[normalise_split(s)] = lab.astype(np.int64)
    k = int(max((int(v.max()) for v in labels.values() if len(v)), default=0)) + 1
    classes = [str(i) for i in range(k)]
    records = []
    for s in _split_order(arrays):
        records += [
            Record(id=f"{path.name}:{s}:{i}", label=int(y), split=s, array_index=i) for i, y in enumerate(labels[s])
        ]
    return SourceSet(
        root=str(path.resolve()),
        classes=classes,
        records=records,
        kind="npz",
        split_info={"layout": "npz", "ignored_files": 0},
        arrays=arrays,
    )


# ---------------------------------------------------------------------------------------------- val split


def _split_val(source: SourceSet, fraction: float, seed: int) -> None:
    """Move a stratified `fraction` of train to "val" in place, keeping every group (patient) whole.

    The unit of the split is a group, or an image without one; a group counts for its majority label.
    Per class, units are taken in a seeded random order until about `fraction` of the class's images
    are in val; a class with >= 2 units gives >= 1 and keeps >= 1. Without groups this is the plain
    per-image stratified split."""
    rng = np.random.default_rng(seed)
    train = [r for r in source.records if r.split == "train"]
    k = len(source.classes)
    units: dict[tuple[str, str], list[Record]] = {}  # insertion order = the records' stable order
    for r in train:
        units.setdefault(("g", r.group) if r.group is not None else ("i", r.id), []).append(r)
    by_label: list[list[list[Record]]] = [[] for _ in range(k)]
    for members in units.values():
        by_label[int(np.bincount([r.label for r in members], minlength=k).argmax())].append(members)
    to_val: set[str] = set()
    n_units = 0
    for us in by_label:
        if len(us) < 2:
            continue
        target = max(1, int(round(sum(len(u) for u in us) * fraction)))
        total = 0
        for i in rng.permutation(len(us))[: len(us) - 1]:  # at least one unit stays in train
            size = len(us[i])
            if total and total + size - target > target - total:
                break  # this group would overshoot by more than stopping now falls short
            to_val.update(r.id for r in us[i])
            total += size
            n_units += 1
            if total >= target:
                break
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
    info: dict[str, Any] = {"from": "train", "fraction": fraction, "seed": seed, "n": len(to_val)}
    if "groups" in source.split_info:
        info["n_groups"] = n_units
    _check_carved_split(source, train, info)
    source.split_info["val"] = info


def _check_carved_split(source: SourceSet, train: list[Record], info: dict[str, Any]) -> None:
    """Every class keeps training images; one that cannot give any to val (a single image or patient) is
    counted and named in `info`, since its val metrics will be missing."""
    k = len(source.classes)
    before = np.bincount([r.label for r in train], minlength=k)
    after = np.bincount([r.label for r in source.records if r.split == "train"], minlength=k)
    in_val = np.bincount([r.label for r in source.records if r.split == "val"], minlength=k)
    lost = [source.classes[c] for c in range(k) if before[c] and not after[c]]
    if lost:
        raise XraylensError(
            f"class(es) {lost} have no training images left after the grouped val split (their "
            "images sit in groups mostly of other classes); lower val_fraction, change the "
            "split seed or check the grouping"
        )
    no_val = [source.classes[c] for c in range(k) if before[c] and not in_val[c]]
    if no_val:
        info["classes_without_val"] = no_val
        log.warning(
            "%d class(es) %s have a single image or group in train and none in the carved val split; "
            "their val metrics are missing",
            len(no_val),
            no_val,
        )


# ---------------------------------------------------------------------------------------------- groups


def _groups_from_names(source: SourceSet, rx: re.Pattern) -> None:
    """Set each record's group from its file name."""
    records = []
    for r in source.records:
        name = Path(r.path).name if r.path else r.id.rsplit("/", 1)[-1]
        records.append(replace(r, group=group_of(name, rx)))
    source.records = records
    _summarise_groups(source, {"pattern": rx.pattern}, f"group_pattern {rx.pattern!r}")


def _summarise_groups(source: SourceSet, by: dict[str, str], what: str) -> None:
    """Record how many groups there are and which images have none (each is then a group of its own)."""
    unmatched = [r.id for r in source.records if r.group is None]
    if len(unmatched) == len(source.records):
        raise XraylensError(
            f"{what} gives no group to any of the {len(unmatched)} images (e.g. "
            f"{unmatched[0]!r}); fix it or leave grouping unset"
        )
    source.split_info["groups"] = {
        **by,
        "n_groups": len({r.group for r in source.records} - {None}),
        "unmatched": len(unmatched),
        "examples_unmatched": unmatched[:5],
    }
    if unmatched:
        log.warning(
            "%s gives no group to %d of %d images (e.g. %s); each of them is its own group",
            what,
            len(unmatched),
            len(source.records),
            unmatched[0],
        )


def report_leaked_groups(source: SourceSet) -> None:
    """Name the groups found in more than one split: a patient in train and in val/test makes the
    held-out figures optimistic. A carved val split never leaks; given splits may."""
    where: dict[str, set[str]] = {}
    for r in source.records:
        if r.group is not None:
            where.setdefault(r.group, set()).add(r.split)
    leaked = {g: _split_order(s) for g, s in where.items() if len(s) > 1}
    names = natural_sorted(leaked)
    source.split_info["leaked_groups"] = {"n": len(names), "groups": {g: leaked[g] for g in names[:MAX_NAMED]}}
    if names:
        log.warning(
            "%d group(s) appear in more than one split (e.g. %s in %s): held-out figures are optimistic; "
            "all counted in split_info['leaked_groups']",
            len(names),
            names[0],
            "/".join(leaked[names[0]]),
        )


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
    return SourceSet(
        root=str(p), classes=[UNLABELLED], records=records, kind="images", split_info={"ignored_files": ignored}
    )
