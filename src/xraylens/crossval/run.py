"""`xraylens crossval`: k-fold cross-validation of fusion modes, patient-grouped, resumable.

Folds. Every labelled image of `--data` (all its splits pooled) is assigned to one of k folds with
scikit-learn's `StratifiedGroupKFold` (shuffled, `--seed`): stratified by label, grouped by patient
(`data.group_pattern` / `data.group_column`, as training groups its val split; an image without a group
is its own patient). For fold K the held-out part is the test split; an inner validation split (used
only to pick the best epoch) is carved from the remaining part, again stratified and patient-grouped,
of about `data.val_fraction` of it. The assignment is written once to `OUT/folds.csv` (id, label,
group, fold) and `OUT/folds/fold-K.csv` (id, split), and every run of fold K reads the latter as its
`data.splits_file`, so all modes see exactly the same images.

Runs. One ordinary run directory per mode and fold, `OUT/<mode>/fold-K` (train, then `evaluate` on the
test split: `metrics-test.json`, `predictions-test.csv`), so `explain`, `evaluate` or `report` work on
any of them. `clinical-only` fits the scikit-learn baselines of `data.clinical` (logistic regression
and gradient boosting) on the fold's train + val images and scores the test images, in
`OUT/clinical-only/fold-K/metrics-test.json`. Mode `none` trains the image model without clinical
inputs even when a table is given.

Resume. A rerun with the same settings continues: a fold whose `metrics-test.json` exists is reused, a
run with `checkpoints/last.pt` resumes from it (the run lock refuses a second crossval on the same
run), any other is (re)started. Changed settings are refused (`OUT/crossval.json` records them).

Table. Per mode (and baseline model): mean ± sd over folds (sd with ddof 1) of accuracy, F1 (macro over
classes), F2 and ROC AUC, as `evaluate` computes them: F2 and AUC of the positive class when there are
two classes (with `data.merge_classes`, the merged class; else the second class), else F2 weighted
by support and AUC one-vs-rest macro. `OUT/crossval.csv` (one row per mode) and
`OUT/crossval-folds.csv` (one row per mode and fold).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xraylens.config import RunConfig
from xraylens.data.records import SourceSet
from xraylens.data.relabel import parse_merge
from xraylens.errors import XraylensError
from xraylens.io import write_csv, write_json
from xraylens.runs import config_source

log = logging.getLogger("xraylens.crossval")

MODES = ("none", "early", "late", "clinical-only")
IMAGE_MODES = ("none", "early", "late")
METRICS = ("accuracy", "f1_macro", "f2", "auc")
SETTINGS_FILE = "crossval.json"


@dataclass
class CrossvalResult:
    out: Path
    table: list[dict[str, Any]]  # one row per mode (and baseline model)
    folds: list[dict[str, Any]]  # one row per mode and fold
    runs: dict[str, str] = field(default_factory=dict)  # "mode/fold-K" -> trained | resumed | reused


def parse_modes(text: str | list[str]) -> list[str]:
    """ "none,early" -> ["none", "early"]; an unknown or repeated mode is a one-line error."""
    parts = text if isinstance(text, list) else [m.strip().lower() for m in str(text).split(",") if m.strip()]
    if not parts:
        raise XraylensError(f"--modes is empty; use a comma list of {', '.join(MODES)}")
    unknown = [m for m in parts if m not in MODES]
    if unknown:
        raise XraylensError(f"unknown mode(s) {unknown} in --modes; use a comma list of {', '.join(MODES)}")
    if len(set(parts)) != len(parts):
        raise XraylensError(f"--modes {','.join(parts)} names a mode twice; name each once")
    return parts


def _groups(source: SourceSet) -> list[str]:
    return [r.group if r.group is not None else f"\0{r.id}" for r in source.records]


def make_folds(source: SourceSet, n_folds: int, seed: int, val_fraction: float) -> list[dict[str, str]]:
    """Per fold {record id: "train" | "val" | "test"}: test = the held-out fold, val carved from the rest
    (stratified, patient-grouped, about `val_fraction` of it)."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.array([r.label for r in source.records], dtype=np.int64)
    groups = np.array(_groups(source), dtype=object)
    n_groups = len(set(groups.tolist()))
    if n_folds < 2:
        raise XraylensError(f"--folds must be at least 2, got {n_folds}")
    if n_folds > n_groups:
        raise XraylensError(f"--folds {n_folds} is more than the {n_groups} patients in {source.root}; use fewer folds")
    if n_folds > int(np.bincount(labels).max()):
        raise XraylensError(f"--folds {n_folds} is more than the images of the largest class; use fewer folds")
    if not 0.0 < val_fraction < 1.0:
        raise XraylensError(f"data.val_fraction must be in (0, 1) for crossval's inner val split, got {val_fraction}")
    ids = [r.id for r in source.records]
    out = []
    with warnings.catch_warnings():
        # "the least populated class has only N members": small classes are allowed, just uneven
        warnings.simplefilter("ignore", UserWarning)
        outer = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for k, (rest, test) in enumerate(outer.split(np.zeros(len(labels)), labels, groups)):
            n_inner_groups = len(set(groups[rest].tolist()))
            # sklearn needs n_splits <= groups and <= the largest class's size
            n_inner = min(max(2, round(1.0 / val_fraction)), n_inner_groups, int(np.bincount(labels[rest]).max()))
            if n_inner < 2:
                raise XraylensError(f"fold {k + 1} keeps a single patient for training; use fewer folds")
            inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed + 1 + k)
            _, val = next(inner.split(np.zeros(len(rest)), labels[rest], groups[rest]))
            split = {ids[i]: "train" for i in rest}
            split.update({ids[rest[i]]: "val" for i in val})
            split.update({ids[i]: "test" for i in test})
            out.append(split)
    return out


