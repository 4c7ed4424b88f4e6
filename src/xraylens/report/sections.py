"""The report's sections, each read from the files a run holds, with what is missing named.

A section builder takes a `RunFiles` and returns a `Section` of blocks (tables, figures, notes) that the
template lays out. A file that is absent gives a "missing" note with the command that writes it; a file
that is damaged or foreign gives a "damaged" note and the section is skipped, never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xraylens.report import figures

log = logging.getLogger("xraylens.report")

MAX_LISTED = 30  # skipped files, leaked groups, dropped shapes: the first ones, then a count
BASELINES = ("baseline:center", "baseline:random")  # as localize writes them


class Damaged(Exception):
    """A run file that exists but cannot be read as what its name says; the message is one line."""


# ------------------------------------------------------------------------------------------ blocks


@dataclass
class Note:
    text: str
    command: str | None = None  # shown as code after the text: what to run to get the missing part
    kind: str = "missing"  # missing | damaged | info | warn


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)  # per column: right-aligned
    row_kinds: list[str] = field(default_factory=list)  # per row: "" or "baseline"
    caption: str = ""
    title: str = ""  # above the table; titled tables sit side by side where the page is wide enough
    kind: str = "table"


@dataclass
class KeyValues:
    items: list[tuple[str, str]]
    caption: str = ""
    column: bool = False  # one of several side by side (the settings' data / model / train)
    kind: str = "kv"


@dataclass
class Figure:
    uri: str
    alt: str
    caption: str = ""
    wide: bool = False  # spans the whole row (training curves, confusion matrices, CAM grids)
    kind: str = "figure"


@dataclass
class Heading:
    text: str
    kind: str = "h3"


@dataclass
class Paragraph:
    text: str
    kind: str = "p"


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    present: bool = True  # False: only its notes are shown (the data is missing or damaged)
    facts: dict[str, Any] = field(default_factory=dict)  # numbers the first screen's cards quote

    def figures(self) -> int:
        return sum(isinstance(b, Figure) for b in self.blocks)

    def missing(self, text: str, command: str | None = None, kind: str = "missing") -> Section:
        """This section without its data: only the note (and the command that would make it) is shown."""
        self.present = False
        self.notes.append(Note(text, command, kind))
        return self


@dataclass
class Card:
    title: str
    value: str
    detail: str = ""


# ----------------------------------------------------------------------------------------- reading


@dataclass
class RunFiles:
    """The run folder and what every section shares (classes, the splits, the command prefix)."""

    run_dir: Path
    shown: str  # the run path as the user gave it, quoted for a shell, for the commands in notes
    config: dict[str, Any] | None = None
    classes: list[str] = field(default_factory=list)
    splits: dict[str, list[int]] = field(default_factory=dict)  # split -> images per class (splits.csv)
    split_groups: dict[str, int] = field(default_factory=dict)
    data_report: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None  # metrics.json
    evaluated: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> metrics-<split>.json
    damaged: list[Note] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def damaged_notes(self, *names: str) -> list[Note]:
        """The notes of shared files (read once, shown in the section that uses them)."""
        return [n for n in self.damaged if n.text.startswith(names)]

    def command(self, *args: str) -> str:
        return " ".join(["xraylens", args[0], self.shown, *args[1:]])

    @property
    def train_split(self) -> str:
        return str(((self.config or {}).get("data") or {}).get("train_split") or "train")

    @property
    def val_split(self) -> str:
        return str(((self.config or {}).get("data") or {}).get("val_split") or "val")

    def held_out(self) -> list[str]:
        """Splits besides the training one, test last (the one a reader looks for)."""
        names = [s for s in self.splits if s != self.train_split] or [self.val_split]
        return sorted(names, key=lambda s: (s == "test", s != self.val_split, s))

    def explain_split(self) -> str:
        return "test" if "test" in self.splits else self.held_out()[0]


def _read_text(path: Path) -> str:
    """A run file's text; unreadable or not UTF-8 is a damaged section, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise Damaged(f"{path.name} is not UTF-8 text") from None
    except OSError as e:
        raise Damaged(f"{path.name} cannot be read ({e.strerror})") from None


