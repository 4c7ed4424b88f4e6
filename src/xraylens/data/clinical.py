"""Clinical tables: typed patient variables joined to images, fitted on train, reused everywhere.

Where the values come from
    * a CSV (`clinical.file`) joined by `clinical.key`: a key value matches an image when it equals the
      image's path (relative to the CSV's folder, or absolute), its id in the source (path under the data
      root), its file name or its file stem. `patient_id` = `N4` therefore finds `normal/N4.png`, and
      an `image` column `images/normal/N4.png` beside the CSV finds the same file.
    * or file names (`clinical.from_name`): a regex with named groups, searched in each file name,
      e.g. ``(?P<label>[a-z]+)_bmi(?P<bmi>[\\d.]+)_age(?P<age>\\d+)_(?P<sex>[MF])``. Without
      `clinical.cols`, every group except `label`/`class` becomes a column.

Typed columns (fitted on the train split only; `ClinicalPreprocessor`, saved as `clinical.json` and in
the checkpoints, so evaluate, predict, explain, localize and serve apply exactly the training transform)
    * numeric (every present value parses as a number; force with `name:num`): standardised with the
      train mean and sd (sd 0 -> 1).
    * categorical (anything else; force with `name:cat`): values are stripped and lower-cased, then
      one-hot over the categories seen in train. **An unseen category** (a value train never had) gets
      an all-zero one-hot block: the model sees "none of the known categories"; it is counted and logged,
      never an error.
    * **a missing value** (empty, NA, NaN, null, None, ?) is imputed with the train median (numeric) or
      most frequent category (categorical), and the column's `<name>_missing` indicator is 1. Every
      column has an indicator, so a value missing only at predict time is still flagged.
    * a column absent from the table at predict time is a one-line error naming it.

Leakage guard (`leakage_scores`): each column alone predicts the label on the train split with a shallow
decision tree, out-of-fold (stratified k-fold, k = min(5, smallest class)); a column whose balanced
accuracy reaches `clinical.leak_threshold` (default 0.9) is refused unless listed in
`clinical.allow_leaky`; so is a column named like a bone-density result (T-score, Z-score, BMD,
diagnosis; see `LABEL_SOURCE`). Knee set, 3 classes, all 239 images: T-score 0.99, Diagnosis 1.00
(stopped by the score), Z-score 0.60 (stopped by its name), Age 0.56, BMI 0.38 (pass).

Clinical-only baseline (`clinical_baseline`): logistic regression and gradient boosting from
scikit-learn on the same fitted preprocessing, scored with the metrics `evaluate` reports.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from xraylens.errors import XraylensError

log = logging.getLogger("xraylens.clinical")

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
LEAK_THRESHOLD = 0.9
LABEL_GROUPS = ("label", "class")
# Bone-density results define the osteoporosis label (WHO: T-score <= -2.5 is osteoporosis, <= -1
# osteopenia). The Z-score is the same measurement against age-matched peers: alone it predicts the
# 3-class label only about as well as age does (balanced accuracy 0.60 vs 0.56 on the knee set), yet
# with age it recovers the T-score. No single-column statistic separates it from age, so such columns
# are refused by name as well (overridable like any leaky column).
LABEL_SOURCE = re.compile(r"(?i)\b[tz][\s_-]*scores?\b|\bbmd\b|bone[\s_-]*mineral[\s_-]*density|diagnos")


# --------------------------------------------------------------------------------------------------
# reading: a table of raw string values per image


@dataclass
class ClinicalTable:
    """Raw values (strings, None = missing) by lookup key; `columns` are all the table offers."""

    columns: list[str]
    rows: list[dict[str, str | None]]
    index: dict[str, int]  # lookup key -> row number
    origin: str  # the file, or "file names"
    base: Path | None = None  # folder that relative paths in the key column are resolved against

    def row_for(self, image_id: str, path: str | None = None) -> dict[str, str | None] | None:
        """The row of one image (see the module docstring for the matching rules), or None."""
        for k in _image_keys(image_id, path):
            if k in self.index:
                return self.rows[self.index[k]]
        return None


def _norm_value(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return None if s.lower() in MISSING else s


def _path_key(p: str | Path) -> str:
    try:
        return "abs:" + str(Path(p).expanduser().resolve())
    except (OSError, RuntimeError):
        return "abs:" + str(p)


def _image_keys(image_id: str, path: str | None) -> list[str]:
    pid = Path(image_id)
    keys = [_path_key(path)] if path else []
    return [*keys, "id:" + pid.as_posix(), "name:" + pid.name, "stem:" + pid.stem]


def parse_cols(cols: Sequence[str]) -> list[tuple[str, str | None]]:
    """`age,sex:cat,bmi:num` -> [(name, forced kind or None)]."""
    out = []
    for c in cols:
        name, _, kind = str(c).strip().partition(":")
        name, kind = name.strip(), kind.strip().lower() or None
        if not name:
            continue
        if kind not in (None, "num", "cat"):
            raise XraylensError(f"clinical column {c!r}: the type after ':' must be num or cat")
        out.append((name, kind))
    return out


def read_table(file: str | Path, key: str) -> ClinicalTable:
    """A clinical CSV with its key column indexed (a duplicate key is an error: which row is meant?)."""
    from xraylens.data.sources import read_csv_text

    path = Path(file).expanduser()
    if not path.is_file():
        raise XraylensError(f"--clinical {file}: no such file; pass a CSV with one row per image or patient")
    reader = csv.reader(io.StringIO(read_csv_text(path, "clinical table"), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise XraylensError(f"--clinical {file} is empty; it needs a header row") from None
    except csv.Error as e:
        raise XraylensError(f"--clinical {file} is not a readable CSV: {e}") from None
    if not key:
        raise XraylensError("--clinical needs --clinical-key: the column that names the image or patient")
    if key not in header:
        raise XraylensError(f"--clinical-key {key!r} is not a column of {file}; columns: {', '.join(header)}")
    rows: list[dict[str, str | None]] = []
    index: dict[str, int] = {}
    ambiguous: set[str] = set()
    base = path.resolve().parent
    try:
        for raw in reader:
            if not any(c.strip() for c in raw):
                continue
            row = {h: _norm_value(raw[i]) if i < len(raw) else None for i, h in enumerate(header)}
            k = row[key]
            if k is None:
                continue
            n = len(rows)
            rows.append(row)
            exact = "key:" + k
            if exact in index:
                raise XraylensError(
                    f"--clinical {file}: key {k!r} appears twice in column {key!r}; keys must be unique"
                )
            index[exact] = n
            # aliases by which an image finds this row; an alias two rows share is dropped (ambiguous)
            kp = Path(k)
            aliases = {"id:" + kp.as_posix(), "name:" + kp.name, "stem:" + kp.stem, "stem:" + k}
            if "/" in k or "\\" in k or kp.suffix:
                aliases.add(_path_key(base / k))
            for a in aliases:
                if a in index and index[a] != n:
                    ambiguous.add(a)
                index.setdefault(a, n)
    except csv.Error as e:
        raise XraylensError(f"--clinical {file} is not a readable CSV: {e}") from None
    for a in ambiguous:
        index.pop(a, None)
    # every lookup form of an image maps to the exact key forms too
    for k, n in list(index.items()):
        if k.startswith("key:"):
            v = k[4:]
            for form in ("id:", "name:", "stem:"):
                index.setdefault(form + v, n)
    return ClinicalTable(header, rows, index, str(path), base)


def table_from_names(items: Sequence[tuple[str, str | None]], pattern: str) -> ClinicalTable:
    """Fields encoded in file names: `pattern`'s named groups, searched in each (id, path)'s file name."""
    rx = compile_name_pattern(pattern)
    columns = list(rx.groupindex)
    rows: list[dict[str, str | None]] = []
    index: dict[str, int] = {}
    for image_id, path in items:
        m = rx.search(Path(image_id).name)
        if m is None:
            continue
        index["id:" + Path(image_id).as_posix()] = len(rows)
        if path:
            index[_path_key(path)] = len(rows)
        rows.append({c: _norm_value(m.group(c)) for c in columns})
    return ClinicalTable(columns, rows, index, "file names")


def compile_name_pattern(pattern: str) -> re.Pattern:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise XraylensError(f"--clinical-from-name {pattern!r} is not a valid regex: {e}") from None
    if not rx.groupindex:
        raise XraylensError(
            f"--clinical-from-name {pattern!r} has no named groups; name each field, e.g. '_age(?P<age>\\d+)'"
        )
    return rx


def open_table(settings: Any, items: Sequence[tuple[str, str | None]]) -> ClinicalTable:
    """The table the clinical settings (`RunConfig.clinical`) describe, for these (id, path) images."""
    if settings.file and settings.from_name:
        raise XraylensError("give either --clinical FILE or --clinical-from-name PATTERN, not both")
    if settings.file:
        return read_table(settings.file, settings.key or "")
    if settings.from_name:
        return table_from_names(items, settings.from_name)
    raise XraylensError("no clinical table: pass --clinical FILE --clinical-key COL or --clinical-from-name PATTERN")


def has_table(settings: Any) -> bool:
    return bool(settings is not None and (settings.file or settings.from_name))


def selected_columns(settings: Any, table: ClinicalTable) -> list[tuple[str, str | None]]:
    """The configured columns (default: every named group of a file-name pattern but the label)."""
    cols = parse_cols(settings.cols or [])
    if not cols:
        if table.origin == "file names":
            cols = [(c, None) for c in table.columns if c.lower() not in LABEL_GROUPS]
        else:
            raise XraylensError("--clinical needs --clinical-cols, e.g. --clinical-cols Age,Gender,BMI")
    if not cols:
        raise XraylensError("--clinical-from-name has only a label group; add groups for the clinical fields")
    missing = [c for c, _ in cols if c not in table.columns]
    if missing:
        raise XraylensError(
            f"clinical column(s) {', '.join(missing)} not in {table.origin}; it has: {', '.join(table.columns)}"
        )
    if settings.key and any(c == settings.key for c, _ in cols):
        raise XraylensError(
            f"--clinical-key {settings.key!r} identifies the image; it cannot also be a clinical column"
        )
    return cols


def rows_for(
    table: ClinicalTable, items: Sequence[tuple[str, str | None]], *, strict: bool = True
) -> list[dict[str, str | None] | None]:
    """Each image's row; with `strict`, an image without one is an error naming how many and the first."""
    rows = [table.row_for(i, p) for i, p in items]
    absent = [items[n][0] for n, r in enumerate(rows) if r is None]
    if absent and strict:
        raise XraylensError(
            f"{len(absent)} of {len(items)} images have no row in {table.origin} (first: {absent[0]}); "
            "check --clinical-key (it matches a path, file name or file stem) or the --clinical-from-name pattern"
        )
    return rows


