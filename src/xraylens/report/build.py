"""`xraylens report`: one self-contained HTML page per run (figures embedded, no external reference).

The page is built from the files a run folder holds (config.yaml, data_report.json, splits.csv,
history.csv, metrics*.json, predictions-*.csv, cams/, localization_summary.json); the model is never
loaded. Each section appears where its files exist; what is missing is named with the command that
writes it, and a damaged file costs only its own section.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import TYPE_CHECKING

from xraylens.errors import XraylensError
from xraylens.io import write_text
from xraylens.report import sections as S
from xraylens.report import study as ST
from xraylens.report import trust as T

if TYPE_CHECKING:
    from xraylens.runs import RunLike

REPORT_NAME = "report.html"
# any one of these makes a folder a run (a report of a run still training shows what is there)
RUN_FILES = ("config.yaml", "history.csv", "metrics.json", "data_report.json")


def resolve_run_dir(run: RunLike) -> Path:
    """A run folder from a path, a checkpoint inside it, or a loaded `Run`; a one-line error otherwise."""
    path = Path(getattr(run, "run_dir", run)).expanduser()
    if path.is_file() and path.suffix == ".pt" and path.parent.name == "checkpoints":
        path = path.parent.parent
    if path.is_file():
        raise XraylensError(f"{path} is a file; pass the run directory (the --out of `xraylens train`)")
    if not path.is_dir():
        raise XraylensError(f"run directory not found: {path}")
    if not any((path / f).is_file() for f in RUN_FILES):
        raise XraylensError(
            f"{path} is not an xraylens run, crossval or tune folder (no {', '.join(RUN_FILES)}, "
            f"{', '.join(ST.STUDY_FILES)}); pass the --out of `xraylens train`, `crossval` or `tune`"
        )
    return path


def report_sections(run: RunLike) -> tuple[S.RunFiles, list[S.Section]]:
    """The run's files and every section, in page order (sections without data included, marked)."""
    run_dir = resolve_run_dir(run)
    rf = S.load_run_files(run_dir, str(getattr(run, "run_dir", run)))
    secs = [
        S.guarded("settings", "Settings", S.settings_section, rf),
        S.guarded("data", "Dataset", S.data_section, rf),
    ]
    if T.has_clinical(rf):  # fused runs only: an image-only run has no clinical inputs to miss
        secs.append(S.guarded("clinical", "Clinical inputs", T.clinical_section, rf))
    secs.append(S.guarded("training", "Training", S.training_section, rf))
    for split in rf.held_out():
        if split not in rf.evaluated:
            # a split the run has but nobody evaluated: say so where its metrics would be
            secs.append(
                S.Section(
                    f"metrics-{split}",
                    f"Metrics — {split}",
                    notes=[
                        S.Note(f"no {split}-split metrics: run", rf.command("evaluate", "--split", split)),
                    ],
                    present=False,
                )
            )
    for split in sorted(rf.evaluated, key=lambda s: (s == "test", s)):
        secs.append(S.guarded(f"metrics-{split}", f"Metrics — {split}", lambda r, s=split: S.split_section(r, s), rf))
    secs.append(S.guarded("cams", "Class activation maps", S.cams_section, rf))
    secs.append(S.guarded("localization", "Localisation and faithfulness", S.localization_section, rf))
    secs.append(S.guarded("sanity", "Sanity check: model randomisation", T.sanity_section, rf))
    secs.append(S.guarded("audit", "Shortcut audit", T.audit_section, rf))
    return rf, secs


def render_report(run: RunLike) -> str:
    """The report page as HTML text: a run's page, or the study page of a crossval or tune folder."""
    kind = ST.study_kind(Path(getattr(run, "run_dir", run)).expanduser())
    if kind is not None:
        folder = Path(getattr(run, "run_dir", run)).expanduser()
        cards, secs = ST.study_sections(folder, kind, str(getattr(run, "run_dir", run)))
        return _render(folder.resolve().name, str(folder.resolve()), cards, secs, ST.FOOTERS[kind])
    rf, secs = report_sections(run)
    return _render(
        rf.run_dir.resolve().name,
        str(rf.run_dir.resolve()),
        _cards(rf, secs),
        secs,
        "from the files of the run folder",
    )