def read_json(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise Damaged(f"{path.name} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise Damaged(f"{path.name} holds a JSON {type(data).__name__}, not an object")
    return data


def read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    text = _read_text(path)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise Damaged(f"{path.name} is not a valid CSV ({e})") from None
    header = [h.strip() for h in rows[0]] if rows else []
    missing = [c for c in required if c not in header]
    if missing:
        raise Damaged(f"{path.name} lacks the column(s) {', '.join(missing)} (has {', '.join(header) or 'none'})")
    return header, [r for r in rows[1:] if any(c.strip() for c in r)]


def load_run_files(run_dir: Path, shown: str) -> RunFiles:
    """Everything several sections share; a damaged shared file is noted once and left out."""
    rf = RunFiles(run_dir, shlex.quote(shown))
    if rf.path("config.yaml").is_file():
        try:
            from xraylens.config import RunConfig

            rf.config = RunConfig.load(rf.path("config.yaml")).to_dict()
        except Exception as e:  # XraylensError for bad YAML or unknown keys; anything else is foreign
            rf.damaged.append(Note(f"config.yaml: {_line(e)}", kind="damaged"))
    if rf.path("data_report.json").is_file():
        try:
            rf.data_report = read_json(rf.path("data_report.json"))
        except Damaged as e:
            rf.damaged.append(Note(str(e), kind="damaged"))
    if rf.path("metrics.json").is_file():
        try:
            rf.metrics = read_json(rf.path("metrics.json"))
        except Damaged as e:
            rf.damaged.append(Note(str(e), kind="damaged"))
    rf.classes = [str(c) for c in (rf.config or {}).get("classes") or (rf.data_report or {}).get("classes") or []]
    if rf.path("splits.csv").is_file():
        try:
            _read_splits(rf)
        except Damaged as e:
            rf.damaged.append(Note(str(e), kind="damaged"))
    if not rf.splits and rf.data_report:
        for name, s in (rf.data_report.get("splits") or {}).items():
            rf.splits[str(name)] = [int(v) for v in s.get("per_class") or []]
    for path in sorted(run_dir.glob("metrics-*.json")):
        split = path.stem.removeprefix("metrics-")
        try:
            rf.evaluated[split] = read_json(path)
        except Damaged as e:
            rf.evaluated[split] = {"__damaged__": str(e)}
    if not rf.classes:
        for m in rf.evaluated.values():
            if isinstance(m.get("classes"), list):
                rf.classes = [str(c) for c in m["classes"]]
                break
    return rf


def _read_splits(rf: RunFiles) -> None:
    _, rows = read_csv(rf.path("splits.csv"), ["image", "split", "label"])
    classes = list(rf.classes)
    counts: dict[str, dict[str, int]] = {}
    groups: dict[str, set[str]] = {}
    for row in rows:
        image, split, lab = (row + ["", "", "", ""])[:3]
        if not split.strip():
            continue  # a short or foreign row names no split
        group = row[3] if len(row) > 3 else ""
        counts.setdefault(split, {}).setdefault(lab, 0)
        counts[split][lab] += 1
        if lab not in classes:
            classes.append(lab)
        groups.setdefault(split, set()).add(group or f"\0{image}")  # no group: the image is its own
    rf.classes = classes
    rf.splits = {s: [c.get(k, 0) for k in classes] for s, c in counts.items()}
    rf.split_groups = {s: len(g) for s, g in groups.items()}


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__


# ------------------------------------------------------------------------------------- formatting


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        return f"{v:.{digits}f}" if abs(v) >= 10**-digits or v == 0 else f"{v:.2g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v) if v else "—"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt(x, digits)}" for k, x in v.items()) if v else "—"
    return str(v)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def table(
    header: list[str],
    rows: list[list[Any]],
    *,
    caption: str = "",
    title: str = "",
    row_kinds: list[str] | None = None,
) -> Table:
    """Cells formatted; a column whose cells are all numbers (or blank) is right-aligned."""
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and i > 0 for i in range(len(header))]
    return Table(header, [[fmt(c) for c in r] for r in rows], numeric, row_kinds or [""] * len(rows), caption, title)


# ---------------------------------------------------------------------------------------- sections


def guarded(sid: str, title: str, build: Callable[[RunFiles], Section], rf: RunFiles) -> Section:
    """A section, or a note saying which file stopped it: one unreadable file never loses the page."""
    try:
        return build(rf)
    except Damaged as e:
        return Section(sid, title, notes=[Note(str(e), kind="damaged")], present=False)
    except Exception as e:  # a foreign file under a run file's name (wrong keys or types)
        log.debug("report section %s failed", sid, exc_info=True)
        return Section(
            sid,
            title,
            notes=[Note(f"could not read the files of this section ({type(e).__name__}: {_line(e)})", kind="damaged")],
            present=False,
        )


