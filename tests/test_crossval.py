"""xraylens crossval: patient-grouped stratified folds, one run per mode and fold, resume after a kill,
and the mean ± sd table (a row per mode); merged classes for the binary variant."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import tiny_config

from xraylens.crossval import crossval, format_table, make_folds
from xraylens.crossval.run import summarise
from xraylens.data.records import Record, SourceSet
from xraylens.errors import XraylensError

FAST = {"model.name": "tinyvgg", "data.image_size": 16, "train.batch_size": 4, "data.augment": "none"}


def _config(fixture_dir, **settings):
    root = fixture_dir / "osteoporosis"
    cfg = tiny_config(root / "images", **{**FAST, **settings})
    cfg.clinical.file = str(root / "clinical.csv")
    cfg.clinical.key = "patient_id"
    cfg.clinical.cols = ["Age", "Gender", "BMI"]
    # nine images: on three training images every column "predicts" the label; allowed and recorded
    cfg.clinical.allow_leaky = ["Age", "Gender", "BMI"]
    return cfg


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_folds_are_stratified_grouped_and_cover_every_image_once():
    # 40 patients with 2 images each (same label), 3 classes 20/12/8 patients
    labels = [0] * 20 + [1] * 12 + [2] * 8
    records = [
        Record(id=f"c{y}/p{p}_{i}.png", label=y, split="train", path=f"/x/p{p}_{i}.png", group=f"p{p}")
        for p, y in enumerate(labels)
        for i in range(2)
    ]
    source = SourceSet(root="/x", classes=["a", "b", "c"], records=records)
    folds = make_folds(source, 5, seed=3, val_fraction=0.15)
    assert len(folds) == 5
    tests = [i for f in folds for i, s in f.items() if s == "test"]
    assert sorted(tests) == sorted(r.id for r in records)  # each image held out exactly once
    group = {r.id: r.group for r in records}
    label = {r.id: r.label for r in records}
    for f in folds:
        assert set(f) == {r.id for r in records}
        where: dict[str, set[str]] = {}
        for i, s in f.items():
            where.setdefault(group[i], set()).add(s)
        assert all(len(s) == 1 for s in where.values())  # a patient never straddles train/val/test
        test_counts = np.bincount([label[i] for i, s in f.items() if s == "test"], minlength=3)
        assert np.all(np.abs(test_counts - np.array([8, 4.8, 3.2])) <= 2)  # ~1/5 of each class
        n_val = sum(s == "val" for s in f.values())
        assert 8 <= n_val <= 16  # ~15 % of the 64 training images
    # seeded: the same assignment again, another seed another one
    assert make_folds(source, 5, seed=3, val_fraction=0.15) == folds
    assert make_folds(source, 5, seed=4, val_fraction=0.15) != folds
    with pytest.raises(XraylensError, match="more than the 40 patients"):
        make_folds(source, 41, seed=0, val_fraction=0.15)


def test_crossval_end_to_end_with_a_row_per_mode(fixture_dir, tmp_path):
    cfg = _config(fixture_dir)
    out = tmp_path / "cv"
    r = crossval(cfg, out, folds=2, modes="none,early,late,clinical-only", seed=0)
    modes = [row["mode"] for row in r.table]
    assert modes == ["none", "early", "late", "clinical-only", "clinical-only"]
    assert [row["model"] for row in r.table][-2:] == ["logreg", "gboost"]
    assert set(r.runs.values()) == {"trained"} and len(r.runs) == 8
    table = _read(out / "crossval.csv")
    assert [row["mode"] for row in table] == modes
    folds = _read(out / "crossval-folds.csv")
    assert len(folds) == 2 * 3 + 2 * 2
    for row in table:
        assert row["folds"] == "2"
        # the CSV's mean is the mean of its two folds' values
        vals = [float(f["accuracy"]) for f in folds if (f["mode"], f["model"]) == (row["mode"], row["model"])]
        assert float(row["accuracy_mean"]) == pytest.approx(np.mean(vals), abs=1e-4)
        assert row["accuracy"].count("±") == 1
    # every image run is an ordinary run: its test split is exactly its fold's held-out images
    assign = _read(out / "folds.csv")
    assert sorted(a["id"] for a in assign) == sorted(
        p.relative_to(fixture_dir / "osteoporosis" / "images").as_posix()
        for p in (fixture_dir / "osteoporosis" / "images").rglob("*.png")
    )
    for mode in ("none", "early", "late"):
        for k in (1, 2):
            run = out / mode / f"fold-{k}"
            pred = _read(run / "predictions-test.csv")
            assert sorted(p["id"] for p in pred) == sorted(a["id"] for a in assign if a["fold"] == str(k))
            m = json.loads((run / "metrics-test.json").read_text())
            assert m["n_images"] == len(pred)
    # none is the image model alone; early/late carry the fitted clinical preprocessing
    assert not (out / "none" / "fold-1" / "clinical.json").exists()
    assert (out / "late" / "fold-1" / "clinical.json").is_file()
    clin = json.loads((out / "clinical-only" / "fold-1" / "metrics-test.json").read_text())
    assert set(clin["models"]) == {"logreg", "gboost"} and clin["n_test"] + clin["n_fit"] == 9
    text = format_table(r.table)
    assert text.splitlines()[0].split()[:3] == ["mode", "model", "folds"] and "late" in text


def test_resume_after_a_kill_reuses_finished_folds(fixture_dir, tmp_path, monkeypatch):
    import xraylens.train.loop as loop

    real = loop.train
    calls: list[tuple[str, bool]] = []

    class Killed(RuntimeError):
        pass

    def killed_in_third_run(cfg, out, **kw):
        calls.append((str(out), kw.get("resume", False)))
        if len(calls) == 3:  # the third run dies after its first epoch's checkpoints

            def stop(epoch, score, metrics):
                raise Killed()

            return real(cfg, out, **kw, on_epoch=stop)
        return real(cfg, out, **kw)

    monkeypatch.setattr(loop, "train", killed_in_third_run)
    cfg = _config(fixture_dir, **{"train.epochs": 2})
    out = tmp_path / "cv"
    with pytest.raises(Killed):
        crossval(cfg, out, folds=2, modes="none,late", seed=0)
    done = {p: p.stat().st_mtime_ns for p in out.glob("none/fold-*/metrics-test.json")}
    assert len(done) == 2 and not (out / "late" / "fold-1" / "metrics-test.json").exists()
    assert (out / "late" / "fold-1" / "checkpoints" / "last.pt").is_file()

    calls.clear()
    monkeypatch.setattr(
        loop, "train", lambda cfg, out, **kw: calls.append((str(out), kw["resume"])) or real(cfg, out, **kw)
    )
    r = crossval(cfg, out, folds=2, modes="none,late", seed=0)
    assert r.runs == {
        "none/fold-1": "reused",
        "none/fold-2": "reused",
        "late/fold-1": "resumed",
        "late/fold-2": "trained",
    }
    assert [(c[0].split("cv/")[1], c[1]) for c in calls] == [("late/fold-1", True), ("late/fold-2", False)]
    assert {p: p.stat().st_mtime_ns for p in out.glob("none/fold-*/metrics-test.json")} == done  # untouched
    hist = _read(out / "late" / "fold-1" / "history.csv")
    assert [h["epoch"] for h in hist] == ["1", "2"]  # epoch 1 kept, epoch 2 done after the kill

    calls.clear()
    again = crossval(cfg, out, folds=2, modes="none,late", seed=0)
    assert not calls and set(again.runs.values()) == {"reused"}
    assert [row["accuracy"] for row in again.table] == [row["accuracy"] for row in r.table]
    # the same settings with paths typed relative to another working directory: still reused
    monkeypatch.chdir(fixture_dir)
    cfg.data.path, cfg.clinical.file = "osteoporosis/images", "osteoporosis/clinical.csv"
    assert set(crossval(cfg, out, folds=2, modes="none,late", seed=0).runs.values()) == {"reused"}
    assert not calls
    # other settings in the same folder are refused, naming what changed
    cfg.train.lr = 0.5
    with pytest.raises(XraylensError, match="train.lr"):
        crossval(cfg, out, folds=2, modes="none", seed=0)


def test_binary_merge_scores_the_merged_class(fixture_dir, tmp_path):
    cfg = _config(fixture_dir, **{"data.merge_classes": "abnormal=osteopenia,osteoporosis"})
    r = crossval(cfg, tmp_path / "cv", folds=2, modes="none,clinical-only", seed=0)
    m = json.loads((tmp_path / "cv" / "none" / "fold-1" / "metrics-test.json").read_text())
    assert m["classes"] == ["abnormal", "normal"] and m["positive"] == "abnormal"
    c = json.loads((tmp_path / "cv" / "clinical-only" / "fold-1" / "metrics-test.json").read_text())
    assert c["models"]["logreg"]["positive"] == "abnormal"
    assert len(r.table) == 3
    labels = {row["id"]: row["label"] for row in _read(tmp_path / "cv" / "folds.csv")}
    assert {v for k, v in labels.items() if not k.startswith("normal/")} == {"abnormal"}


def test_summary_leaves_out_undefined_values():
    rows = [
        {
            "mode": "none",
            "model": "m",
            "fold": 1,
            "n_test": 3,
            "accuracy": 0.5,
            "f1_macro": 0.4,
            "f2": 0.3,
            "auc": None,
        },
        {"mode": "none", "model": "m", "fold": 2, "n_test": 3, "accuracy": 1.0, "f1_macro": 0.6, "f2": 0.5, "auc": 0.8},
    ]
    (t,) = summarise(rows)
    assert t["accuracy_mean"] == 0.75 and t["accuracy_sd"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert t["auc_n"] == 1 and t["auc"] == "0.800" and t["accuracy"] == "0.750 ± 0.354"


def test_manifest_with_a_patient_column_keeps_each_patient_in_one_fold(fixture_dir, tmp_path):
    # a CSV manifest (path, label, patient); two osteopenia images belong to one patient
    images = fixture_dir / "osteoporosis" / "images"
    rows = ["path,label,patient"]
    for p in sorted(images.rglob("*.png")):
        patient = "P-twice" if p.stem in ("OP22", "OP129") else p.stem
        rows.append(f"{p},{p.parent.name},{patient}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    cfg = tiny_config(manifest, **{**FAST, "data.group_column": "patient"})
    r = crossval(cfg, tmp_path / "cv", folds=2, modes="none", seed=1)
    assert [row["mode"] for row in r.table] == ["none"]
    assign = _read(tmp_path / "cv" / "folds.csv")
    twice = {a["fold"] for a in assign if a["group"] == "P-twice"}
    assert len(twice) == 1 and sum(a["group"] == "P-twice" for a in assign) == 2
    for k in (1, 2):
        split = {row["id"]: row["split"] for row in _read(tmp_path / "cv" / "folds" / f"fold-{k}.csv")}
        assert len({split[a["id"]] for a in assign if a["group"] == "P-twice"}) == 1


def test_a_leaky_column_stops_the_crossval_before_anything_is_written(fixture_dir, tmp_path):
    """The leakage guard runs on every fold's training images up front: no half-written OUT folder."""
    from xraylens.crossval.run import crossval

    cfg = _config(fixture_dir)
    cfg.clinical.cols = ["Age", "T-score Value"]
    cfg.clinical.allow_leaky = ["Age"]
    out = tmp_path / "cv"
    with pytest.raises(XraylensError, match="T-score Value"):
        crossval(cfg, out, folds=2, modes="late")
    assert not out.exists()
