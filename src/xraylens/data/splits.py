"""`splits.csv`: which image went to which split, with its label and group, so a split can be audited
(no patient in two splits) and reused for another run on the same data."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

from xraylens.data.records import SourceSet
from xraylens.data.sources import read_csv_text, report_leaked_groups
from xraylens.errors import XraylensError
from xraylens.io import write_csv

SPLITS_HEADER = ("image", "split", "label", "group")


@dataclass(frozen=True)
class SplitRow:
    split: str
    label: str  # class name
    group: str | None


def write_splits_csv(path: str | os.PathLike, source: SourceSet) -> Path:
    """Write one row per image (its record id), atomically; an image without a group has an empty cell."""
    path = Path(path)
    write_csv(path, SPLITS_HEADER, ([r.id, r.split, source.classes[r.label], r.group or ""] for r in source.records))
    return path


def read_splits_csv(path: str | os.PathLike) -> dict[str, SplitRow]:
    """{image id: SplitRow} from a file written by `write_splits_csv`."""
    path = Path(path)
    if not path.is_file():
        raise XraylensError(f"splits file {path} does not exist; pass the splits.csv of a run")
    reader = csv.reader(io.StringIO(read_csv_text(path, "splits file"), newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    if header[: len(SPLITS_HEADER)] != list(SPLITS_HEADER):
        raise XraylensError(
            f"splits file {path} has columns {header}; expected {', '.join(SPLITS_HEADER)} (as a run's splits.csv has)"
        )
    rows: dict[str, SplitRow] = {}
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        image, split, label, group = (row + [""] * 4)[:4]
        if image in rows:
            raise XraylensError(
                f"splits file {path} line {reader.line_num} repeats image {image!r}; list each image once"
            )
        rows[image] = SplitRow(split=split.strip(), label=label.strip(), group=group.strip() or None)
    return rows


def apply_splits(source: SourceSet, splits: str | os.PathLike | dict[str, SplitRow]) -> SourceSet:
    """`source` with the splits (and groups) of a splits.csv: the same images with the same labels,
    else a one-line error (the data changed since the file was written)."""
    rows = splits if isinstance(splits, dict) else read_splits_csv(splits)
    where = "the splits file" if isinstance(splits, dict) else str(splits)
    if source.kind == "npz":
        raise XraylensError("a MedMNIST .npz keeps its own splits; splits.csv applies to folders and manifests")
    missing = [r.id for r in source.records if r.id not in rows]
    extra = set(rows) - {r.id for r in source.records}
    if missing or extra:
        first = missing[0] if missing else sorted(extra)[0]
        raise XraylensError(
            f"{where} does not match the data: {len(missing)} image(s) not listed, {len(extra)} "
            f"listed but absent (e.g. {first!r}); write a new splits.csv for this data"
        )
    wrong = [r.id for r in source.records if rows[r.id].label != source.classes[r.label]]
    if wrong:
        r0 = rows[wrong[0]]
        raise XraylensError(
            f"{where} gives {len(wrong)} image(s) another label (e.g. {wrong[0]!r}: {r0.label!r}); "
            "write a new splits.csv for this data"
        )
    records = [replace(r, split=rows[r.id].split, group=rows[r.id].group) for r in source.records]
    info = {k: v for k, v in source.split_info.items() if k not in ("val", "leaked_groups")}
    info["splits_csv"] = "given" if isinstance(splits, dict) else str(Path(splits).resolve())
    out = replace(source, records=records, split_info=info)
    if any(r.group is not None for r in records):
        report_leaked_groups(out)  # an edited file may have put one patient in two splits
    return out