def settings_section(rf: RunFiles) -> Section:
    sec = Section("settings", "Settings", notes=rf.damaged_notes("config.yaml"))
    if rf.config is None:
        sec.present = False
        if not rf.path("config.yaml").is_file():
            sec.notes.append(Note("no config.yaml: this folder was not written by `xraylens train`"))
        return sec
    sec.blocks.append(Paragraph("The resolved settings of the run (config.yaml, defaults filled in)."))
    clin = rf.config.get("clinical") or {}
    parts = ("data", "model", "train") + (("clinical",) if clin.get("file") or clin.get("from_name") else ())
    for part in parts:
        values = rf.config.get(part) or {}
        sec.blocks.append(KeyValues([(k, _setting(v)) for k, v in values.items()], caption=part, column=True))
    return sec


def _setting(v: Any) -> str:
    """A config value as typed in a YAML file: 0.001, not 0.001000."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_setting(x) for x in v) if v else "—"
    return fmt(v)


def data_section(rf: RunFiles) -> Section:
    sec = Section("data", "Dataset", notes=rf.damaged_notes("data_report.json", "splits.csv"))
    rep = rf.data_report
    if rep is None and not rf.splits:
        sec.present = False
        if not sec.notes:
            sec.notes.append(Note("no data_report.json or splits.csv (train writes them)"))
        return sec
    rep = rep or {}
    info = rep.get("split_info") or {}
    items = [("source", fmt(rep.get("source"))), ("kind", fmt(rep.get("kind")))]
    if info.get("layout"):
        items.append(("layout", fmt(info["layout"])))
    if info.get("manifest"):
        items.append(("manifest", fmt(info["manifest"])))
    items.append(("classes", ", ".join(rf.classes) or "—"))
    val = info.get("val")
    if isinstance(val, dict):
        how = f"carved from {val.get('from', 'train')}: fraction {_setting(val.get('fraction'))}"
        how += f", seed {fmt(val.get('seed'))}, {fmt(val.get('n'))} images"
        if val.get("n_groups") is not None:
            how += f" in {fmt(val.get('n_groups'))} groups"
        items.append((f"{rf.val_split} split", how))
    elif rf.val_split in rf.splits:
        items.append((f"{rf.val_split} split", "given by the data (its own folder or manifest rows)"))
    if info.get("ignored_files"):
        items.append(("ignored files", f"{fmt(info['ignored_files'])} (not images, or outside the class folders)"))
    sec.blocks.append(KeyValues(items))

    # class counts per split: splits.csv has every split (test too); data_report has train and val
    skipped = _skipped(rf)
    if rf.splits:
        order = sorted(rf.splits, key=lambda s: (s != rf.train_split, s != rf.val_split, s))
        header = ["split", *rf.classes, "total"]
        grouped = "groups" in rep or any(rf.split_groups.get(s, 0) < sum(rf.splits[s]) for s in order)
        if grouped:
            header.append("groups")
        header.append("skipped")
        rows = []
        for s in order:
            counts = rf.splits[s] + [0] * (len(rf.classes) - len(rf.splits[s]))
            row: list[Any] = [s, *counts, sum(counts)]
            if grouped:
                row.append(rf.split_groups.get(s))
            row.append(len(skipped.get(s, [])) if s in skipped else None)
            rows.append(row)
        sec.blocks.append(Heading("Images per class and split"))
        sec.blocks.append(
            table(
                header,
                rows,
                caption="total: files listed; skipped: unreadable ones among them, left out (— = not decoded yet)",
            )
        )
        if not rf.path("splits.csv").is_file():
            sec.notes.append(Note("no splits.csv: counts from data_report.json (train and val only)", kind="info"))

    listed = [(s, i.get("id"), i.get("reason")) for s, lst in skipped.items() for i in lst if isinstance(i, dict)]
    if listed:
        sec.blocks.append(Heading(f"Skipped files ({len(listed)})"))
        sec.blocks.append(
            table(["split", "file", "why"], [list(r) for r in listed[:MAX_LISTED]], caption=_more(len(listed)))
        )

    groups = rep.get("groups") or info.get("groups")
    sec.blocks.append(Heading("Patient grouping"))
    if isinstance(groups, dict):
        by = groups.get("pattern") or groups.get("column")
        kind = "file-name pattern" if groups.get("pattern") else "manifest column"
        g_items = [
            ("grouped by", f"{kind} {by}"),
            ("groups", fmt(groups.get("n_groups"))),
            ("images without a group", fmt(groups.get("unmatched"))),
        ]
        if groups.get("examples_unmatched"):
            g_items.append(("e.g.", fmt(groups["examples_unmatched"])))
        sec.blocks.append(KeyValues(g_items))
        leaked = rep.get("leaked_groups") or info.get("leaked_groups") or {}
        n_leaked = int(leaked.get("n") or 0) if isinstance(leaked, dict) else 0
        if n_leaked:
            sec.notes.append(
                Note(
                    f"{n_leaked} patient group(s) appear in more than one split: held-out figures are optimistic",
                    kind="warn",
                )
            )
            named = leaked.get("groups") or {}
            sec.blocks.append(
                table(
                    ["group", "splits"],
                    [[g, "/".join(map(str, s)) if isinstance(s, list) else s] for g, s in list(named.items())],
                    caption=_more(n_leaked, len(named)),
                )
            )
        else:
            sec.blocks.append(Paragraph("No patient group appears in more than one split."))
    else:
        sec.blocks.append(
            Paragraph(
                "Images were split one by one (no patient grouping). Where a patient has several images, "
                "pass --group-pattern or --group-column to keep them in one split."
            )
        )
    if isinstance(val, dict) and val.get("classes_without_val"):
        sec.notes.append(
            Note(f"class(es) with no {rf.val_split} images: {fmt(val['classes_without_val'])}", kind="warn")
        )
    return sec


def _skipped(rf: RunFiles) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for name, s in ((rf.data_report or {}).get("splits") or {}).items():
        out[str(name)] = list(s.get("skipped") or [])
    for split, m in rf.evaluated.items():
        if "__damaged__" not in m and split not in out:
            out[split] = list(m.get("skipped") or [])
    return out


def _more(total: int, shown: int = MAX_LISTED) -> str:
    return f"the first {shown} of {total}" if total > shown else ""


HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "score", "lr", "seconds")


def training_section(rf: RunFiles) -> Section:
    sec = Section("training", "Training", notes=rf.damaged_notes("metrics.json"))
    if not rf.path("history.csv").is_file():
        return sec.missing("no history.csv: the run has not finished an epoch")
    header, rows = read_csv(rf.path("history.csv"), ["epoch", "train_loss"])
    hist = {
        h: np.array([_num(r[i] if i < len(r) else None) for r in rows], dtype=np.float64) for i, h in enumerate(header)
    }
    if not rows:
        return sec.missing("history.csv has no epochs yet: the run has not finished one")
    m = rf.metrics or {}
    train_cfg = (rf.config or {}).get("train") or {}
    best = m.get("best_epoch")
    best = int(best) if isinstance(best, (int, float)) and best else None
    select = str(m.get("select") or train_cfg.get("select") or "score")
    seconds = np.nansum(hist.get("seconds", np.array([])))
    items = [
        ("epochs run", f"{len(rows)}" + (f" of {train_cfg['epochs']}" if train_cfg.get("epochs") else "")),
        ("best epoch", fmt(best)),
        ("selected by", select),
        ("best score", fmt(_num(m.get("best_score")), 4)),
        ("training time", _duration(seconds)),
    ]
    sec.blocks.append(KeyValues(items))
    sec.blocks.append(
        Figure(
            figures.training_curves(hist, best, select),
            "training curves: loss, selection score and learning rate per epoch",
            "Loss per epoch (left); the selection score and the learning rate (right). Dotted: the best epoch.",
            wide=True,
        )
    )
    val = m.get("val")
    if isinstance(val, dict) and val:
        keys = ("accuracy", "f1_weighted", "f1_macro", "auc", "qwk", "sensitivity", "specificity", "loss")
        sec.blocks.append(Heading(f"{rf.val_split} metrics of the best epoch"))
        sec.blocks.append(table(list(keys), [[_num(val.get(k)) for k in keys]]))
    elif rf.metrics is None and not sec.notes:
        sec.notes.append(Note("no metrics.json: the run has not finished an epoch"))
    return sec


def _duration(seconds: float) -> str:
    if not seconds or not math.isfinite(seconds):
        return "—"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


HEADLINE = (
    ("accuracy", "accuracy"),
    ("precision_weighted", "precision (weighted)"),
    ("recall_weighted", "recall (weighted)"),
    ("f1_weighted", "F1 (weighted)"),
    ("f1_macro", "F1 (macro)"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("qwk", "quadratic weighted kappa"),
    ("auc", "ROC AUC"),
    ("loss", "cross-entropy loss"),
)


def split_section(rf: RunFiles, split: str) -> Section:
    sec = Section(f"metrics-{split}", f"Metrics — {split}")
    m = rf.evaluated[split]
    if "__damaged__" in m:
        raise Damaged(f"{m['__damaged__']}; re-run `{rf.command('evaluate', '--split', split)}`")
    classes = [str(c) for c in m.get("classes") or rf.classes]
    binary = len(classes) == 2
    positive = m.get("positive")
    items = [("images", fmt(m.get("n_images", m.get("n"))))]
    if m.get("skipped"):
        items.append(("skipped (unreadable)", fmt(len(m["skipped"]))))
    if m.get("epoch") is not None:
        items.append(("checkpoint", f"epoch {fmt(m.get('epoch'))} ({Path(str(m.get('checkpoint', ''))).name or '—'})"))
    if m.get("data"):
        items.append(("data", fmt(m.get("data"))))
    if binary and positive:
        items.append(("positive class", str(positive)))
    sec.blocks.append(KeyValues(items))
    rows = []
    has_ci = any(isinstance(m.get(f"{k}_ci"), list) for k, _ in HEADLINE)  # evaluate's bootstrap intervals
    for key, name in HEADLINE:
        if key in m:
            extra = " (positive class)" if binary and key in ("sensitivity", "specificity") else ""
            extra = " (mean over classes)" if not binary and key in ("sensitivity", "specificity") else extra
            rows.append([name + extra, _num(m.get(key)), *([_ci_text(m.get(f"{key}_ci"))] if has_ci else [])])
    sec.blocks.append(table(["metric", "value", *(["95 % CI"] if has_ci else [])], rows, title="Metrics"))
    if m.get("auc_note"):
        sec.notes.append(Note(str(m["auc_note"]), kind="info"))
    per_class = m.get("per_class")
    if isinstance(per_class, dict) and per_class:
        cols = ("support", "precision", "recall", "f1", "specificity", "auc")
        sec.blocks.append(
            table(
                ["class", *cols],
                [[c, *[v.get(k) if isinstance(v, dict) else None for k in cols]] for c, v in per_class.items()],
                title="Per class",
            )
        )

    cm = m.get("confusion_matrix")
    pred_path = rf.path(f"predictions-{split}.csv")
    y = probs = None
    if pred_path.is_file():
        try:
            y, probs = read_predictions(pred_path, classes)
        except Damaged as e:
            sec.notes.append(Note(f"{e}; re-run", rf.command("evaluate", "--split", split), kind="damaged"))
    else:
        sec.notes.append(
            Note(
                f"no predictions-{split}.csv: no ROC, precision-recall or calibration plot; run",
                rf.command("evaluate", "--split", split),
            )
        )
    if cm is None and y is not None:
        cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(cm, (y, probs.argmax(1)), 1)
    if cm is not None:
        cm = np.asarray(cm, dtype=np.int64)
        if cm.shape != (len(classes), len(classes)):
            raise Damaged(f"metrics-{split}.json: confusion matrix {cm.shape} for {len(classes)} classes")
        sec.blocks.append(Heading("Confusion matrix"))
        sec.blocks.append(
            Figure(
                figures.confusion(cm, classes),
                f"confusion matrix of the {split} split, counts and row-normalised",
                "Rows: the true class; columns: the predicted class. Right: each row divided by its total.",
                wide=True,
            )
        )
    if y is not None and len(y):
        pos = classes.index(positive) if binary and positive in classes else (1 if binary else None)
        sec.blocks.append(Heading("ROC, precision-recall and calibration"))
        what = f"the positive class {classes[pos]}" if pos is not None else "one vs rest per class, and the macro mean"
        sec.blocks.append(Figure(figures.roc(y, probs, classes, pos), f"ROC curve, {split}", f"ROC: {what}."))
        sec.blocks.append(
            Figure(
                figures.precision_recall(y, probs, classes, pos),
                f"precision-recall curve, {split}",
                f"Precision-recall: {what}; AP = average precision.",
            )
        )
        uri, ece = figures.calibration(y, probs, classes, pos)
        target = f"P({classes[pos]})" if pos is not None else "the predicted class's probability"
        sec.blocks.append(
            Figure(
                uri,
                f"calibration plot, {split}",
                f"Calibration of {target} in 10 bins; ECE {ece:.3f} (0 = perfectly calibrated).",
            )
        )
    return sec


def read_predictions(path: Path, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """predictions-<split>.csv -> true class indices [N] and probabilities [N, K]; rows without a
    known true class are left out."""
    header, rows = read_csv(path, ["id", "true"])
    cols = [f"p_{c}" for c in classes]
    missing = [c for c in cols if c not in header]
    if missing:
        raise Damaged(f"{path.name} has no column {missing[0]} for class {missing[0][2:]} of this run")
    t, idx = header.index("true"), [header.index(c) for c in cols]
    index = {c: i for i, c in enumerate(classes)}
    y, p = [], []
    for n, row in enumerate(rows, start=2):
        if len(row) < len(header) or row[t] not in index:
            continue
        try:
            p.append([float(row[i]) for i in idx])
        except ValueError:
            raise Damaged(f"{path.name} line {n}: a probability is not a number") from None
        y.append(index[row[t]])
    probs = np.asarray(p, dtype=np.float64).reshape(-1, len(classes))
    if not np.isfinite(probs).all():
        raise Damaged(f"{path.name} holds probabilities that are not finite")
    return np.asarray(y, dtype=np.int64), probs


def cams_section(rf: RunFiles) -> Section:
    sec = Section("cams", "Class activation maps")
    cams = rf.path("cams")
    grids = sorted(cams.glob("grid_*.png")) if cams.is_dir() else []
    if not grids:
        return sec.missing(
            "no CAM grid in cams/: run", rf.command("explain", "--split", rf.explain_split(), "--limit", "36")
        )
    methods = [g.stem.removeprefix("grid_") for g in grids]
    items: list[tuple[str, str]] = []
    if (cams / "index.csv").is_file():
        header, rows = read_csv(cams / "index.csv", ["id", "pred"])
        order = [h.removeprefix("constant_") for h in header if h.startswith("constant_")]
        # the grids in the order explain was given its methods (file names are safe_name(method))
        rank = {_safe(m): i for i, m in enumerate(order)}
        grids.sort(key=lambda g: rank.get(g.stem.removeprefix("grid_"), len(rank)))
        methods = [next((m for m in order if _safe(m) == g.stem.removeprefix("grid_")), g.stem[5:]) for g in grids]
        items.append(("images explained", fmt(len(rows))))
        t, p = header.index("true") if "true" in header else None, header.index("pred")
        if t is not None and rows and all(len(r) > t and r[t] for r in rows):
            right = sum(r[t] == r[p] for r in rows if len(r) > p)
            items.append(("predicted right", f"{right} of {len(rows)}"))
        elif rows:
            items.append(("labels", "none (a folder of unlabelled images)"))
        if "target" in header and rows:
            items.append(("maps of", _target_kind(header, rows)))
        for m in order:
            c = header.index(f"constant_{m}")
            n = sum(len(r) > c and r[c].strip() in ("1", "True", "true") for r in rows)
            if n:
                sec.notes.append(Note(f"{m}: {n} constant map(s), shown blank (no peak)", kind="info"))
    items.append(("methods", ", ".join(methods)))
    sec.blocks.append(KeyValues(items))
    sec.blocks.append(
        Paragraph(
            "Each tile: the image with its map over it, titled with the true class, the prediction and its "
            "probability; green when right, red when wrong, 'Good' when right with p ≥ 0.85."
        )
    )
    for g, m in zip(grids, methods, strict=True):
        try:
            uri = figures.embed_png(g)
        except Exception as e:  # a truncated or foreign PNG: say which, keep the others
            sec.notes.append(Note(f"cams/{g.name} cannot be read as an image ({_line(e)})", kind="damaged"))
            continue
        sec.blocks.append(Heading(m))
        sec.blocks.append(Figure(uri, f"CAM grid, {m}", f"cams/{g.name}", wide=True))
    return sec


def _safe(name: str) -> str:
    """explain.run.safe_name, the grid file-name rule (importing it would load torch for a regex)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "x"


