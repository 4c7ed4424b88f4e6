"""Clinical tables (data.clinical): joins, file-name tables, typed preprocessing, the leakage guard,
predict-time behaviour of unseen categories, missing values and missing columns, and the baseline."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from xraylens.config import RunConfig
from xraylens.data import clinical as cl
from xraylens.errors import XraylensError

CLASSES = ["normal", "osteopenia", "osteoporosis"]


def _images(osteo: Path) -> list[tuple[str, str]]:
    root = osteo / "images"
    return [(p.relative_to(root).as_posix(), str(p)) for p in sorted(root.rglob("*.png"))]


def _settings(osteo, **kw):
    c = RunConfig().clinical
    c.file, c.key, c.cols = str(osteo / "clinical.csv"), "patient_id", ["Age", "Gender", "BMI"]
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _rows_csv(path: Path, rows: list[dict], header: list[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def test_joins_by_id_or_by_image_path(osteo):
    items = _images(osteo)
    assert len(items) == 9
    by_id = cl.rows_for(cl.read_table(osteo / "clinical.csv", "patient_id"), items)
    by_path = cl.rows_for(cl.read_table(osteo / "clinical.csv", "image"), items)
    for (image_id, _), a, b in zip(items, by_id, by_path, strict=True):
        assert a is b or a == b
        assert Path(image_id).stem == a["patient_id"]  # N4.png <- patient_id N4; images/normal/N4.png <- image
    with pytest.raises(XraylensError, match="--clinical-key 'nope'"):
        cl.read_table(osteo / "clinical.csv", "nope")


def test_typed_preprocessing_fitted_on_train(osteo):
    table = cl.read_table(osteo / "clinical.csv", "patient_id")
    rows = cl.rows_for(table, _images(osteo))
    pre = cl.ClinicalPreprocessor.fit(rows, cl.parse_cols(["Age", "Gender", "BMI"]))
    assert pre.feature_names == ["Age", "Age_missing", "Gender=female", "Gender=male", "Gender_missing", "BMI",
                                 "BMI_missing"]  # fmt: skip
    x = pre.transform(rows)
    ages = np.array([float(r["Age"]) for r in rows])
    assert np.allclose(x[:, 0], (ages - ages.mean()) / ages.std(), atol=1e-5)  # standardised with train stats
    assert np.allclose(x[:, 2] + x[:, 3], 1) and not x[:, [1, 4, 6]].any()  # one-hot, nothing missing
    again = cl.ClinicalPreprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert np.array_equal(again.transform(rows), x)
    # a forced type: age as a category gets one slot per distinct train value
    cat = cl.ClinicalPreprocessor.fit(rows, cl.parse_cols(["Age:cat"]))
    assert cat.columns[0].kind == "cat" and len(cat.columns[0].categories) == len({r["Age"] for r in rows})


def test_unseen_category_and_missing_value_behave_as_documented(osteo):
    table = cl.read_table(osteo / "clinical.csv", "patient_id")
    rows = cl.rows_for(table, _images(osteo))
    pre = cl.ClinicalPreprocessor.fit(rows, cl.parse_cols(["Age", "Gender"]))
    age, gender = pre.columns
    x = pre.transform(
        [{"Age": "", "Gender": "Other"}, {"Age": "NA", "Gender": None}, {"Age": "60", "Gender": " MALE "}]
    )
    # missing Age -> the train median, standardised, and its indicator set
    assert x[0, 0] == pytest.approx((age.fill - age.mean) / age.std) and x[0, 1] == 1 and x[1, 1] == 1
    assert age.fill == pytest.approx(np.median([float(r["Age"]) for r in rows]))
    # unseen category -> all-zero one-hot block, not missing; missing category -> the train mode + indicator
    assert x[0, 2:4].tolist() == [0, 0] and x[0, 4] == 0
    assert x[1, 2 + gender.categories.index(gender.fill)] == 1 and x[1, 4] == 1
    assert x[2, 2 + gender.categories.index("male")] == 1  # stripped and lower-cased before matching
    with pytest.raises(XraylensError, match="'Age'.*not a number"):
        pre.transform([{"Age": "old", "Gender": "male"}])
    with pytest.raises(XraylensError, match="Gender"):
        pre.transform([{"Age": "50"}])  # a column absent from the table


def test_file_name_table_parses(osteo, tmp_path):
    src = _images(osteo)
    data = tmp_path / "named"
    meta = {"N4": (22.1, 45, "M"), "OP152": (33.7, 56, "F"), "OS34": (23.6, 71, "M")}
    for image_id, path in src:
        stem = Path(image_id).stem
        bmi, age, sex = meta.get(stem, (27.1, 56, "F"))
        label = Path(image_id).parent.name
        dst = data / label / f"{label}_bmi{bmi}_age{age}_{sex}_{stem}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst)
    pattern = r"^(?P<label>[a-z]+)_bmi(?P<bmi>[\d.]+)_age(?P<age>\d+)_(?P<sex>[MF])_"
    items = [(p.relative_to(data).as_posix(), str(p)) for p in sorted(data.rglob("*.png"))]
    table = cl.table_from_names(items, pattern)
    assert table.columns == ["label", "bmi", "age", "sex"]
    rows = cl.rows_for(table, items)
    by_stem = {Path(i).stem.rsplit("_", 1)[-1]: r for (i, _), r in zip(items, rows, strict=True)}
    assert by_stem["OP152"] == {"label": "osteopenia", "bmi": "33.7", "age": "56", "sex": "F"}
    s = RunConfig().clinical
    s.from_name = pattern
    cols = cl.selected_columns(s, table)
    assert [c for c, _ in cols] == ["bmi", "age", "sex"]  # the label group is never an input
    # and a run trains from it end to end
    from tests.conftest import tiny_config
    from xraylens.train.loop import train

    cfg = tiny_config(data, **{"clinical.from_name": pattern, "clinical.mode": "late", "train.batch_size": 4})
    train(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "clinical.json").read_text())
    assert [c["name"] for c in saved["columns"]] == ["bmi", "age", "sex"]
    assert saved["columns"][2]["kind"] == "cat" and saved["columns"][0]["kind"] == "num"
    with pytest.raises(XraylensError, match="named groups"):
        cl.compile_name_pattern(r"_age\d+")


def test_leakage_guard_stops_t_score_and_passes_age(osteo):
    items = _images(osteo)
    labels = np.array([CLASSES.index(Path(i).parent.name) for i, _ in items])
    with pytest.raises(XraylensError) as e:
        cl.fit_clinical(_settings(osteo, cols=["Age", "T-score Value"]), items, labels)
    msg = str(e.value)
    assert "'T-score Value' (balanced accuracy 1.000" in msg and "Age" not in msg and "\n" not in msg
    pre, _ = cl.fit_clinical(_settings(osteo, cols=["Age"]), items, labels)
    assert pre.leak_scores["Age"] < cl.LEAK_THRESHOLD
    # the override is recorded with the column's score
    pre, _ = cl.fit_clinical(
        _settings(osteo, cols=["Age", "T-score Value"], allow_leaky=["T-score Value"]), items, labels
    )
    assert pre.allowed_leaky == {"T-score Value": 1.0}
    assert pre.to_dict()["allowed_leaky"] == {"T-score Value": 1.0}


def test_leakage_guard_on_the_full_knee_table(shared_data):
    """All 239 rows: the T-score, Z-score and Diagnosis are refused, age and BMI pass."""
    path = shared_data / "osteoporosis_knee_clinical" / "clinical_with_images.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    table = cl.read_table(path, "patient_id")
    labels = np.array([CLASSES.index(r["folder_label"]) for r in table.rows])
    cols = cl.parse_cols(["Age", "BMI", "Gender", "T-score Value", "Z-Score Value", "Diagnosis"])
    scores = cl.leakage_scores(table.rows, labels, cols)
    assert scores["T-score Value"] >= cl.LEAK_THRESHOLD and scores["Diagnosis"] >= cl.LEAK_THRESHOLD
    assert scores["Age"] < cl.LEAK_THRESHOLD and scores["BMI"] < cl.LEAK_THRESHOLD
    for leaky in ("T-score Value", "Z-Score Value", "Diagnosis"):
        with pytest.raises(XraylensError, match=leaky):
            cl.check_leakage({c: scores[c] for c in ("Age", leaky)}, [])
    assert cl.check_leakage({c: scores[c] for c in ("Age", "BMI", "Gender")}, []) == {}


def test_clinical_baseline_metrics(osteo):
    items = _images(osteo)
    labels = np.array([CLASSES.index(Path(i).parent.name) for i, _ in items])
    ids = [i for i, _ in items]
    out = cl.baseline_for_split(_settings(osteo), osteo / "images", ids, labels, ids, labels, CLASSES)
    assert set(out) == {"logreg", "gboost"}
    for m in out.values():
        for k in ("accuracy", "f1_weighted", "f2", "auc"):
            assert 0.0 <= m[k] <= 1.0
    assert out["gboost"]["accuracy"] == 1.0  # in-sample: boosting memorises 9 rows (sanity, not a result)


@pytest.fixture(scope="module")
def late_run(osteo, tmp_path_factory):
    from tests.conftest import tiny_config
    from xraylens.train.loop import train

    out = tmp_path_factory.mktemp("clin") / "late"
    cfg = tiny_config(
        osteo / "images",
        **{"clinical.file": str(osteo / "clinical.csv"), "clinical.key": "patient_id",
           "clinical.cols": "Age,Gender,BMI", "clinical.mode": "late", "train.batch_size": 4},
    )  # fmt: skip
    train(cfg, out, progress=False)
    return out


def test_predict_time_unseen_missing_and_absent_column(late_run, osteo, tmp_path, capsys):
    from xraylens.cli import main
    from xraylens.evaluate.predict import predict_files

    with (osteo / "clinical.csv").open() as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    n4 = osteo / "images" / "normal" / "N4.png"
    plain = predict_files(late_run, [n4], device="cpu")[0]
    assert plain["class"] in CLASSES
    edited = [dict(r) for r in rows]
    edited[0].update({"Gender": "intersex", "Age": ""})  # N4: an unseen category and a missing value
    table = _rows_csv(tmp_path / "edited.csv", edited, header)
    r = predict_files(late_run, [n4], device="cpu", clinical=table)[0]
    assert "error" not in r and abs(sum(r["probabilities"].values()) - 1) < 1e-5
    assert r["probabilities"] != plain["probabilities"]  # the values reach the model
    # a file without a row is that file's error; the others go on
    stray = tmp_path / "stray.png"
    shutil.copy(n4, stray)
    out = predict_files(late_run, [n4, stray], device="cpu", clinical=table)
    assert "error" not in out[0] and "no row" in out[1]["error"]
    # a column the table lacks: one error line from the CLI, exit 2
    no_bmi = _rows_csv(tmp_path / "no_bmi.csv", rows, [h for h in header if h != "BMI"])
    with pytest.raises(SystemExit) as e:
        main(["predict", str(late_run), str(n4), "--device", "cpu", "--clinical", str(no_bmi)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "BMI" in err[0]


def test_allow_leaky_column_is_recorded_in_the_run(osteo, tmp_path):
    from tests.conftest import tiny_config
    from xraylens.train.loop import train

    settings = {"clinical.file": str(osteo / "clinical.csv"), "clinical.key": "patient_id",
                "clinical.cols": "Age,T-score Value", "clinical.mode": "early", "train.batch_size": 4}  # fmt: skip
    with pytest.raises(XraylensError, match="T-score Value"):
        train(tiny_config(osteo / "images", **settings), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    cfg = tiny_config(osteo / "images", **settings, **{"clinical.allow_leaky": ["T-score Value"]})
    train(cfg, tmp_path / "allowed", progress=False)
    saved = json.loads((tmp_path / "allowed" / "clinical.json").read_text())
    assert list(saved["allowed_leaky"]) == ["T-score Value"]
    assert RunConfig.load(tmp_path / "allowed" / "config.yaml").clinical.allow_leaky == ["T-score Value"]


def test_evaluate_other_data_with_its_own_clinical_table(late_run, osteo, tmp_path):
    """New patients: images the run's table does not know need their own CSV (same key and columns)."""
    from xraylens.evaluate.run import evaluate_run

    with (osteo / "clinical.csv").open() as f:
        rows = list(csv.DictReader(f))
    data = tmp_path / "external"
    new_rows = []
    for r in rows:
        src = osteo / r["image"]
        dst = data / src.parent.name / f"ext_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        new_rows.append({**r, "patient_id": f"ext_{r['patient_id']}"})
    table = _rows_csv(tmp_path / "external.csv", new_rows, list(rows[0]))
    with pytest.raises(XraylensError, match="no row"):
        evaluate_run(late_run, data, "train", device="cpu", out=tmp_path / "e0", bootstrap=0, importance_repeats=0)
    m = evaluate_run(late_run, data, "train", device="cpu", out=tmp_path / "e1", bootstrap=0, importance_repeats=2,
                     clinical=table)  # fmt: skip
    assert m["n_images"] >= 6 and len(m["clinical_importance"]) == 3  # class folders: val carved from the 9