# --------------------------------------------------------------------------------------------------
# the fitted preprocessing


def _parse_float(v: str | None) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


@dataclass
class ColumnSpec:
    name: str
    kind: str  # "num" | "cat"
    mean: float = 0.0
    std: float = 1.0
    fill: float | str = 0.0  # the train median (num) or most frequent category (cat)
    categories: list[str] = field(default_factory=list)

    @property
    def features(self) -> list[str]:
        own = [self.name] if self.kind == "num" else [f"{self.name}={c}" for c in self.categories]
        return [*own, f"{self.name}_missing"]


@dataclass
class ClinicalPreprocessor:
    """Train-fitted transform of raw clinical values into a float32 feature vector (see module doc)."""

    columns: list[ColumnSpec]
    allowed_leaky: dict[str, float] = field(default_factory=dict)  # overridden columns and their score
    leak_scores: dict[str, float] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return [f for c in self.columns for f in c.features]

    @property
    def width(self) -> int:
        return len(self.feature_names)

    def groups(self) -> dict[str, list[int]]:
        """Column name -> the feature indices it owns (one-hot block and missing indicator)."""
        out, i = {}, 0
        for c in self.columns:
            n = len(c.features)
            out[c.name] = list(range(i, i + n))
            i += n
        return out

    @classmethod
    def fit(cls, rows: Sequence[dict[str, str | None]], cols: Sequence[tuple[str, str | None]]) -> ClinicalPreprocessor:
        specs = []
        for name, forced in cols:
            values = [r.get(name) for r in rows]
            present = [v for v in values if v is not None]
            nums = [_parse_float(v) for v in present]
            kind = forced or ("num" if present and all(x is not None for x in nums) else "cat")
            if kind == "num":
                bad = [v for v, x in zip(present, nums, strict=True) if x is None]
                if bad:
                    raise XraylensError(f"clinical column {name!r} is typed num but holds {bad[0]!r}; use {name}:cat")
                arr = np.asarray([x for x in nums if x is not None], dtype=np.float64)
                if arr.size == 0:
                    raise XraylensError(f"clinical column {name!r} has no values in the train split; drop it")
                sd = float(arr.std())
                specs.append(
                    ColumnSpec(name, "num", float(arr.mean()), sd if sd > 1e-12 else 1.0, float(np.median(arr)))
                )
            else:
                cats = Counter(_cat(v) for v in present)
                if not cats:
                    raise XraylensError(f"clinical column {name!r} has no values in the train split; drop it")
                mode = sorted(cats.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
                specs.append(ColumnSpec(name, "cat", fill=mode, categories=sorted(cats)))
        return cls(specs)

    def transform(self, rows: Sequence[dict[str, str | None]], *, what: str = "images") -> np.ndarray:
        """float32 [N, width]; a column absent from the rows is a one-line error."""
        out = np.zeros((len(rows), self.width), dtype=np.float32)
        if rows:
            have = set().union(*(r.keys() for r in rows))
            absent = [c.name for c in self.columns if c.name not in have]
            if absent:
                raise XraylensError(
                    f"clinical column(s) {', '.join(absent)} missing from the table for {what}; "
                    "the run was trained with them (see clinical.json)"
                )
        col = 0
        unseen: dict[str, int] = {}
        for c in self.columns:
            for n, r in enumerate(rows):
                v = _norm_value(r.get(c.name))  # "", NA, NaN... are missing whoever built the row
                if c.kind == "num":
                    x = _parse_float(v)
                    if v is not None and x is None:
                        raise XraylensError(f"clinical column {c.name!r} value {v!r} is not a number ({what})")
                    if x is None:
                        x = float(c.fill)
                        out[n, col + 1] = 1.0
                    out[n, col] = (x - c.mean) / c.std
                else:
                    cat = _cat(v) if v is not None else None
                    if cat is None:
                        cat = str(c.fill)
                        out[n, col + len(c.categories)] = 1.0
                    if cat in c.categories:
                        out[n, col + c.categories.index(cat)] = 1.0
                    else:  # unseen: all-zero one-hot block
                        unseen[c.name] = unseen.get(c.name, 0) + 1
            col += len(c.features)
        for name, n in unseen.items():
            log.warning("clinical column %r: %d value(s) unseen in train (encoded as no known category)", name, n)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": [
                {
                    "name": c.name,
                    "kind": c.kind,
                    "mean": c.mean,
                    "std": c.std,
                    "fill": c.fill,
                    "categories": c.categories,
                }
                for c in self.columns
            ],
            "features": self.feature_names,
            "allowed_leaky": dict(self.allowed_leaky),
            "leak_scores": dict(self.leak_scores),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClinicalPreprocessor:
        cols = [
            ColumnSpec(
                c["name"], c["kind"], float(c["mean"]), float(c["std"]), c["fill"], [str(x) for x in c["categories"]]
            )
            for c in d["columns"]
        ]
        return cls(cols, dict(d.get("allowed_leaky") or {}), dict(d.get("leak_scores") or {}))