def _target_kind(header: list[str], rows: list[list[str]]) -> str:
    t, p, tr = header.index("target"), header.index("pred"), header.index("true") if "true" in header else None
    if all(len(r) > max(t, p) and r[t] == r[p] for r in rows):
        return "the predicted class"
    if tr is not None and all(len(r) > max(t, tr) and r[t] == r[tr] for r in rows):
        return "the true class"
    targets = {r[t] for r in rows if len(r) > t}
    return f"class {next(iter(targets))}" if len(targets) == 1 else "per image"


LOC_COLUMNS = (
    ("hit_all", "all boxes hit"),
    ("distance", "distance (px)"),
    ("energy", "energy in box"),
    ("iou", "IoU"),
    ("mask_ratio", "mask ratio"),
    # where shortcuts live: share of the map in the image's border band and its corners
    ("border_energy", "border energy"),
    ("corner_energy", "corner energy"),
)


def localization_section(rf: RunFiles) -> Section:
    sec = Section("localization", "Localisation and faithfulness")
    path = rf.path("localization_summary.json")
    if not path.is_file():
        return sec.missing(
            "no localisation results (localization_summary.json): run",
            rf.command("localize", "--annotations", "FILE", "--format", "FORMAT", "--split", rf.explain_split()),
        )
    s = read_json(path)
    pg = s.get("pointing_game")
    if not isinstance(pg, dict) or not pg:
        raise Damaged("localization_summary.json has no pointing_game table")
    t = str(s.get("target") or "pred")
    items = [
        ("annotations", f"{fmt(s.get('annotations'))} ({fmt(s.get('format'))})"),
        ("split", fmt(s.get("split"))),
        ("maps of", {"true": "the true class", "pred": "the predicted class"}.get(t, f"class {t}")),
        ("tolerance", f"{fmt(s.get('tolerance'), 1)} px (original image)"),
        ("images listed / with shapes", f"{fmt(s.get('n_images'))} / {fmt(s.get('n_annotated'))}"),
    ]
    if s.get("annotation_size"):
        items.append(("annotations drawn at", " × ".join(fmt(v, 0) for v in s["annotation_size"])))
    sec.blocks.append(KeyValues(items))

    methods = [m for m in pg if m not in BASELINES] + [m for m in BASELINES if m in pg]
    overall = {m: _num((pg[m].get("all") or {}).get("accuracy")) for m in methods}
    sec.facts["pointing_game"] = overall
    sec.blocks.append(
        Figure(
            figures.pointing_game_bars(overall, BASELINES),
            "pointing game accuracy per method beside the baselines",
            "Pointing game: the share of annotated images whose map peaks inside an annotation (within the "
            "tolerance). Grey: a map peaking at the image centre, and uniform random maps.",
            wide=True,
        )
    )
    # classes without one annotated image (the normal ones, usually) would be columns of blanks
    cls = sorted({c for m in methods for c, v in pg[m].items() if c != "all" and isinstance(v, dict) and v.get("n")})
    header = ["method", "all", *cls]
    rows = [[m, *[_pg_cell(pg[m].get(c)) for c in ("all", *cls)]] for m in methods]
    sec.blocks.append(Heading("Pointing game per class"))
    sec.blocks.append(
        Table(
            header,
            rows,
            [False] + [True] * (len(header) - 1),
            ["baseline" if m in BASELINES else "" for m in methods],
            "accuracy (images)",
        )
    )
    means = s.get("means") or {}
    if isinstance(means, dict) and means:
        cols = [(k, n) for k, n in LOC_COLUMNS if any(_num((means.get(m) or {}).get(k)) is not None for m in methods)]
        sec.blocks.append(
            table(
                ["method", "pointing game", *[n for _, n in cols]],
                [[m, overall.get(m), *[_num((means.get(m) or {}).get(k)) for k, _ in cols]] for m in methods],
                row_kinds=["baseline" if m in BASELINES else "" for m in methods],
                caption="means over the annotated images; distance: from the peak to the nearest annotation",
                title="Localisation",
            )
        )
        faith = [m for m in methods if _num((means.get(m) or {}).get("deletion_auc")) is not None]
        if faith:
            sec.blocks.append(
                table(
                    ["method", "deletion AUC (lower is better)", "insertion AUC (higher is better)"],
                    [[m, _num(means[m].get("deletion_auc")), _num(means[m].get("insertion_auc"))] for m in faith],
                    caption="the target's probability as the most (deletion) or least salient pixels go first",
                    title="Faithfulness",
                )
            )
        else:
            sec.notes.append(
                Note(
                    "no faithfulness (deletion/insertion AUC): the same localisation with --faithfulness is",
                    _localize_again(rf, s, [m for m in methods if m not in BASELINES]),
                )
            )
            sec.blocks.append(Heading("Faithfulness"))
            sec.blocks.append(Paragraph("Not measured in this run."))
    sec.blocks.extend(chexlocalize_blocks(s, methods))
    dropped = [d for d in s.get("dropped_shapes") or [] if isinstance(d, dict)]
    if dropped:
        sec.blocks.append(Heading(f"Shapes the model cannot see ({sum(int(d.get('count') or 0) for d in dropped)})"))
        sec.blocks.append(
            table(
                ["image", "shapes", "why"],
                [[d.get("image"), d.get("count"), d.get("reason")] for d in dropped[:MAX_LISTED]],
                caption=_more(len(dropped)),
            )
        )
    skipped = [d for d in s.get("skipped_annotation_rows") or [] if isinstance(d, dict)]
    if skipped:
        sec.blocks.append(Heading(f"Annotation rows skipped ({len(skipped)})"))
        sec.blocks.append(
            table(
                ["row", "why"],
                [[d.get("row"), d.get("reason")] for d in skipped[:MAX_LISTED]],
                caption=_more(len(skipped)),
            )
        )
    return sec