def _render(title: str, path: str, cards: list[S.Card], secs: list[S.Section], source: str) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,  # run, class, file and group names are user data
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    missing = [n for s in secs for n in s.notes if n.kind in ("missing", "damaged")]
    return env.get_template("report.html").render(
        title=title,
        run_path=path,
        generated=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        version=_version(),
        cards=cards,
        problems=missing,
        sections=secs,
        source=source,
    )


def _version() -> str:
    # the package metadata: `import xraylens` would reach above this floor (docs/architecture.md)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xraylens")
    except PackageNotFoundError:
        return "(not installed)"


def build_report(run: RunLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report of `run` (a run folder or a loaded `Run`, or a crossval or tune output folder) to
    `out` (default RUN/report.html; a folder gets report.html inside it) and return its path."""
    folder = Path(getattr(run, "run_dir", run)).expanduser()
    run_dir = folder if ST.study_kind(folder) is not None else resolve_run_dir(run)
    target = Path(out).expanduser() if out is not None else run_dir / REPORT_NAME
    if target.is_dir():
        target = target / REPORT_NAME
    html = render_report(run)
    try:
        write_text(target, html)
    except OSError as e:
        raise XraylensError(f"cannot write {target} ({e.strerror or e}); choose another --out") from None
    return target


def _cards(rf: S.RunFiles, secs: list[S.Section]) -> list[S.Card]:
    """The first screen: what the run is and how it did, one card per fact."""
    cards = []
    cfg = rf.config or {}
    model, data, train = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("train") or {}
    if model:
        size = data.get("image_size")
        cards.append(S.Card("model", str(model.get("name", "—")), f"{size} px input" if size else ""))
    if rf.classes:
        counts = ", ".join(f"{s} {sum(c):,}" for s, c in rf.splits.items())
        cards.append(S.Card("classes", str(len(rf.classes)), ", ".join(rf.classes)))
        if counts:
            cards.append(S.Card("images", f"{sum(sum(c) for c in rf.splits.values()):,}", counts))
    m = rf.metrics or {}
    if m.get("best_epoch"):
        score = S._num(m.get("best_score"))
        detail = f"{m.get('select', train.get('select', 'score'))} {S.fmt(score)}" if score is not None else ""
        cards.append(
            S.Card("best epoch", f"{m['best_epoch']} of {m.get('epochs_run', train.get('epochs', '?'))}", detail)
        )
    for split in sorted(rf.evaluated, key=lambda s: (s != "test", s)):
        e = rf.evaluated[split]
        if "__damaged__" in e:
            continue
        acc, auc = S._num(e.get("accuracy")), S._num(e.get("auc"))
        parts = [f"AUC {S.fmt(auc)}" if auc is not None else "", f"F1 {S.fmt(S._num(e.get('f1_weighted')))}"]
        if e.get("qwk") is not None and len(rf.classes) > 2:
            parts.append(f"QWK {S.fmt(S._num(e.get('qwk')))}")
        parts.append(f"n={S.fmt(e.get('n_images', e.get('n')))}")
        cards.append(S.Card(f"{split} accuracy", S.fmt(acc), " · ".join(p for p in parts if p)))
    loc = next((s for s in secs if s.id == "localization" and s.present), None)
    pg = {k: v for k, v in (loc.facts.get("pointing_game") or {}).items() if v is not None} if loc else {}
    methods = {k: v for k, v in pg.items() if k not in S.BASELINES}
    if methods:
        best = max(methods, key=methods.__getitem__)
        base = "; ".join(f"{k.removeprefix('baseline:')} {S.fmt(v)}" for k, v in pg.items() if k in S.BASELINES)
        cards.append(S.Card(f"pointing game, {best}", S.fmt(pg[best]), f"baselines: {base}" if base else ""))
    san = next((s for s in secs if s.id == "sanity" and s.present), None)
    if san and san.facts.get("sanity"):
        v = san.facts["sanity"]
        passed = sum(x == "PASS" for x in v.values())
        detail = ", ".join(f"{m} {x}" for m, x in v.items())
        cards.append(S.Card("sanity check", f"{passed} of {len(v)} pass", detail))
    aud = next((s for s in secs if s.id == "audit" and s.present), None)
    if aud and aud.facts.get("audit"):
        cards.append(S.Card("shortcut audit", str(aud.facts["audit"]), ""))
    return cards