def _cat(v: str) -> str:
    return " ".join(str(v).split()).lower()


# --------------------------------------------------------------------------------------------------
# leakage guard


def leakage_scores(
    rows: Sequence[dict[str, str | None]],
    labels: Sequence[int] | np.ndarray,
    cols: Sequence[tuple[str, str | None]],
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Per column: out-of-fold balanced accuracy of a depth-3 decision tree on that column alone.

    Chance is 1/K; a label in disguise scores near 1. k-fold stratified with k = min(5, smallest
    class count); with fewer than 2 images in some class the tree's training-set score is used (stricter).
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    y = np.asarray(labels, dtype=np.int64)
    if len(np.unique(y)) < 2:
        return {}
    k = min(5, int(np.bincount(y)[np.bincount(y) > 0].min()))
    out = {}
    for c in cols:
        x = ClinicalPreprocessor.fit(rows, [c]).transform(rows)
        tree = DecisionTreeClassifier(max_depth=3, random_state=seed)
        if k >= 2:
            pred = cross_val_predict(tree, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
        else:
            pred = tree.fit(x, y).predict(x)
        out[c[0]] = round(float(balanced_accuracy_score(y, pred)), 4)
    return out


def check_leakage(
    scores: dict[str, float], allow: Sequence[str], threshold: float = LEAK_THRESHOLD
) -> dict[str, float]:
    """Refuse leaky columns not in `allow` (one line naming them and their score); returns the allowed ones."""
    leaky = {c: s for c, s in scores.items() if s >= threshold or LABEL_SOURCE.search(c)}
    refused = {c: s for c, s in leaky.items() if c not in allow}
    if refused:
        named = ", ".join(
            f"{c!r} (balanced accuracy {s:.3f}" + (", a bone-density result" if s < threshold else "") + ")"
            for c, s in refused.items()
        )
        raise XraylensError(
            f"clinical column(s) {named} predict the label on train (threshold {threshold:g}; bone-density "
            "results define the label): a label in disguise; drop them, or pass --allow-leaky-column NAME"
        )
    return {c: s for c, s in leaky.items() if c in allow}


# --------------------------------------------------------------------------------------------------
# joining to cached splits (training, run loading)


def split_items(root: str | Path, ids: Sequence[str]) -> list[tuple[str, str | None]]:
    """(id, absolute path) of cached images: folder and manifest ids are paths under the source root."""
    base = Path(root)
    if base.is_file():
        base = base.parent
    return [(i, str(base / i) if ":" not in i else None) for i in ids]


def fit_clinical(
    settings: Any, train_items, train_labels, *, seed: int = 0
) -> tuple[ClinicalPreprocessor, ClinicalTable]:
    """Read the table, check leakage on the train split, fit the preprocessing (train rows only)."""
    table = open_table(settings, train_items)
    cols = selected_columns(settings, table)
    allow = list(settings.allow_leaky or [])
    unknown = [a for a in allow if a not in [c for c, _ in cols]]
    if unknown:
        raise XraylensError(f"--allow-leaky-column {', '.join(unknown)} is not among --clinical-cols")
    rows = rows_for(table, train_items)
    scores = leakage_scores(rows, train_labels, cols, seed=seed)
    allowed = check_leakage(scores, allow, settings.leak_threshold)
    for c, s in allowed.items():
        log.warning("clinical column %r predicts the label alone (%.3f) but is allowed by --allow-leaky-column", c, s)
    pre = ClinicalPreprocessor.fit(rows, cols)
    pre.allowed_leaky, pre.leak_scores = allowed, scores
    return pre, table


def attach_clinical(pre: ClinicalPreprocessor | None, table: ClinicalTable | None, root, cached, *, what: str = ""):
    """A copy of the cached split carrying `clinical` float32 [N, width] in cache order (or unchanged)."""
    if pre is None or table is None:
        return cached
    items = split_items(root, cached.ids)
    rows = rows_for(table, items)
    return replace(cached, clinical=pre.transform(rows, what=what or f"split {cached.split}"))


def table_for_run(settings: Any, root, ids: Sequence[str], file: str | Path | None = None) -> ClinicalTable:
    """The table a loaded run reads new images' values from: `file` (same key) or the run's own source."""
    if file is not None:
        return read_table(file, settings.key or "")
    return open_table(settings, split_items(root, ids))


# --------------------------------------------------------------------------------------------------
# clinical-only baseline


BASELINES = ("logreg", "gboost")


def clinical_baseline(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    classes: Sequence[str],
    *,
    models: Sequence[str] = BASELINES,
    seed: int = 0,
    positive: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Clinical-only models on already-preprocessed features; per model the metrics `evaluate` writes.

    Signature for callers (crossval): build the features with one `ClinicalPreprocessor` fitted on
    the training fold (`ClinicalPreprocessor.fit(rows_train, cols)`, then `.transform(rows)` for
    both), or use `baseline_for_split`. Returns {"logreg": metrics, "gboost": metrics}; each metrics
    dict is `xraylens.metrics.compute_metrics` (accuracy, f1_weighted, f1_macro, f05, f2, auc,
    sensitivity/specificity when binary, confusion_matrix...) plus "model".
    logreg: LogisticRegression(max_iter=2000, class_weight="balanced"); gboost:
    GradientBoostingClassifier(random_state=seed) (sklearn defaults otherwise)."""
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    from xraylens.metrics import compute_metrics

    y_train, y_eval = np.asarray(y_train, dtype=np.int64), np.asarray(y_eval, dtype=np.int64)
    k = len(classes)
    out = {}
    for name in models:
        if name == "logreg":
            clf = LogisticRegression(max_iter=2000, class_weight="balanced")
        elif name == "gboost":
            clf = GradientBoostingClassifier(random_state=seed)
        else:
            raise XraylensError(f"unknown clinical baseline {name!r}; use {', '.join(BASELINES)}")
        present = np.unique(y_train)
        if len(present) < 2:
            raise XraylensError("the clinical baseline needs at least 2 classes in its training split")
        clf.fit(x_train, y_train)
        probs = np.zeros((len(y_eval), k), dtype=np.float64)
        probs[:, clf.classes_] = clf.predict_proba(x_eval)  # classes absent from train keep probability 0
        m = compute_metrics(y_eval, probs, list(classes), positive=positive)
        m["model"] = name
        out[name] = m
    return out


def baseline_for_split(
    settings: Any,
    root: str | Path,
    train_ids: Sequence[str],
    train_labels: np.ndarray,
    eval_ids: Sequence[str],
    eval_labels: np.ndarray,
    classes: Sequence[str],
    *,
    models: Sequence[str] = BASELINES,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """`clinical_baseline` from clinical settings and image ids: the table is read, the leakage guard
    applied and the preprocessing fitted on the train ids exactly as training a fused run does."""
    train_items = split_items(root, train_ids)
    pre, table = fit_clinical(settings, train_items, train_labels, seed=seed)
    x_tr = pre.transform(rows_for(table, train_items), what="train")
    x_ev = pre.transform(rows_for(table, split_items(root, eval_ids)), what="eval")
    return clinical_baseline(x_tr, train_labels, x_ev, eval_labels, classes, models=models, seed=seed)


# --------------------------------------------------------------------------------------------------
# training hooks (train.loop calls these two)


def check_settings(settings: Any) -> None:
    """Clinical options that would otherwise fail only after decoding: checked first (cheap)."""
    mode = str(settings.mode).lower()
    if not has_table(settings):
        if mode != "none":
            raise XraylensError(f"--fusion {mode} needs a clinical table: --clinical FILE or --clinical-from-name")
        if settings.cols or settings.key or settings.allow_leaky:
            raise XraylensError("clinical columns given without a table: add --clinical FILE or --clinical-from-name")
        return
    if settings.file and settings.from_name:
        raise XraylensError("give either --clinical FILE or --clinical-from-name PATTERN, not both")
    if settings.from_name:
        rx = compile_name_pattern(settings.from_name)
        names = [c for c, _ in parse_cols(settings.cols or [])] or [g for g in rx.groupindex if g not in LABEL_GROUPS]
        absent = [c for c in names if c not in rx.groupindex]
        if absent:
            raise XraylensError(f"--clinical-cols {', '.join(absent)} are not named groups of --clinical-from-name")
    else:
        names = [c for c, _ in selected_columns(settings, read_table(settings.file, settings.key or ""))]
    unknown = [a for a in settings.allow_leaky or [] if a not in names]
    if unknown:
        raise XraylensError(f"--allow-leaky-column {', '.join(unknown)} is not among the clinical columns")


def prepare_training(settings: Any, root, train_c, val_c, saved: dict | None = None, *, seed: int = 0):
    """(preprocessing or None, train split, val split) with clinical features attached (not for
    mode none: the table is still checked for leakage and fitted, so clinical.json records it).

    A new run reads the table, applies the leakage guard and fits on train; a resumed run reuses the
    preprocessing saved in its checkpoint (`saved`), so its inputs never change mid-run."""
    if not has_table(settings):
        return None, train_c, val_c
    train_items = split_items(root, train_c.ids)
    if saved:
        pre = ClinicalPreprocessor.from_dict(saved)
    else:
        pre, _ = fit_clinical(settings, train_items, train_c.labels, seed=seed)
    if str(settings.mode).lower() == "none":  # guarded and fitted (clinical.json), but the model is image-only
        return pre, train_c, val_c
    table = open_table(settings, train_items + split_items(root, val_c.ids))
    return pre, attach_clinical(pre, table, root, train_c), attach_clinical(pre, table, root, val_c)