def _localize_again(rf: RunFiles, s: dict[str, Any], methods: list[str]) -> str:
    """The localize command that wrote this summary, plus --faithfulness (the summary does not record a
    --data folder: a placeholder stands for it)."""
    q = shlex.quote
    args = ["localize"]
    if s.get("split") == "all":  # a plain image folder, not one of the run's splits
        args += ["--data", "IMAGES"]
    args += ["--annotations", q(str(s.get("annotations") or "FILE")), "--format", q(str(s.get("format") or "FORMAT"))]
    if s.get("split") not in (None, "all"):
        args += ["--split", q(str(s["split"]))]
    args += ["--methods", q(",".join(methods)), "--target", q(str(s.get("target") or "pred"))]
    for key, default in (("tolerance", 15.0), ("percentile", 90.0), ("smooth", 0.0)):
        if _num(s.get(key)) is not None and _num(s.get(key)) != default:
            args += [f"--{key}", f"{_num(s[key]):g}"]
    if isinstance(s.get("annotation_size"), list) and len(s["annotation_size"]) == 2:
        args += ["--annotation-size", ",".join(f"{float(v):g}" for v in s["annotation_size"])]
    return rf.command(*args, "--faithfulness")


def _pg_cell(v: Any) -> str:
    if not isinstance(v, dict):
        return "—"
    acc = _num(v.get("accuracy"))
    ci = f" {_ci_text(v['ci'])}" if isinstance(v.get("ci"), list) else ""
    return f"{fmt(acc)}{ci} ({fmt(v.get('n'))})" if acc is not None else f"— ({fmt(v.get('n'))})"


