"""Every user mistake on the command line: exit code 2, one `error:` line, no traceback, and for the
commands that decode images, nothing decoded yet (the cache stays empty).

A new option is covered by adding a row to BAD.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from xraylens.cli import main
from xraylens.config import RunConfig


@pytest.fixture(scope="module")
def env(fixture_dir, tiny_run, tmp_path_factory):
    """A tiny trained run, a data folder, an annotation file and a few bad files."""
    root = tmp_path_factory.mktemp("cli_errors")
    run = tiny_run
    (root / "afile").write_text("not a folder\n")
    (root / "utf16.csv").write_text("path,label\nx.png,a\n", encoding="utf-16")
    (root / "binary.csv").write_bytes(bytes(range(256)) * 4)
    return {
        "RUN": str(run),
        "DATA": str(fixture_dir / "pneumonia"),
        "FILE": str(root / "afile"),
        "UTF16": str(root / "utf16.csv"),
        "BINARY": str(root / "binary.csv"),
        "BOXES": str(fixture_dir / "cxr_bbox" / "BBox_List_256.csv"),
        "IMAGES": str(fixture_dir / "cxr_bbox" / "images"),
        "SEGDATA": str(fixture_dir / "lung_seg"),
        "CLIN": str(fixture_dir / "osteoporosis" / "clinical.csv"),
        "MISSING": str(root / "missing"),
        "RO": "/proc/xraylens-run",
    }


TRAIN = [
    "train",
    "--data",
    "DATA",
    "--model",
    "tinyvgg",
    "--image-size",
    "32",
    "--device",
    "cpu",
    "--quiet",
    "--out",
    "MISSING",
]
EXPLAIN = ["explain", "RUN", "--split", "val", "--device", "cpu", "--out", "MISSING"]
LOCALIZE = [
    "localize",
    "RUN",
    "--annotations",
    "BOXES",
    "--format",
    "nih",
    "--data",
    "IMAGES",
    "--device",
    "cpu",
    "--out",
    "MISSING",
]

SEGMENT = ["segment", "train", "--data", "SEGDATA", "--device", "cpu", "--quiet", "--out", "MISSING"]
SEGPREDICT = ["segment", "predict", "RUN", "--data", "IMAGES", "--device", "cpu", "--quiet", "--out", "MISSING"]

SANITY = ["sanity", "RUN", "--split", "val", "--device", "cpu", "--out", "MISSING"]
AUDIT = ["audit", "RUN", "--split", "val", "--device", "cpu", "--out", "MISSING"]
CYCLE = ["cycle", "RUN", "--data", "DATA", "--lung-model", "MISSING", "--device", "cpu", "--quiet", "--out", "MISSING"]

CROSSVAL = [
    "crossval",
    "--data",
    "DATA",
    "--modes",
    "none",
    "--model",
    "tinyvgg",
    "--image-size",
    "32",
    "--epochs",
    "1",
    "--device",
    "cpu",
    "--quiet",
    "--out",
    "MISSING",
]

TUNE = [
    "tune",
    "--data",
    "DATA",
    "--model",
    "tinyvgg",
    "--image-size",
    "32",
    "--device",
    "cpu",
    "--quiet",
    "--trials",
    "1",
    "--study",
    "s",
    "--out",
    "MISSING",
]

# (command line, words the message must contain); capital words are replaced from `env`
BAD = [
    (TRAIN + ["--epochs", "0"], "--epochs"),
    (TRAIN + ["--batch-size", "0"], "--batch-size"),
    (TRAIN + ["--lr", "-1"], "--lr"),
    (TRAIN + ["--lr", "nan"], "--lr"),
    (TRAIN + ["--image-size", "0"], "--image-size"),
    (TRAIN + ["--center-crop", "1.5"], "--center-crop"),
    (TRAIN + ["--early-stopping", "0"], "--early-stopping"),
    (TRAIN + ["--train-last", "-1"], "--train-last"),
    (TRAIN + ["--in-chans", "2"], "--in-chans"),
    (TRAIN + ["--head-hidden", "0"], "--head-hidden"),
    (TRAIN + ["--select", "accuracy/0"], "accuracy/0"),
    (TRAIN + ["--select", "__import__('os')"], "select"),
    (TRAIN + ["--model", "nope"], "nope"),
    (TRAIN + ["--loss", "nope"], "nope"),
    (TRAIN + ["--optimizer", "nope"], "nope"),
    (TRAIN + ["--schedule", "nope"], "nope"),
    (TRAIN + ["--augment", "nope"], "nope"),
    (TRAIN + ["--device", "nope"], "nope"),
    (TRAIN + ["--weights", "MISSING"], "--weights"),
    (TRAIN + ["--group-pattern", "person(\\d+"], "group"),
    (TRAIN + ["--set", "train.lr"], "section.key=value"),
    (TRAIN + ["--set", "train.nope=1"], "nope"),
    (TRAIN + ["--set", "data.placement=disk"], "data.placement 'disk' is not one of"),
    (TRAIN + ["--set", "train.compile=true"], "train.compile needs a CUDA device"),
    (TRAIN + ["--config", "MISSING"], "config"),
    (TRAIN + ["--epochs", "abc"], "--epochs"),
    (TRAIN + ["--nope"], "--nope"),
    (TRAIN + ["--clinical", "MISSING", "--clinical-key", "patient_id", "--clinical-cols", "Age"], "--clinical"),
    (TRAIN + ["--clinical", "CLIN", "--clinical-key", "nope", "--clinical-cols", "Age"], "nope"),
    (TRAIN + ["--clinical", "CLIN", "--clinical-key", "patient_id", "--clinical-cols", "nope"], "nope"),
    (TRAIN + ["--clinical", "CLIN", "--clinical-key", "patient_id"], "--clinical-cols"),
    (TRAIN + ["--clinical", "CLIN", "--clinical-cols", "Age"], "--clinical-key"),
    (TRAIN + ["--clinical", "CLIN", "--clinical-key", "patient_id", "--clinical-cols", "Age:nope"], "num or cat"),
    (TRAIN + ["--clinical", "CLIN", "--clinical-key", "patient_id", "--clinical-cols", "patient_id"], "--clinical-key"),
    (TRAIN + ["--clinical", "CLIN", "--clinical-from-name", "(?P<age>\\d+)"], "not both"),
    (TRAIN + ["--clinical-from-name", "(?P<age"], "--clinical-from-name"),
    (TRAIN + ["--clinical-from-name", "age\\d+"], "named groups"),
    (TRAIN + ["--clinical-from-name", "_age(?P<age>\\d+)", "--clinical-cols", "bmi"], "bmi"),
    (TRAIN + ["--fusion", "nope"], "--fusion"),
    (TRAIN + ["--fusion", "late"], "--fusion late"),
    (TRAIN + ["--clinical-cols", "Age"], "without a table"),
    (TRAIN + ["--fusion", "late", "--clinical-from-name", "_age(?P<age>\\d+)", "--clinical-mlp", "0"], "mlp"),
    (TRAIN + ["--fusion", "late", "--clinical-from-name", "_age(?P<age>\\d+)", "--batch-size", "1"], "--batch-size 2"),
    (TRAIN + ["--clinical", "CLIN", "--clinical-key", "patient_id", "--allow-leaky-column", "BMI"], "--clinical-cols"),
    (TRAIN + ["--clinical-from-name", "_age(?P<age>\\d+)", "--allow-leaky-column", "BMI"], "--allow-leaky-column"),
    (TRAIN + ["--set", "clinical.leak_threshold=0"], "leak_threshold"),
    (["evaluate", "RUN", "--importance-repeats", "-1"], "--importance-repeats"),
    (["predict", "RUN", "FILE", "--clinical", "CLIN"], "fuses no clinical data"),
    (["evaluate", "RUN", "--clinical", "CLIN"], "fuses no clinical data"),
    (["train", "--data", "MISSING", "--out", "MISSING"], "does not exist"),
    (["train", "--data", "UTF16", "--out", "MISSING"], "UTF-8"),
    (["train", "--data", "BINARY", "--out", "MISSING"], "UTF-8"),
    (["train", "--data", "DATA", "--out", "FILE"], "FILE"),
    (["train", "--data", "DATA", "--out", "RO"], "RO"),
    (["train", "--out", "MISSING", "--resume"], "--resume"),
    (["train", "--out", "RUN", "--resume", "--lr", "0.1"], "--lr"),
    (["train", "--data", "DATA", "--out", "RUN"], "already holds a run"),
    (["evaluate", "MISSING"], "not found"),
    (["evaluate", "RUN", "--split", "nope"], "nope"),
    (["evaluate", "RUN", "--checkpoint", "nope"], "nope"),
    (["evaluate", "RUN", "--device", "nope"], "nope"),
    (["evaluate", "RUN", "--data", "MISSING"], "does not exist"),
    (["predict", "MISSING", "x.png"], "not found"),
    (["serve", "RUN", "--port", "70000"], "--port"),
    (["serve", "RUN", "--port", "abc"], "--port"),
    (["serve", "MISSING"], "not found"),
    (["serve", "RUN", "--host", "0.0.0.0"], "--token-file"),
    (["serve", "RUN", "--token-file", "MISSING"], "not found"),
    (["serve", "RUN", "--token-file", "FILE"], "at least 16 characters"),
    (["serve", "RUN", "--no-auth", "--token-file", "FILE"], "--no-auth"),
    (["serve", "RUN", "--max-upload-mb", "0"], "--max-upload-mb"),
    (["serve", "RUN", "--max-batch", "0"], "--max-batch"),
    (["serve", "RUN", "--methods", "nope"], "nope"),
    (["serve", "RUN", "--checkpoint", "nope"], "nope"),
    (["serve", "RUN", "--device", "nope"], "nope"),
    (EXPLAIN + ["--batch-size", "0"], "--batch-size"),
    (EXPLAIN + ["--limit", "-3"], "--limit"),
    (EXPLAIN + ["--limit", "0"], "--limit"),
    (EXPLAIN + ["--overlays", "-1"], "--overlays"),
    (EXPLAIN + ["--grid", "-1"], "--grid"),
    (EXPLAIN + ["--methods", "nope"], "nope"),
    (EXPLAIN + ["--methods", ""], "method"),
    (EXPLAIN + ["--target", "nope"], "nope"),
    (EXPLAIN + ["--combine", "nope"], "nope"),
    (EXPLAIN + ["--score", "nope"], "nope"),
    (EXPLAIN + ["--precision", "fp16"], "precision='fp16' is not one of fp32, bf16"),
    (EXPLAIN + ["--layers", "nope"], "nope"),
    (EXPLAIN + ["--split", "nope"], "nope"),
    (LOCALIZE + ["--tolerance", "-1"], "--tolerance"),
    (LOCALIZE + ["--smooth", "-1"], "--smooth"),
    (LOCALIZE + ["--percentile", "100"], "--percentile"),
    (LOCALIZE + ["--batch-size", "0"], "--batch-size"),
    (LOCALIZE + ["--annotation-size", "0"], "--annotation-size"),
    (LOCALIZE + ["--methods", "nope"], "nope"),
    (LOCALIZE + ["--target", "true"], "true"),
    (LOCALIZE + ["--border", "0.5"], "--border"),
    (LOCALIZE + ["--corner", "0"], "--corner"),
    (SEGMENT + ["--epochs", "0"], "--epochs"),
    (SEGMENT + ["--batch-size", "0"], "--batch-size"),
    (SEGMENT + ["--image-size", "100"], "--image-size"),
    (SEGMENT + ["--lr", "nan"], "--lr"),
    (SEGMENT + ["--val-fraction", "1"], "--val-fraction"),
    (SEGMENT + ["--encoder", "nope"], "nope"),
    (SEGMENT + ["--augment", "nope"], "nope"),
    (SEGMENT + ["--device", "nope"], "nope"),
    (["segment", "train", "--data", "MISSING", "--out", "MISSING"], "does not exist"),
    (["segment", "train", "--data", "IMAGES", "--out", "MISSING"], "pairs.csv"),
    (["segment", "train", "--data", "SEGDATA", "--out", "RUN"], "already holds a run"),
    (SEGPREDICT, "not a segmentation run"),
    (["segment", "predict", "MISSING", "--data", "IMAGES", "--out", "MISSING"], "not a segmentation run"),
    (SEGPREDICT + ["--threshold", "1"], "--threshold"),
    (SEGPREDICT + ["--batch-size", "0"], "--batch-size"),
    (SEGPREDICT + ["--run", "FILE"], "not a classifier run"),
    (SEGPREDICT + ["--run", "RUN", "--split", "nope"], "no images in split 'nope'"),
    (["localize", "RUN", "--annotations", "BOXES", "--format", "nope"], "nope"),
    (["localize", "RUN", "--annotations", "MISSING", "--format", "nih"], "not found"),
    (LOCALIZE + ["--threshold", "nope"], "--threshold"),
    (LOCALIZE + ["--threshold", "tuned", "--tune-on", "test"], "--tune-on"),
    (LOCALIZE + ["--iou-count", "nope"], "--iou-count"),
    (LOCALIZE + ["--prob-cutoff", "1.5"], "--prob-cutoff"),
    (LOCALIZE + ["--prob-cutoff", "nan"], "--prob-cutoff"),
    (LOCALIZE + ["--bootstrap", "-1"], "--bootstrap"),
    (LOCALIZE + ["--reader2", "MISSING"], "--reader2"),
    (LOCALIZE + ["--reader2", "BOXES", "--reader2-format", "nope"], "nope"),
    (LOCALIZE + ["--reader2-format", "nih"], "--reader2"),
    (["evaluate", "RUN", "--bootstrap", "-1"], "--bootstrap"),
    (CYCLE + ["--cycles", "0"], "--cycles"),
    (CYCLE + ["--strength", "1.5"], "--strength"),
    (CYCLE + ["--strength", "nan"], "--strength"),
    (CYCLE + ["--emphasis", "nope"], "nope"),
    (CYCLE + ["--epochs", "0"], "--epochs"),
    (CYCLE + ["--train-last", "-1"], "--train-last"),
    (CYCLE + ["--batch-size", "0"], "--batch-size"),
    (CYCLE + ["--lr", "-1"], "--lr"),
    (CYCLE + ["--method", "nope"], "nope"),
    (CYCLE, "not a segmentation run"),
    (["cycle", "RUN", "--data", "DATA", "--lung-model", "RUN", "--out", "MISSING"], "not a segmentation run"),
    (["cycle", "MISSING", "--data", "DATA", "--lung-model", "RUN", "--out", "MISSING"], "not found"),
    (["cycle", "RUN", "--data", "FILE", "--lung-model", "RUN", "--out", "MISSING"], "not a folder"),
    (["demo", "--epochs", "0", "--out", "MISSING"], "--epochs"),
    (["demo", "--data", "MISSING", "--out", "MISSING"], "not found"),
    (["cache", "clear", "--older-than", "soon"], "soon"),
    (TUNE + ["--trials", "-1"], "--trials"),
    (TUNE + ["--epochs", "0"], "--epochs"),
    (TUNE + ["--image-size", "0"], "--image-size"),
    (TUNE + ["--select", "nope"], "nope"),
    (TUNE + ["--model", "nope"], "nope"),
    (TUNE + ["--sampler", "nope"], "nope"),
    (TUNE + ["--pruner-patience", "-1"], "--pruner-patience"),
    (TUNE + ["--startup-trials", "-1"], "--startup-trials"),
    (TUNE + ["--storage", "nope://x"], "storage"),
    (TUNE + ["--storage", "sqlite:////proc/xraylens/study.db"], "--storage"),
    (TUNE + ["--storage", "postgresql+psycopg2://u:secret@127.0.0.1:1/db"], "storage"),
    (TUNE + ["--space", "MISSING"], "--space"),
    (TUNE + ["--space", "FILE"], "--space"),
    (TUNE + ["--space", "BINARY"], "--space"),
    (TUNE + ["--set", "train.nope=1"], "nope"),
    (TUNE + ["--device", "nope"], "nope"),
    (TUNE + ["--out", "FILE"], "FILE"),
    (["tune", "--data", "MISSING", "--trials", "1", "--study", "s", "--out", "MISSING"], "does not exist"),
    (["tune", "--data", "DATA", "--trials", "1", "--out", "MISSING"], "--study"),
    (SANITY + ["--limit", "0"], "--limit"),
    (SANITY + ["--batch-size", "0"], "--batch-size"),
    (SANITY + ["--threshold", "2"], "--threshold"),
    (SANITY + ["--threshold", "nan"], "--threshold"),
    (SANITY + ["--label-epochs", "0"], "--label-epochs"),
    (SANITY + ["--methods", "nope"], "nope"),
    (SANITY + ["--layers", "nope"], "nope"),
    (["sanity", "MISSING", "--out", "MISSING"], "not found"),
    (AUDIT + ["--limit", "0"], "--limit"),
    (AUDIT + ["--batch-size", "0"], "--batch-size"),
    (AUDIT + ["--border", "0.7"], "--border"),
    (AUDIT + ["--corner", "0"], "--corner"),
    (AUDIT + ["--flip-margin", "2"], "--flip-margin"),
    (AUDIT + ["--energy-factor", "0"], "--energy-factor"),
    (AUDIT + ["--masks", "MISSING"], "not found"),
    (AUDIT + ["--methods", "nope"], "nope"),
    (["audit", "MISSING", "--out", "MISSING"], "not found"),
    (CROSSVAL + ["--folds", "1"], "--folds"),
    (CROSSVAL + ["--folds", "50"], "--folds 50"),
    (CROSSVAL + ["--modes", "none,bogus"], "unknown mode"),
    (CROSSVAL + ["--modes", "none,none"], "twice"),
    (CROSSVAL + ["--modes", ","], "--modes"),
    (CROSSVAL + ["--modes", "late"], "need a clinical table"),
    (CROSSVAL + ["--merge-classes", "sick"], "NEW=OLD"),
    (CROSSVAL + ["--merge-classes", "sick=PNEUMONIA,COVID"], "COVID"),
    (CROSSVAL + ["--merge-classes", "all=NORMAL,PNEUMONIA"], "single class"),
    (CROSSVAL + ["--merge-classes", "a=NORMAL;b=NORMAL"], "two merges"),
    (CROSSVAL + ["--image-size", "7x9"], "--image-size"),
    (CROSSVAL + ["--set", "data.splits_file=x.csv"], "data.splits_file"),
    (CROSSVAL + ["--set", "data.val_fraction=0"], "val_fraction"),
    (CROSSVAL + ["--out", "FILE"], "FILE"),
    (TRAIN + ["--augment", "cat_elastic", "--in-chans", "3"], "in_chans=2"),
    (TRAIN + ["--set", "data.enhance=sharpen"], "sharpen"),
    (TRAIN + ["--set", "data.elastic_params=34"], "alpha:sigma"),
    (TRAIN + ["--set", "data.elastic_p=1.5"], "elastic_p"),
    (TRAIN + ["--image-size", "704x4"], "--image-size"),
    (TRAIN + ["--image-size", "1x2x3"], "image_size"),
    (TRAIN + ["--set", "data.merge_classes=x=nope"], "nope"),
    (TRAIN + ["--merge-classes", "abnormal"], "NEW=OLD"),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_values_are_one_line_errors(env, argv, words, capsys, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XRAYLENS_CACHE", str(cache))
    argv = [env.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert env.get(words, words) in lines[0], lines[0]
    # checked before decoding: no image reached the cache
    assert not cache.exists() or not any(cache.glob("*.npy")), sorted(os.listdir(cache))
    assert not Path(env["MISSING"]).exists(), "a failed command left an output folder behind"


def test_typed_paths_reach_the_config_as_typed(fixture_dir, tmp_path, monkeypatch):
    """`--data yes`, `--data null` and a path with ': ' in it are paths, not YAML."""
    monkeypatch.chdir(tmp_path)
    for name in ("yes", "null", "a: b"):
        shutil.copytree(fixture_dir / "pneumonia", tmp_path / name)
        cfg = RunConfig().apply({"data.path": Path(name)})
        assert cfg.data.path == name
    # end to end through the CLI: the run records the folder the user typed (made absolute)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "train",
                "--data",
                "a: b",
                "--model",
                "tinyvgg",
                "--image-size",
                "32",
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(run),
            ]
        )
    assert e.value.code == 0
    assert RunConfig.load(run / "config.yaml").data.path == str(tmp_path / "a: b")
