"""`xraylens report`: one self-contained HTML page per run, with every section the run has the data for,
the missing ones named with their command, damaged files noted, and user names escaped."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from xraylens.config import RunConfig
from xraylens.errors import XraylensError
from xraylens.report import build_report
from xraylens.report import figures as F
from xraylens.report import sections as S

EVIL_CLASS = "pneu<script>alert(1)<"  # a class-folder name (no '/' possible) that is also HTML
EVIL_FILE = "bad<b>x.png"


class Page(HTMLParser):
    """Tags, attributes, text and the section structure of a report page."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.sections: dict[str, list[str]] = {}  # section id -> its text
        self.section_imgs: dict[str, int] = {}
        self.tables: dict[str, list[list[list[str]]]] = {}  # section id -> its data tables -> rows -> cells
        self.row_classes: dict[str, list[list[str]]] = {}  # section id -> per table, each body row's class
        self._section: str | None = None
        self._cell: list[str] | None = None
        self._open: list[str] = []  # classes of the tables open at this point
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section" and a.get("id"):
            self._section = a["id"]
            self.sections[self._section] = []
            self.section_imgs[self._section] = 0
        if tag == "img" and self._section:
            self.section_imgs[self._section] += 1
        if tag == "table":
            self._open.append(a.get("class") or "")
            if self._section and self._open[-1] == "data":
                self.tables.setdefault(self._section, []).append([])
                self.row_classes.setdefault(self._section, []).append([])
        in_data = bool(self._open) and self._open[-1] == "data" and self._section in self.tables
        if tag == "tr" and in_data:
            self.tables[self._section][-1].append([])
            self.row_classes[self._section][-1].append(a.get("class") or "")
        if tag in ("td", "th") and in_data:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table" and self._open:
            self._open.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._section][-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        self.text.append(data)
        if self._section:
            self.sections[self._section].append(data)

    def section_text(self, sid: str) -> str:
        return " ".join(" ".join(self.sections[sid]).split())

    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())

    def images(self) -> list[str]:
        return [a["src"] for t, a in self.tags if t == "img"]

    def notes(self, kind: str) -> int:
        return sum(1 for t, a in self.tags if t == "p" and (a.get("class") or "").split() == ["note", kind])


def _self_contained(html: str) -> Page:
    page = Page(html)
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base"), tag
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            v = attrs.get(name)
            if v is not None:
                assert v.startswith(("data:", "#")), f"<{tag} {name}={v[:60]!r}> is an external reference"
    assert "http://" not in html and "https://" not in html and "url(" not in html
    for src in page.images():
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    return page


@pytest.fixture(scope="module")
def runs(fixture_dir, tmp_path_factory):
    """A tiny real-image run, trained (bare) and then evaluated, explained and localised (full)."""
    from xraylens.evaluate.run import evaluate_run
    from xraylens.explain.run import explain_run
    from xraylens.localize.run import localize_run
    from xraylens.runs import open_run
    from xraylens.train.loop import train
    from xraylens.trust.audit import audit_run
    from xraylens.trust.sanity import sanity_run

    base = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("XRAYLENS_CACHE", str(base / "cache"))
    data = base / "data"
    (data / EVIL_CLASS).parent.mkdir(parents=True)
    (data / EVIL_CLASS).symlink_to(fixture_dir / "pneumonia" / "PNEUMONIA", target_is_directory=True)
    (data / "NORMAL").mkdir()
    for f in sorted((fixture_dir / "pneumonia" / "NORMAL").iterdir()):
        (data / "NORMAL" / f.name).symlink_to(f)
    (data / "NORMAL" / EVIL_FILE).write_bytes(b"not an image")  # skipped, listed by name
    cfg = RunConfig().apply(
        {
            "data.path": data,
            "model.name": "tinyvgg",
            "data.image_size": 32,
            "train.epochs": 1,
            "train.batch_size": 8,
            "train.device": "cpu",
        }
    )
    full = base / "run"
    train(cfg, full, progress=False)
    bare = base / "bare"
    shutil.copytree(full, bare)
    run = open_run(full, device="cpu")
    evaluate_run(run, split="val")
    explain_run(run, split="val", methods="gradcam,layercam", overlays=0, grid=9)
    box = fixture_dir / "cxr_bbox"
    localize_run(
        run,
        annotations=box / "BBox_List_256.csv",
        fmt="nih",
        data=box / "images",
        methods="gradcam,layercam",
        faithfulness=True,
        steps=4,
        reader2=box / "BBox_List_256.csv",  # the same boxes as a second reader: a known comparison
        bootstrap=50,
    )
    sanity_run(run, split="val", methods="gradcam,layercam", limit=4, independent=False)
    audit_run(run, split="val", limit=4)
    yield {"full": full, "bare": bare, "base": base}
    mp.undo()