def _ci_text(ci: Any) -> str:
    """A bootstrap interval [low, high] as text; "—" when absent or malformed."""
    if not isinstance(ci, list) or len(ci) != 2 or any(_num(c) is None for c in ci):
        return "—"
    return f"[{fmt(_num(ci[0]))}, {fmt(_num(ci[1]))}]"


def chexlocalize_blocks(s: dict[str, Any], methods: list[str]) -> list[Any]:
    """Hit rate and mIoU per method (CheXlocalize), and each method's percentage decrease from a second
    reader, from localization_summary.json's "chexlocalize" and "reader2" parts."""
    chx = s.get("chexlocalize")
    if not isinstance(chx, dict):
        return []
    hit, miou = chx.get("hit_rate") or {}, chx.get("miou") or {}
    if not hit and not miou:
        return []

    def cell(d: Any) -> str:
        d = (d or {}).get("all") if isinstance(d, dict) else None
        if not isinstance(d, dict) or _num(d.get("value")) is None:
            return "—"
        return f"{fmt(_num(d['value']))} {_ci_text(d.get('ci'))} ({fmt(d.get('n'))})"

    thr = str(chx.get("threshold") or "otsu")
    how = f"threshold {thr}" + (f" (tuned on {chx['tune_on']})" if chx.get("tune_on") else "")
    cutoff = _num(chx.get("prob_cutoff"))
    if cutoff:
        how += f", maps zeroed below probability {fmt(cutoff)}"
    how += f", IoU counted over {fmt(chx.get('iou_count'))} images"
    blocks: list[Any] = [
        table(
            ["method", "hit rate [95 % CI] (images)", "mIoU [95 % CI] (images)"],
            [[m, cell(hit.get(m)), cell(miou.get(m))] for m in methods],
            row_kinds=["baseline" if m in BASELINES else "" for m in methods],
            title="CheXlocalize",
            caption=f"hit rate: the map's peak inside an annotation (no tolerance); mIoU: {how}",
        )
    ]
    r2 = s.get("reader2")
    dec = (r2 or {}).get("percentage_decrease") if isinstance(r2, dict) else None
    if isinstance(dec, dict) and dec:

        def pct(d: Any) -> str:
            a = (d or {}).get("all") if isinstance(d, dict) else None
            if not isinstance(a, dict) or _num(a.get("value")) is None:
                return "—"
            pair = f"reader {fmt(_num(a.get('reader')))}, model {fmt(_num(a.get('model')))}"
            return f"{_num(a['value']):.1f} % {_ci_text(a.get('ci'))} ({pair})"

        blocks.append(
            table(
                ["method", "pointing game", "hit rate", "mIoU"],
                [[m, pct(v.get("pointing_game")), pct(v.get("hit_rate")), pct(v.get("miou"))] for m, v in dec.items()],
                title="Against a second reader",
                caption=f"percentage decrease from the second reader ({fmt(r2.get('annotations'))}): 100 (reader − "
                "model) / reader, with a paired bootstrap interval; lower is closer to the reader",
            )
        )
    return blocks
