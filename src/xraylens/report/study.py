"""The report page of a study folder: a `xraylens crossval` output or a `xraylens tune` output.

Detected by its files (a folder that is a run is never a study): crossval.csv / crossval-folds.csv /
crossval.json make a crossval folder, trials.csv / best.json a tune folder. The page has the same
layout as a run's (cards, sections, notes for what is missing or damaged, figures embedded):

* crossval: the settings (crossval.json), mean ± sd per mode and model (crossval.csv), every fold's
  figures (crossval-folds.csv) with a plot of them, and the fold runs (MODE/fold-K) with their test
  accuracy and the command for each one's own report.
* tune: the best trial (best.json), every trial (trials.csv, the best one marked) and Optuna's plots
  (plots/*.png).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from xraylens.report import figures
from xraylens.report.sections import (
    Card,
    Damaged,
    Figure,
    Heading,
    KeyValues,
    Note,
    Paragraph,
    Section,
    _num,
    fmt,
    guarded,
    read_csv,
    read_json,
    table,
)

CROSSVAL_FILES = ("crossval.csv", "crossval-folds.csv", "crossval.json")
TUNE_FILES = ("trials.csv", "best.json")
STUDY_FILES = CROSSVAL_FILES + TUNE_FILES
RUN_FILES = ("config.yaml", "history.csv", "metrics.json", "data_report.json")  # as build.RUN_FILES
METRICS = (("accuracy", "accuracy"), ("f1_macro", "F1 (macro)"), ("f2", "F2"), ("auc", "AUC"))
FOOTERS = {
    "crossval": "from the files of the crossval folder (crossval.csv, crossval-folds.csv, crossval.json)",
    "tune": "from the files of the tune folder (best.json, trials.csv, plots/)",
}


def study_kind(path: Path) -> str | None:
    """ "crossval", "tune" or None (not a folder, a run folder, or neither)."""
    if not path.is_dir() or any((path / f).is_file() for f in RUN_FILES):
        return None
    if any((path / f).is_file() for f in CROSSVAL_FILES):
        return "crossval"
    if any((path / f).is_file() for f in TUNE_FILES):
        return "tune"
    return None


class _Study:
    """What the crossval and tune sections share: the folder and the shell form of its path."""

    def __init__(self, folder: Path, shown: str):
        self.run_dir = folder
        self.shown = shlex.quote(shown)

    def path(self, name: str) -> Path:
        return self.run_dir / name


def study_sections(folder: Path, kind: str, shown: str) -> tuple[list[Card], list[Section]]:
    st = _Study(folder, shown)
    if kind == "crossval":
        secs = [
            guarded("crossval-settings", "Cross-validation settings", _cv_settings, st),
            guarded("crossval", "Mean ± sd over folds", _cv_summary, st),
            guarded("crossval-folds", "Per fold", _cv_folds, st),
            guarded("crossval-runs", "Fold runs", _cv_runs, st),
        ]
    else:
        secs = [
            guarded("tune-best", "Best trial", _tune_best, st),
            guarded("tune-trials", "Trials", _tune_trials, st),
            guarded("tune-plots", "Plots", _tune_plots, st),
        ]
    cards = [Card(*c) for s in secs for c in s.facts.get("cards", [])]
    return cards, secs


# --------------------------------------------------------------------------------------- crossval


def _cv_settings(st: _Study) -> Section:
    sec = Section("crossval-settings", "Cross-validation settings")
    if not st.path("crossval.json").is_file():
        return sec.missing("no crossval.json: the crossval has not started its folds", kind="info")
    s = read_json(st.path("crossval.json"))
    cfg = s.get("config") or {}
    data, model, train, clin = (cfg.get(k) or {} for k in ("data", "model", "train", "clinical"))
    items = [
        ("folds", fmt(s.get("folds"))),
        ("fold seed", fmt(s.get("seed"))),
        ("data", fmt(data.get("path"))),
        ("patient groups", fmt(data.get("group_pattern") or data.get("group_column") or "none (one image each)")),
        ("merged classes", fmt(data.get("merge_classes"))),
        ("model", f"{fmt(model.get('name'))} at {fmt(data.get('image_size'))} px"),
        ("training", f"{fmt(train.get('epochs'))} epochs, batch {fmt(train.get('batch_size'))}, loss "
                     f"{fmt(train.get('loss'))}, best epoch by {fmt(train.get('select'))}"),
    ]  # fmt: skip
    if clin.get("file") or clin.get("from_name"):
        items.append(("clinical table", fmt(clin.get("file") or clin.get("from_name"))))
        items.append(("clinical columns", fmt(clin.get("cols"))))
        if clin.get("allow_leaky"):
            items.append(("allowed leaky columns", fmt(clin.get("allow_leaky"))))
    sec.blocks.append(KeyValues(items))
    sec.facts["cards"] = [("folds", fmt(s.get("folds")), f"seed {fmt(s.get('seed'))}")]
    return sec


def _pm(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"


def _cv_summary(st: _Study) -> Section:
    sec = Section("crossval", "Mean ± sd over folds")
    if not st.path("crossval.csv").is_file():
        return sec.missing("no crossval.csv: the crossval has not finished; run the same command again")
    header, rows = read_csv(st.path("crossval.csv"), ["mode", "model", "folds"])
    col = {h: i for i, h in enumerate(header)}

    def val(r: list[str], name: str) -> float | None:
        return _num(r[col[name]]) if name in col and col[name] < len(r) else None

    out, best = [], {}
    for r in rows:
        mode, model, folds = r[0], r[1], r[2]
        cells: list[Any] = [mode, model, _num(folds) and int(float(folds))]
        for key, _ in METRICS:
            mean, sd, n = val(r, f"{key}_mean"), val(r, f"{key}_sd"), val(r, f"{key}_n")
            text = _pm(mean, sd)
            if n is not None and _num(folds) is not None and n < float(folds):
                text += f" (of {int(n)})"  # folds where the metric is undefined are left out of its mean
            cells.append(text)
            if mean is not None and (key not in best or mean > best[key][0]):
                best[key] = (mean, f"{mode} ({model})")
        out.append(cells)
    sec.blocks.append(
        table(
            ["mode", "model", "folds", *[n for _, n in METRICS]],
            out,
            caption="mean ± sd over the folds (sd with ddof 1); (of n): folds where the metric is defined",
        )
    )
    sec.facts["cards"] = [
        (f"best {name}", f"{best[k][0]:.3f}", best[k][1])
        for k, name in METRICS
        if k in best and k in ("auc", "f1_macro")
    ]
    return sec


def _cv_folds(st: _Study) -> Section:
    sec = Section("crossval-folds", "Per fold")
    if not st.path("crossval-folds.csv").is_file():
        return sec.missing("no crossval-folds.csv: the crossval has not finished; run the same command again")
    header, rows = read_csv(st.path("crossval-folds.csv"), ["mode", "model", "fold", "n_test"])
    col = {h: i for i, h in enumerate(header)}
    keys = [(k, n) for k, n in METRICS if k in col]
    data = [
        [r[col["mode"]], r[col["model"]], _int(r[col["fold"]]), _int(r[col["n_test"]]),
         *[_num(r[col[k]]) if col[k] < len(r) else None for k, _ in keys]]
        for r in rows
    ]  # fmt: skip
    sec.blocks.append(table(["mode", "model", "fold", "test images", *[n for _, n in keys]], data))
    series: dict[str, dict[str, list[float]]] = {}
    for r in data:
        label = f"{r[0]}" if r[0] != "clinical-only" else f"clinical {r[1]}"
        for (k, _), v in zip(keys, r[4:], strict=True):
            series.setdefault(label, {}).setdefault(k, []).append(v if v is not None else math.nan)
    if series and keys:
        sec.blocks.append(
            Figure(
                figures.fold_scores(series, keys),
                "per-fold metrics per mode",
                "Each dot a fold's test figure; the bar: the mean over the folds with a value.",
                wide=True,
            )
        )
    return sec


def _int(v: str) -> int | None:
    f = _num(v)
    return int(f) if f is not None else None


def _cv_runs(st: _Study) -> Section:
    sec = Section("crossval-runs", "Fold runs")
    found = sorted(p for p in st.run_dir.glob("*/fold-*") if p.is_dir())
    if not found:
        return sec.missing("no MODE/fold-K folders: the crossval has not trained a fold yet")
    rows = []
    for p in sorted(found, key=lambda p: (p.parent.name, _int(p.name.removeprefix("fold-")) or 0)):
        rel = f"{p.parent.name}/{p.name}"
        is_run = any((p / f).is_file() for f in RUN_FILES)
        acc = "—"
        if (p / "metrics-test.json").is_file():
            try:
                m = read_json(p / "metrics-test.json")
            except Damaged as e:
                acc = str(e)
            else:
                models = m.get("models") if isinstance(m.get("models"), dict) else {"": m}
                acc = ", ".join(
                    f"{k + ' ' if k else ''}{fmt(_num((v or {}).get('accuracy')))}" for k, v in models.items()
                )
        what = "run" if is_run else ("baseline metrics" if (p / "metrics-test.json").is_file() else "unfinished")
        report = "report.html" if (p / "report.html").is_file() else ""
        rows.append([rel, what, acc, report])
    sec.blocks.append(
        Paragraph(
            "Every image mode's fold is an ordinary run folder (explain, localize, sanity, audit and report "
            f"take it): e.g. xraylens report {shlex.quote(str(st.run_dir / 'MODE' / 'fold-1'))}. The clinical-only "
            "folds hold the baselines' metrics only."
        )
    )
    sec.blocks.append(
        table(["folder", "kind", "test accuracy", "has a report"], rows, caption=f"under {st.run_dir.resolve()}")
    )
    return sec


# ------------------------------------------------------------------------------------------ tune


def _tune_best(st: _Study) -> Section:
    sec = Section("tune-best", "Best trial")
    if not st.path("best.json").is_file():
        return sec.missing("no best.json: the study has not finished a trial")
    b = read_json(st.path("best.json"))
    counts = b.get("counts") or {}
    items = [
        ("study", fmt(b.get("study"))),
        ("storage", fmt(b.get("storage"))),
        ("maximises", fmt(b.get("select"))),
        ("trials", ", ".join(f"{k} {fmt(v)}" for k, v in counts.items()) if isinstance(counts, dict) else fmt(counts)),
    ]
    best = b.get("best")
    if isinstance(best, dict):
        items += [
            ("best trial", fmt(best.get("number"))),
            ("its score", fmt(_num(best.get("value")), 4)),
            ("best epoch", fmt(best.get("best_epoch"))),
            ("run", fmt(best.get("trial_dir"))),
        ]
        sec.facts["cards"] = [
            ("best trial", fmt(best.get("number")), f"{fmt(b.get('select'))} {fmt(_num(best.get('value')), 4)}")
        ]
    else:
        sec.notes.append(Note("no complete trial yet: run the same tune command again", kind="info"))
    if isinstance(counts, dict) and counts:
        sec.facts.setdefault("cards", []).append(
            ("trials finished", fmt(counts.get("finished")), ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        )
    sec.blocks.append(KeyValues(items))
    if isinstance(best, dict):
        params = best.get("params") or {}
        if params:
            sec.blocks.append(
                table(
                    ["parameter", "value"],
                    [[k, f"{v:.4g}" if isinstance(v, float) else v] for k, v in params.items()],
                    title="Its parameters",
                )
            )
        val = best.get("val") or {}
        if isinstance(val, dict) and val:
            sec.blocks.append(
                table(["metric", "value"], [[k, _num(v)] for k, v in val.items()], title="Its validation metrics")
            )
    if st.path("best-config.yaml").is_file():
        sec.notes.append(
            Note(
                "the best trial again:",
                f"xraylens train --config {shlex.quote(str(st.path('best-config.yaml')))} --out RUN",
                kind="info",
            )
        )
    for n in b.get("notes") or []:
        sec.notes.append(Note(str(n), kind="info"))
    return sec


def _tune_trials(st: _Study) -> Section:
    sec = Section("tune-trials", "Trials")
    if not st.path("trials.csv").is_file():
        return sec.missing("no trials.csv: the study has not recorded a trial")
    header, rows = read_csv(st.path("trials.csv"), ["number", "state", "value"])
    best = None
    if st.path("best.json").is_file():
        try:
            best = (read_json(st.path("best.json")).get("best") or {}).get("number")
        except Damaged:
            best = None
    lo = header.index("seconds") + 1 if "seconds" in header else len(header)
    params = (lo, header.index("trial_dir") if "trial_dir" in header else len(header))
    # columns blank in every row (host on one machine, error when none failed) would be noise
    keep = [
        i for i, h in enumerate(header) if h in ("number", "state", "value") or any(i < len(r) and r[i] for r in rows)
    ]
    out = []
    for r in rows:
        cells: list[Any] = []
        for i in keep:
            v = r[i] if i < len(r) else ""
            if header[i] == "trial_dir" and v:
                p = Path(v)
                v = str(p.relative_to(st.run_dir.resolve())) if p.is_relative_to(st.run_dir.resolve()) else v
            if params[0] <= i < params[1]:  # sampled values: as typed, not rounded to 3 decimals
                n = _num(v)
                cells.append(f"{n:.4g}" if n is not None else (v or None))
                continue
            n = _num(v) if header[i] not in ("trial_dir", "host", "error", "state") else None
            cells.append(
                int(n)
                if n is not None and header[i] in ("number", "best_epoch", "epochs_run")
                else (n if n is not None else (v or None))
            )
        out.append(cells)
    kinds = ["best" if str(r[0]) == str(best) else "" for r in rows]
    sec.blocks.append(
        table([header[i] for i in keep], out, row_kinds=kinds, caption="the best trial is highlighted; value: the "
              "score the study maximises (blank for pruned or failed trials)")
    )  # fmt: skip
    return sec


def _tune_plots(st: _Study) -> Section:
    sec = Section("tune-plots", "Plots")
    plots = sorted((st.path("plots")).glob("*.png")) if st.path("plots").is_dir() else []
    order = {"history": 0, "importances": 1, "slice": 2}
    plots.sort(key=lambda p: (order.get(p.stem, 9), p.stem))
    if not plots:
        return sec.missing("no plots/*.png: the study has not finished a trial", kind="info")
    for p in plots:
        try:
            uri = figures.embed_png(p)
        except Exception as e:
            sec.notes.append(Note(f"plots/{p.name} cannot be read as an image ({e})", kind="damaged"))
            continue
        sec.blocks.append(Heading(p.stem))
        sec.blocks.append(Figure(uri, f"Optuna {p.stem} plot", f"plots/{p.name}", wide=p.stem != "importances"))
    return sec