def test_full_report_is_self_contained_with_every_section_and_figure(runs):
    path = build_report(runs["full"])
    assert path == runs["full"] / "report.html"
    html = path.read_text(encoding="utf-8")
    page = _self_contained(html)
    assert page.notes("missing") == 0 and page.notes("damaged") == 0, page.all_text()
    for sid in ("overview", "settings", "data", "training", "metrics-val", "cams", "localization", "sanity", "audit"):
        assert sid in page.sections, sid
    assert "clinical" not in page.sections  # an image-only run has no clinical inputs to miss
    # training curves; confusion, ROC, precision-recall, calibration; two CAM grids; pointing-game bars;
    # the two cascading-randomisation plots
    assert page.section_imgs == {
        "overview": 0,
        "settings": 0,
        "data": 0,
        "training": 1,
        "metrics-val": 4,
        "cams": 2,
        "localization": 1,
        "sanity": 2,
        "audit": 0,
    }
    assert len(html) < 2_000_000
    loc = page.section_text("localization")
    assert "border energy" in loc and "corner energy" in loc  # the shortcut places, beside the baselines
    data = page.section_text("data")
    assert "Images per class and split" in data and "Skipped files (1)" in data and "one by one" in data
    loc = page.section_text("localization")
    assert "baseline:center" in loc and "baseline:random" in loc and "Atelectasis" in loc
    assert "deletion AUC" in loc and "insertion AUC" in loc
    assert "best epoch" in page.section_text("training")
    assert "val accuracy" in page.section_text("overview")


def test_user_names_are_escaped(runs):
    html = build_report(runs["full"]).read_text(encoding="utf-8")
    page = Page(html)
    assert not any(t == "script" or t == "b" for t, _ in page.tags)  # the names stayed text
    assert "pneu&lt;script&gt;alert(1)&lt;" in html and "<script" not in html
    assert EVIL_CLASS in page.all_text() and EVIL_FILE in page.section_text("data")


def test_bare_run_names_what_is_missing_and_the_command(runs):
    bare = runs["bare"]
    page = _self_contained(build_report(bare).read_text(encoding="utf-8"))
    assert page.section_imgs["training"] == 1
    text = page.all_text()
    assert f"no val-split metrics: run xraylens evaluate {bare} --split val" in text
    assert f"xraylens explain {bare} --split val" in text
    assert f"xraylens localize {bare} --annotations FILE" in text
    assert "Not in this report" in page.section_text("overview")
    assert f"xraylens sanity {bare} --split val" in text and f"xraylens audit {bare} --split val" in text
    assert page.notes("damaged") == 0 and page.notes("missing") == 10  # 5 in the overview, 5 in place
    assert page.section_imgs.get("cams", 0) == 0 and page.section_imgs.get("metrics-val", 0) == 0


def test_damaged_files_are_noted_never_a_traceback(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["full"], run)
    shutil.copy(run / "metrics-val.json", run / "metrics-test.json")
    (run / "metrics-val.json").write_text("{not json")
    (run / "localization_summary.json").write_text("[1, 2]")
    (run / "cams" / "grid_layercam.png").write_bytes(b"\x89PNG truncated")
    (run / "config.yaml").write_text("data: [unclosed\n")
    (run / "history.csv").write_text("foo,bar\n1,2\n")
    (run / "predictions-test.csv").write_text("id,true\nx,NORMAL\n")
    (run / "metrics-odd.json").write_text('{"classes": ["NORMAL", "other"], "confusion_matrix": [[1]]}')
    (run / "sanity" / "sanity.json").write_text("{")
    (run / "audit" / "audit.json").write_text('{"verdict": "OK"}')
    page = _self_contained(build_report(run).read_text(encoding="utf-8"))
    text = page.all_text()
    assert "sanity.json is not valid JSON" in page.section_text("sanity") and page.section_imgs["sanity"] == 0
    assert "audit/audit.json has no per-region table" in page.section_text("audit")
    assert "metrics-val.json is not valid JSON" in text and f"xraylens evaluate {run} --split val" in text
    assert "localization_summary.json holds a JSON list, not an object" in text
    assert "cams/grid_layercam.png cannot be read as an image" in text
    assert "config.yaml:" in page.section_text("settings") and "YAML" in page.section_text("settings")
    assert "history.csv lacks the column(s) epoch, train_loss" in page.section_text("training")
    assert "predictions-test.csv has no column p_NORMAL" in text
    assert "confusion matrix (1, 1) for 2 classes" in text
    assert page.section_imgs["cams"] == 1  # the readable grid still shows
    assert page.section_imgs["metrics-test"] == 1  # the confusion matrix, from the metrics alone
    assert page.section_imgs["data"] == 0 and "Images per class and split" in page.section_text("data")