def _positive(classes: list[str], merge: str | None) -> int | None:
    """The positive class of a two-class problem: the merged class, else evaluate's default (the last)."""
    if len(classes) != 2:
        return None
    merged = [c for c in parse_merge(merge) if c in classes]
    return classes.index(merged[0]) if merged else None


def _settings(cfg: RunConfig, n_folds: int, seed: int) -> dict[str, Any]:
    base = cfg.to_dict()
    base["classes"] = []
    base["data"]["splits_file"] = None
    base["clinical"] = {k: v for k, v in (base.get("clinical") or {}).items() if k != "mode"}
    return {"folds": n_folds, "seed": seed, "config": base}


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write OUT/crossval.json, or refuse a rerun whose settings differ from the recorded ones."""
    import json

    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old is not None and old != json.loads(json.dumps(settings)):
            diff = _diff(old, json.loads(json.dumps(settings)))
            raise XraylensError(
                f"{out} holds a crossval with other settings ({', '.join(diff[:4])}); "
                "rerun with the same settings to continue it, or choose another --out"
            )
    write_json(path, settings)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def crossval(
    cfg: RunConfig,
    out: str | Path,
    *,
    folds: int = 5,
    modes: str | list[str] = "none,early,late,clinical-only",
    seed: int = 0,
    progress: bool = False,
) -> CrossvalResult:
    """Cross-validate each mode of `modes` on `cfg.data.path` (see the module docstring); returns the
    table, also written to OUT/crossval.csv and OUT/crossval-folds.csv."""
    from xraylens.data import clinical
    from xraylens.train.loop import absolute_paths, check_config

    out = Path(out)
    mode_list = parse_modes(modes)
    cfg = copy.deepcopy(cfg)
    if not cfg.data.path:
        raise XraylensError("no data given: pass --data DIR (class folders or a CSV manifest)")
    if cfg.data.splits_file:
        raise XraylensError("crossval makes its own splits: leave data.splits_file unset")
    needs_table = [m for m in mode_list if m != "none"]
    if needs_table and not clinical.has_table(cfg.clinical):
        raise XraylensError(
            f"mode(s) {', '.join(needs_table)} need a clinical table: pass --clinical FILE "
            "(with --clinical-cols and --clinical-key) or --clinical-from-name, or use --modes none"
        )
    cfg.clinical.mode = "none"
    check_config(cfg)
    # absolute paths: the recorded settings (and every fold run) do not depend on how a path was typed
    absolute_paths(cfg)
    if cfg.clinical.file:
        cfg.clinical.file = str(Path(cfg.clinical.file).expanduser().resolve())
    clinical.check_settings(cfg.clinical)
    if out.exists() and not out.is_dir():
        raise XraylensError(f"--out {out} is a file; choose a folder for the crossval")

    source = config_source(cfg)
    if source.kind in ("npz", "images"):
        raise XraylensError("crossval needs class folders or a CSV manifest (file ids for the fold lists)")
    split_maps = make_folds(source, folds, seed, cfg.data.val_fraction)
    classes = list(source.classes)
    positive = _positive(classes, cfg.data.merge_classes)
    if needs_table:
        _check_leakage(cfg, source, split_maps, seed)  # a leaky column stops us before OUT is written
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, _settings(cfg, folds, seed))
    _write_folds(out, source, split_maps)

    fold_rows: list[dict[str, Any]] = []
    status: dict[str, str] = {}
    for mode in mode_list:
        for k in range(folds):
            run_dir = out / mode / f"fold-{k + 1}"
            fold_file = (out / "folds" / f"fold-{k + 1}.csv").resolve()
            if mode == "clinical-only":
                results, how = _clinical_fold(cfg, source, split_maps[k], classes, positive, run_dir, seed)
                for name, m in results.items():
                    fold_rows.append(_row(mode, name, k + 1, m))
            else:
                m, how = _image_fold(cfg, mode, fold_file, run_dir, positive, progress)
                fold_rows.append(_row(mode, cfg.model.name, k + 1, m))
            status[f"{mode}/fold-{k + 1}"] = how
            log.info("crossval %s fold %d/%d: %s", mode, k + 1, folds, how)

    table = summarise(fold_rows)
    write_csv(
        out / "crossval-folds.csv",
        ["mode", "model", "fold", "n_test", *METRICS],
        ([r["mode"], r["model"], r["fold"], r["n_test"], *[_fmt(r[m]) for m in METRICS]] for r in fold_rows),
    )
    write_csv(
        out / "crossval.csv",
        ["mode", "model", "folds", *[f"{m}_{s}" for m in METRICS for s in ("mean", "sd", "n")], *METRICS],
        (
            [
                r["mode"],
                r["model"],
                r["folds"],
                *[_fmt(r[f"{m}_{s}"]) for m in METRICS for s in ("mean", "sd", "n")],
                *[r[m] for m in METRICS],
            ]
            for r in table
        ),
    )
    return CrossvalResult(out, table, fold_rows, status)


def _write_folds(out: Path, source: SourceSet, split_maps: list[dict[str, str]]) -> None:
    groups = _groups(source)
    fold_of = {}
    for k, split in enumerate(split_maps):
        fold_of.update({i: k + 1 for i, s in split.items() if s == "test"})
        write_csv(out / "folds" / f"fold-{k + 1}.csv", ["id", "split"], sorted(split.items()))
    write_csv(
        out / "folds.csv",
        ["id", "label", "group", "fold"],
        (
            [r.id, source.classes[r.label], g if not g.startswith("\0") else "", fold_of[r.id]]
            for r, g in zip(source.records, groups, strict=True)
        ),
    )


def _image_fold(
    cfg: RunConfig, mode: str, fold_file: Path, run_dir: Path, positive: int | None, progress: bool
) -> tuple[dict[str, Any], str]:
    """Train (or resume, or reuse) one fold's run and evaluate it on the fold's test split."""
    import json

    from xraylens.evaluate.run import evaluate_run
    from xraylens.train.loop import train

    done = run_dir / "metrics-test.json"
    if done.is_file():
        try:
            return json.loads(done.read_text()), "reused"
        except (OSError, ValueError):
            pass  # a damaged file: evaluate again
    run_cfg = copy.deepcopy(cfg)
    run_cfg.data.splits_file = str(fold_file)
    run_cfg.clinical.mode = mode
    if mode == "none":  # the image model alone, even when a table is given
        run_cfg.clinical.file = run_cfg.clinical.from_name = run_cfg.clinical.key = None
        run_cfg.clinical.cols, run_cfg.clinical.allow_leaky = [], []
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    train(None if resume else run_cfg, run_dir, resume=resume, progress=progress)
    metrics = evaluate_run(run_dir, None, "test", device=cfg.train.device, positive=positive)
    return metrics, "resumed" if resume else "trained"


def _check_leakage(cfg: RunConfig, source: SourceSet, split_maps: list[dict[str, str]], seed: int) -> None:
    """The leakage guard on every fold's training images, as each fold run will apply it (cheap: one
    shallow tree per column), so a refused column fails the crossval before anything is written."""
    from xraylens.data.clinical import fit_clinical, split_items

    for split in split_maps:
        train = [r for r in source.records if split.get(r.id) == "train"]
        labels = np.array([r.label for r in train], dtype=np.int64)
        fit_clinical(cfg.clinical, split_items(source.root, [r.id for r in train]), labels, seed=seed)


def _clinical_fold(
    cfg: RunConfig,
    source: SourceSet,
    split: dict[str, str],
    classes: list[str],
    positive: int | None,
    run_dir: Path,
    seed: int,
) -> tuple[dict[str, dict[str, Any]], str]:
    """The clinical-only baselines of one fold: fitted on train + val, scored on test."""
    import json

    from xraylens.data.clinical import clinical_baseline, fit_clinical, rows_for, split_items

    done = run_dir / "metrics-test.json"
    if done.is_file():
        try:
            return json.loads(done.read_text())["models"], "reused"
        except (OSError, ValueError, KeyError):
            pass
    fit = [r for r in source.records if split.get(r.id) in ("train", "val")]
    test = [r for r in source.records if split.get(r.id) == "test"]
    y_fit = np.array([r.label for r in fit], dtype=np.int64)
    y_test = np.array([r.label for r in test], dtype=np.int64)
    fit_items = split_items(source.root, [r.id for r in fit])
    test_items = split_items(source.root, [r.id for r in test])
    pre, table = fit_clinical(cfg.clinical, fit_items, y_fit, seed=seed)
    x_fit = pre.transform(rows_for(table, fit_items), what="train")
    x_test = pre.transform(rows_for(table, test_items), what="test")
    results = clinical_baseline(x_fit, y_fit, x_test, y_test, classes, seed=seed, positive=positive)
    for m in results.values():
        m["n_images"] = int(len(y_test))
    write_json(
        done,
        {
            "models": results,
            "features": pre.feature_names,
            "n_fit": len(fit),
            "n_test": len(test),
            "test_ids": [r.id for r in test],
        },
    )
    return results, "trained"


def _row(mode: str, model: str, fold: int, m: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"mode": mode, "model": model, "fold": fold, "n_test": m.get("n_images", m.get("n"))}
    for k in METRICS:
        v = m.get(k)
        row[k] = float(v) if isinstance(v, int | float) and math.isfinite(v) else None
    return row


def summarise(fold_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd (ddof 1) over folds per (mode, model); a fold without a value (e.g. AUC with a class
    missing from its test split) is left out of that metric, and `<metric>_n` says how many counted."""
    keys: list[tuple[str, str]] = []
    for r in fold_rows:
        if (r["mode"], r["model"]) not in keys:
            keys.append((r["mode"], r["model"]))
    table = []
    for mode, model in keys:
        rows = [r for r in fold_rows if r["mode"] == mode and r["model"] == model]
        t: dict[str, Any] = {"mode": mode, "model": model, "folds": len(rows)}
        for m in METRICS:
            vals = np.array([r[m] for r in rows if r[m] is not None], dtype=np.float64)
            mean = float(vals.mean()) if len(vals) else None
            sd = float(vals.std(ddof=1)) if len(vals) > 1 else None
            t[f"{m}_mean"], t[f"{m}_sd"], t[f"{m}_n"] = mean, sd, len(vals)
            t[m] = "—" if mean is None else f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"
        table.append(t)
    return table


def _fmt(v: Any) -> Any:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v)


def format_table(table: list[dict[str, Any]]) -> str:
    """The printed table: mode, model, folds, then mean ± sd per metric."""
    head = ["mode", "model", "folds", "accuracy", "F1 (macro)", "F2", "AUC"]
    rows = [[r["mode"], r["model"], str(r["folds"]), *[r[m] for m in METRICS]] for r in table]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *rows]]
    return "\n".join(lines)
