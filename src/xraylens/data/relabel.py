"""Two record-level rewrites of a loaded `SourceSet`, applied by `runs.config_source` (the one place a
config becomes records), so training and every later command see the same classes and splits:

- `merge_classes`: "abnormal=osteopenia,osteoporosis" folds classes into one (several merges joined by
  ";"); the class list stays naturally sorted, like class folders.
- `apply_splits_file`: a CSV with columns id,split (as `crossval` writes per fold) reassigns every
  image's split; images it does not list are left out. Ids are the source's record ids.
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

from xraylens.data.records import SourceSet
from xraylens.data.sources import natural_sorted, normalise_split, read_csv_text, report_leaked_groups
from xraylens.errors import XraylensError


def parse_merge(spec: str | None) -> dict[str, list[str]]:
    """ "new=a,b;other=c,d" -> {"new": ["a", "b"], "other": ["c", "d"]}; a malformed spec is an error."""
    out: dict[str, list[str]] = {}
    if spec is None or not str(spec).strip():
        return out
    seen: set[str] = set()
    for part in str(spec).split(";"):
        if not part.strip():
            continue
        new, sep, olds = part.partition("=")
        members = [m.strip() for m in olds.split(",") if m.strip()]
        if not sep or not new.strip() or len(members) < 1:
            raise XraylensError(
                f"merge_classes {spec!r}: write NEW=OLD1,OLD2 (several joined by ';'), "
                "e.g. abnormal=osteopenia,osteoporosis"
            )
        twice = seen & set(members)
        if twice:
            raise XraylensError(f"merge_classes {spec!r} names class(es) {sorted(twice)} in two merges; name each once")
        seen |= set(members)
        out[new.strip()] = members
    return out


def merge_classes(source: SourceSet, spec: str | None) -> SourceSet:
    """`source` with the classes `spec` names merged (in place, returned); unknown classes are an error."""
    merges = parse_merge(spec)
    if not merges:
        return source
    unknown = [m for members in merges.values() for m in members if m not in source.classes]
    if unknown:
        raise XraylensError(
            f"merge_classes names class(es) {unknown} that {source.root} does not have "
            f"(classes: {', '.join(source.classes)})"
        )
    rename = {old: new for new, members in merges.items() for old in members}
    clash = [new for new in merges if new in source.classes and new not in rename]
    if clash:
        raise XraylensError(f"merge_classes: {clash} is already a class of {source.root}; pick another name")
    new_classes = natural_sorted({rename.get(c, c) for c in source.classes})
    if len(new_classes) < 2:
        raise XraylensError(f"merge_classes {spec!r} leaves a single class {new_classes}; at least 2 are needed")
    index = {c: i for i, c in enumerate(new_classes)}
    source.records = [
        replace(r, label=index[rename.get(source.classes[r.label], source.classes[r.label])]) for r in source.records
    ]
    source.split_info["merged_classes"] = {"from": list(source.classes), "merges": merges}
    source.classes = new_classes
    return source


def read_splits_file(path: str | Path) -> dict[str, str]:
    """{record id: split} from a CSV with columns id,split."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise XraylensError(f"splits_file {p} not found; give a CSV with columns id,split")
    rows = list(csv.reader(io.StringIO(read_csv_text(p, "splits_file"), newline="")))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "id" not in header or "split" not in header:
        raise XraylensError(f"splits_file {p} needs columns id and split, has {header}")
    i_id, i_split = header.index("id"), header.index("split")
    out: dict[str, str] = {}
    for row in rows[1:]:
        if len(row) <= max(i_id, i_split) or not row[i_id].strip():
            continue
        out[row[i_id].strip()] = normalise_split(row[i_split])
    return out


def apply_splits_file(source: SourceSet, path: str | Path | None) -> SourceSet:
    """`source` with each record's split taken from `path` (in place, returned); unlisted records go."""
    if not path:
        return source
    if source.kind == "npz":
        raise XraylensError("splits_file needs file-based data (folders or a CSV manifest), not a MedMNIST .npz")
    splits = read_splits_file(path)
    known = {r.id for r in source.records}
    missing = [i for i in splits if i not in known]
    if missing:
        raise XraylensError(
            f"splits_file {path} lists {len(missing)} image(s) that {source.root} does not hold "
            f"(e.g. {missing[0]!r}); was it written for this data?"
        )
    source.records = [replace(r, split=splits[r.id]) for r in source.records if r.id in splits]
    # the reassigned splits replace any carved val split: record where they came from instead
    source.split_info.pop("val", None)
    source.split_info["splits_file"] = str(Path(path).expanduser().resolve())
    if "groups" in source.split_info:
        report_leaked_groups(source)  # of the new splits: a patient in two of them is named
    return source