def test_not_a_run_is_a_one_line_error(tmp_path, runs):
    with pytest.raises(XraylensError, match="run directory not found"):
        build_report(tmp_path / "nope")
    with pytest.raises(XraylensError, match="is not an xraylens run"):
        build_report(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(XraylensError, match="is a file"):
        build_report(tmp_path / "f.txt")
    # a checkpoint inside the run and an --out folder both work
    out = tmp_path / "pages"
    out.mkdir()
    assert build_report(runs["full"] / "checkpoints" / "best.pt", out) == out / "report.html"


def test_cli_report_prints_the_path_and_fails_in_one_line(runs, tmp_path, capsys):
    from xraylens.cli import main

    target = tmp_path / "r.html"
    with pytest.raises(SystemExit) as e:
        main(["report", str(runs["full"]), "--out", str(target)])
    assert e.value.code == 0 and target.is_file()
    assert capsys.readouterr().out.strip() == str(target)
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: run directory not found") and len(err.splitlines()) == 1


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _table(page: Page, sid: str, first_header: str, *, has: str | None = None) -> list[list[str]]:
    """The data table of section `sid` whose first header cell is `first_header` (and that has a header
    `has`): header row first."""
    for tab in page.tables.get(sid, []):
        if tab and tab[0] and tab[0][0] == first_header and (has is None or has in tab[0]):
            return tab
    raise AssertionError(f"no table starting {first_header!r} in section {sid}: {page.tables.get(sid)}")


def _ci(ci) -> str:
    return f"[{S.fmt(float(ci[0]))}, {S.fmt(float(ci[1]))}]"


def test_sanity_section_shows_the_verdicts_threshold_similarities_and_plots(runs):
    page = _self_contained(build_report(runs["full"]).read_text(encoding="utf-8"))
    s = _json(runs["full"] / "sanity" / "sanity.json")
    text = page.section_text("sanity")
    assert f"threshold {S.fmt(s['threshold'])}" in text and s["rule"] in text
    verdicts = _table(page, "sanity", "method", has="verdict")
    assert [r[0] for r in verdicts[1:]] == s["methods"] == ["gradcam", "layercam"]
    for row in verdicts[1:]:
        v = s["verdicts"][row[0]]
        assert row[1] == v["verdict"]
        assert row[2] == f"{S.fmt(v['spearman_full_randomization'])} {_ci(v['spearman_ci'])}"
        assert row[3] == S.fmt(v["ssim_full_randomization"]) and row[4] == S.fmt(v["hog_full_randomization"])
        assert v["verdict"] == ("PASS" if v["spearman_full_randomization"] < s["threshold"] else "FAIL")
    sims = _table(page, "sanity", "test")
    assert len(sims) - 1 == len(s["rows"])
    for row, r in zip(sims[1:], s["rows"], strict=True):
        assert row[:4] == [r["test"], str(r["step"]), r["unit"], r["method"]]
        assert row[4] == f"{S.fmt(r['spearman_mean'])} {_ci([r['spearman_ci_low'], r['spearman_ci_high']])}"
        assert row[7] == str(r["n"])
    assert page.section_imgs["sanity"] == len(list((runs["full"] / "sanity").glob("sanity_*.png"))) == 2
    passed = sum(v["verdict"] == "PASS" for v in s["verdicts"].values())
    assert f"{passed} of 2 pass" in page.section_text("overview")


def test_audit_section_shows_the_verdict_region_energy_and_flips(runs):
    page = _self_contained(build_report(runs["full"]).read_text(encoding="utf-8"))
    a = _json(runs["full"] / "audit" / "audit.json")
    text = page.section_text("audit")
    assert f"verdict {a['verdict']}" in text and a["rule"] in text
    assert all(e in text for e in a["evidence"])
    tab = _table(page, "audit", "class")
    header, rows = tab[0], tab[1:]
    assert len(rows) == sum(len(regions) for regions in a["classes"].values())
    col = {h: i for i, h in enumerate(header)}
    for row in rows:
        r = a["classes"][row[0]][row[1]]
        assert row[col["flip rate"]] == S.fmt(r["flip_rate"])
        assert row[col["control flip rate"]] == S.fmt(r["control_flip_rate"])
        # flips are often 0 on a tiny model: the score changes tell the region from its control
        assert row[col["score change"]] == S.fmt(r["score_change"])
        assert row[col["control score change"]] == S.fmt(r["control_score_change"])
        assert row[col["area share"]] == S.fmt(r["area"]) and row[col["images"]] == str(r["n"])
        for m in a["methods"]:
            assert row[col[f"energy {m}"]] == S.fmt(r["energy"][m])
    assert {r[1] for r in rows} >= {"border", "corner_tl", "corner_br"}
    assert any(r["score_change"] != r["control_score_change"] for g in a["classes"].values() for r in g.values())
    assert a["verdict"] in page.section_text("overview")


def test_localisation_section_has_chexlocalize_and_the_second_reader(runs):
    page = _self_contained(build_report(runs["full"]).read_text(encoding="utf-8"))
    s = _json(runs["full"] / "localization_summary.json")
    chx = s["chexlocalize"]
    tab = _table(page, "localization", "method", has="hit rate [95 % CI] (images)")
    order = [m for m in s["pointing_game"] if m not in S.BASELINES] + list(S.BASELINES)
    assert [r[0] for r in tab[1:]] == order and "reader2" in order  # methods, reader2, then the baselines
    for row in tab[1:]:
        for cell, fig in zip(row[1:], (chx["hit_rate"], chx["miou"]), strict=True):
            d = fig[row[0]]["all"]
            assert cell == f"{S.fmt(d['value'])} {_ci(d['ci'])} ({d['n']})"
    # the second reader is the annotations themselves: it hits every box, so the decrease is 100 (1 - model)
    assert chx["hit_rate"]["reader2"]["all"]["value"] == 1.0
    reader = next(t for t in page.tables["localization"] if t[0] == ["method", "pointing game", "hit rate", "mIoU"])
    dec = s["reader2"]["percentage_decrease"]
    assert [r[0] for r in reader[1:]] == list(dec) and {"gradcam", "layercam"} <= set(dec)
    for row in reader[1:]:
        d = dec[row[0]]["hit_rate"]["all"]
        assert row[2].startswith(f"{d['value']:.1f} % {_ci(d['ci'])}")
        assert d["value"] == pytest.approx(100 * (1 - chx["hit_rate"][row[0]]["all"]["value"]))


@pytest.fixture(scope="module")
def studies(fixture_dir, tmp_path_factory):
    """A 2-fold crossval (late fusion and the clinical-only baselines) and a 2-trial tune on the
    osteoporosis fixture (9 real knee radiographs with a clinical table)."""
    from conftest import tiny_config

    from xraylens.crossval import crossval
    from xraylens.tune import tune

    base = tmp_path_factory.mktemp("studies")
    mp = pytest.MonkeyPatch()
    mp.setenv("XRAYLENS_CACHE", str(base / "cache"))
    root = fixture_dir / "osteoporosis"
    fast = {"model.name": "tinyvgg", "data.image_size": 16, "train.batch_size": 4, "data.augment": "none"}
    cfg = tiny_config(root / "images", **fast)
    cfg.clinical.file, cfg.clinical.key = str(root / "clinical.csv"), "patient_id"
    cfg.clinical.cols = ["Age", "Gender", "BMI"]
    cfg.clinical.allow_leaky = ["Age", "Gender", "BMI"]  # three training images: every column "predicts"
    crossval(cfg, base / "cv", folds=2, modes="late,clinical-only", seed=0)
    tune(tiny_config(root / "images", **fast), base / "tune", trials=2, study="t", pruner_patience=None)
    yield {"cv": base / "cv", "tune": base / "tune"}
    mp.undo()


def test_clinical_section_of_a_fused_run(studies):
    run = studies["cv"] / "late" / "fold-1"
    page = _self_contained(build_report(run).read_text(encoding="utf-8"))
    assert list(page.sections).index("clinical") < list(page.sections).index("training")
    c = _json(run / "clinical.json")
    text = page.section_text("clinical")
    assert "late (beside the pooled image features)" in text and "patient_id" in text
    assert "Age, Gender, BMI" in text  # the columns the run allowed past the guard, as configured
    cols = _table(page, "clinical", "column", has="leak score")
    col = {h: i for i, h in enumerate(cols[0])}
    assert [r[0] for r in cols[1:]] == [x["name"] for x in c["columns"]] == ["Age", "Gender", "BMI"]
    for row, spec in zip(cols[1:], c["columns"], strict=True):
        assert row[col["type"]] == spec["kind"]
        assert row[col["leak score"]] == S.fmt(c["leak_scores"][spec["name"]])
        n_features = sum(f == spec["name"] or f.startswith(spec["name"] + "=") or f == spec["name"] + "_missing"
                         for f in c["features"])  # fmt: skip
        assert row[col["features"]] == str(n_features)
        if spec["kind"] == "num":
            assert f"(x − {S.fmt(spec['mean'])}) / {S.fmt(spec['std'])}" in row[col["preprocessing"]]
        else:
            assert ", ".join(spec["categories"]) in row[col["preprocessing"]]
        assert row[col["allowed leaky"]] == ("yes" if spec["name"] in c["allowed_leaky"] else "—")
    imp = _json(run / "clinical_importance-test.json")["columns"]
    tab = _table(page, "clinical", "column", has="accuracy drop (mean ± sd)")
    assert [r[0] for r in tab[1:]] == [r["column"] for r in imp]
    for row, r in zip(tab[1:], imp, strict=True):
        assert row[2] == f"{r['accuracy_drop_mean']:+.3f} ± {r['accuracy_drop_sd']:.3f}"
        assert row[4] == str(r["repeats"])
    assert "Permutation importance — test" in text


def test_crossval_folder_gets_a_study_page(studies, capsys):
    from xraylens.cli import main

    cv = studies["cv"]
    with pytest.raises(SystemExit) as e:
        main(["report", str(cv)])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == str(cv / "report.html")
    page = _self_contained((cv / "report.html").read_text(encoding="utf-8"))
    assert page.notes("damaged") == 0 and page.notes("missing") == 0
    summary = _csv(cv / "crossval.csv")
    tab = _table(page, "crossval", "mode")
    assert [r[:2] for r in tab[1:]] == [[r["mode"], r["model"]] for r in summary]
    assert {r["mode"] for r in summary} == {"late", "clinical-only"} and {r["model"] for r in summary} == {
        "tinyvgg",
        "logreg",
        "gboost",
    }
    for row, r in zip(tab[1:], summary, strict=True):
        assert row[2] == r["folds"] == "2"
        for cell, key in zip(row[3:], ("accuracy", "f1_macro", "f2", "auc"), strict=True):
            assert cell.startswith(f"{float(r[key + '_mean']):.3f} ± {float(r[key + '_sd']):.3f}")
            assert cell.startswith(r[key])  # crossval's own "mean ± sd" text
    folds = _csv(cv / "crossval-folds.csv")
    tab = _table(page, "crossval-folds", "mode")
    assert len(tab) - 1 == len(folds) == 6
    for row, r in zip(tab[1:], folds, strict=True):
        assert row[:4] == [r["mode"], r["model"], r["fold"], r["n_test"]]
        assert row[4] == S.fmt(float(r["accuracy"])) and row[7] == S.fmt(float(r["auc"]))
    assert page.section_imgs["crossval-folds"] == 1
    runs_tab = _table(page, "crossval-runs", "folder")
    assert [r[0] for r in runs_tab[1:]] == [
        "clinical-only/fold-1",
        "clinical-only/fold-2",
        "late/fold-1",
        "late/fold-2",
    ]
    late1 = _json(cv / "late" / "fold-1" / "metrics-test.json")
    assert runs_tab[3][1:3] == ["run", S.fmt(late1["accuracy"])]
    assert "folds 2" in page.section_text("overview").lower()


def test_tune_folder_gets_a_study_page(studies):
    out = studies["tune"]
    page = _self_contained(build_report(out).read_text(encoding="utf-8"))
    best = _json(out / "best.json")
    trials = _csv(out / "trials.csv")
    tab = _table(page, "tune-trials", "number")
    header = tab[0]
    assert [r[0] for r in tab[1:]] == [t["number"] for t in trials] == ["0", "1"]
    for row, t in zip(tab[1:], trials, strict=True):
        assert row[header.index("state")] == t["state"]
        assert row[header.index("value")] == S.fmt(float(t["value"]))
        assert row[header.index("val_accuracy")] == S.fmt(float(t["val_accuracy"]))
        assert row[header.index("train.lr")] == f"{float(t['train.lr']):.4g}"
    classes = page.row_classes["tune-trials"][0][1:]  # body rows (the first tr is the header)
    assert [n for n, c in enumerate(classes) if c == "best"] == [best["best"]["number"]]
    text = page.section_text("tune-best")
    assert f"best trial {best['best']['number']}" in text and f"its score {best['best']['value']:.4f}" in text
    assert page.section_imgs["tune-plots"] == len(best["plots"]) - sum(
        not p.startswith("plots/") for p in best["plots"]
    )
    assert all(n in page.section_text("tune-best") for n in best["notes"])


def test_study_pages_note_damage_and_refuse_other_folders(studies, tmp_path):
    cv = tmp_path / "cv"
    shutil.copytree(studies["cv"], cv, ignore=shutil.ignore_patterns("fold-*"))
    (cv / "crossval.csv").write_text("mode,foo\\nx,1\\n")
    page = _self_contained(build_report(cv).read_text(encoding="utf-8"))
    assert "crossval.csv lacks the column(s) model, folds" in page.section_text("crossval")
    assert page.section_imgs["crossval-folds"] == 1  # the per-fold file still reads
    assert "no MODE/fold-K folders" in page.section_text("crossval-runs")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(XraylensError, match="is not an xraylens run, crossval or tune folder"):
        build_report(other)
    assert not (other / "report.html").exists()


def test_multiclass_curves_and_predictions(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["0", "1", "2", "3"]
    y = rng.integers(0, 3, 60)  # class 3 never occurs: its curves are left out, not an error
    p = rng.dirichlet(np.ones(4), 60)
    p[np.arange(60), y] += 0.5
    p /= p.sum(1, keepdims=True)
    for uri in (F.roc(y, p, classes, None), F.precision_recall(y, p, classes, None)):
        assert uri.startswith("data:image/png;base64,")
    uri, ece = F.calibration(y, p, classes, None)
    assert uri.startswith("data:image/png;base64,") and 0 <= ece <= 1
    rows = "\n".join(f"i{n},{classes[t]},x,0," + ",".join(f"{v:.4f}" for v in p[n]) for n, t in enumerate(y))
    csv_path = tmp_path / "predictions-val.csv"
    csv_path.write_text("id,true,pred,prob," + ",".join(f"p_{c}" for c in classes) + "\n" + rows + "\n")
    yy, pp = S.read_predictions(csv_path, classes)
    assert (yy == y).all() and np.allclose(pp, p, atol=1e-4)


def test_grid_names_follow_explain():
    from xraylens.explain.run import safe_name

    for name in ("gradcam", "gradcam++", "normgrad-conv1x1", "a b/c", "ÿ"):
        assert S._safe(name) == safe_name(name)


@pytest.mark.slow
def test_demo_ends_with_its_report(tmp_path, fixture_dir):
    from xraylens.demo import run_demo

    summary = run_demo(tmp_path / "demo", epochs=1, progress=False, device="cpu")
    report = tmp_path / "demo" / "run" / "report.html"
    assert f"  report: {report}" in summary.splitlines()
    page = _self_contained(report.read_text(encoding="utf-8"))
    assert page.section_imgs["metrics-test"] == 4 and page.section_imgs["cams"] == 5
    assert page.section_imgs["localization"] == 1 and page.section_imgs["training"] == 1
    # the demo runs the sanity check and the audit: both sections are there, with a verdict each
    assert page.section_imgs["sanity"] >= 1 and "verdict" in page.section_text("audit")
    assert "missing" not in page.section_text("sanity") + page.section_text("audit")


def test_screenshot_of_the_first_screen(runs, tmp_path, chromium_launch):
    from playwright.sync_api import sync_playwright

    path = build_report(runs["full"])
    shot = tmp_path / "report-first-screen.png"
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(**chromium_launch)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(shot))
            pdf = page.pdf(path=str(tmp_path / "report.pdf"))  # printable: the print stylesheet lays it out
        finally:
            browser.close()
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert shot.stat().st_size > 20_000 and len(pdf) > 20_000
    keep = os.environ.get("XRAYLENS_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
