"""`xraylens report`: one self-contained HTML page per run, with every section the run has the data for,
the missing ones named with their command, damaged files noted, and user names escaped."""

from __future__ import annotations

import base64
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
        self._section: str | None = None
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

    def handle_data(self, data):
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
    )
    yield {"full": full, "bare": bare, "base": base}
    mp.undo()


def test_full_report_is_self_contained_with_every_section_and_figure(runs):
    path = build_report(runs["full"])
    assert path == runs["full"] / "report.html"
    html = path.read_text(encoding="utf-8")
    page = _self_contained(html)
    assert page.notes("missing") == 0 and page.notes("damaged") == 0, page.all_text()
    for sid in ("overview", "settings", "data", "training", "metrics-val", "cams", "localization"):
        assert sid in page.sections, sid
    # training curves; confusion, ROC, precision-recall, calibration; two CAM grids; pointing-game bars
    assert page.section_imgs == {
        "overview": 0,
        "settings": 0,
        "data": 0,
        "training": 1,
        "metrics-val": 4,
        "cams": 2,
        "localization": 1,
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
    assert page.notes("damaged") == 0 and page.notes("missing") == 6  # 3 in the overview, 3 in place
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
    page = _self_contained(build_report(run).read_text(encoding="utf-8"))
    text = page.all_text()
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
