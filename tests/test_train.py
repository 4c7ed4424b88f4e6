"""Training, checkpoints, resume and evaluation end to end on the real fixture radiographs."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from xraylens.config import RunConfig
from xraylens.errors import XraylensError
from xraylens.evaluate.predict import predict_files
from xraylens.evaluate.run import evaluate_run
from xraylens.runs import open_run as load_run
from xraylens.runs import read_checkpoint as load_checkpoint
from xraylens.train.loop import _SimulatedCrash, train

ALL_METRICS = [
    "accuracy",
    "precision",
    "recall",
    "f1",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "f05",
    "f2",
    "qwk",
    "auc",
    "loss",
    "confusion_matrix",
    "per_class",
]


def _cfg(data, **over) -> RunConfig:
    cfg = RunConfig()
    cfg.override(
        [
            f"data.path={data}",
            "data.image_size=32",
            "model.name=tinyvgg",
            "train.epochs=2",
            "train.batch_size=8",
            "train.lr=1e-3",
            "train.device=cpu",
            "data.augment=flip,affine,jitter",
        ]
    )
    cfg.override([f"{k}={v}" for k, v in over.items()])
    return cfg


def _history(run):
    with open(run / "history.csv") as fh:
        return list(csv.DictReader(fh))


def test_train_then_evaluate_multiclass(fixture_dir, tmp_path):
    run = tmp_path / "knee"
    res = train(_cfg(fixture_dir / "knee_kl", **{"train.loss": "focal", "train.select": "qwk"}), run, progress=False)
    for f in [
        "config.yaml",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "history.csv",
        "metrics.json",
        "data_report.json",
    ]:
        assert (run / f).is_file(), f
    assert list((run / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert [int(r["epoch"]) for r in _history(run)] == [1, 2]
    cfg = RunConfig.load(run / "config.yaml")
    assert cfg.classes == ["0", "1", "2", "3", "4"] and cfg.train.loss == "focal"
    report = json.loads((run / "data_report.json").read_text())
    assert report["split_info"]["val"]["from"] == "train"  # fixture has no val folder: split from train
    assert 1 <= res.best_epoch <= 2

    m = evaluate_run(run, split="val")
    saved = json.loads((run / "metrics-val.json").read_text())
    for k in ALL_METRICS:
        assert k in saved, k
    assert saved["n_images"] == sum(report["splits"]["val"]["per_class"])
    assert 0.0 <= m["accuracy"] <= 1.0 and len(m["confusion_matrix"]) == 5
    # multi-class: sensitivity/specificity per class, one-vs-rest
    assert set(saved["per_class"]) == set(cfg.classes)
    assert all("sensitivity" in v and "specificity" in v for v in saved["per_class"].values())
    with open(run / "predictions-val.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == saved["n_images"] and set(rows[0]) >= {"id", "true", "pred", "prob", "p_0", "p_4"}


def test_binary_with_bce_reports_sensitivity_specificity(fixture_dir, tmp_path):
    run = tmp_path / "pneu"
    train(_cfg(fixture_dir / "pneumonia", **{"train.loss": "bce", "train.epochs": 1}), run, progress=False)
    m = evaluate_run(run, split="val")
    assert m["sensitivity"] is not None and m["specificity"] is not None
    cm = m["confusion_matrix"]  # rows true [NORMAL, PNEUMONIA]; positive = PNEUMONIA
    tp, fn, tn, fp = cm[1][1], cm[1][0], cm[0][0], cm[0][1]
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))


def test_checkpoint_is_weights_only_and_reloads_identically(fixture_dir, tmp_path):
    run = tmp_path / "r"
    train(_cfg(fixture_dir / "pneumonia", **{"train.epochs": 1}), run, progress=False)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["classes"] == ["NORMAL", "PNEUMONIA"]
    a, b = load_run(run, "last", device="cpu"), load_run(run, "last", device="cpu")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))


def test_killed_run_resumes_without_losing_an_epoch(fixture_dir, tmp_path):
    data = fixture_dir / "knee_kl"
    full, broken = tmp_path / "full", tmp_path / "broken"
    cfg = {"train.epochs": 3}
    train(_cfg(data, **cfg), full, progress=False)
    # 32 train images / batch 8 = 4 steps an epoch: die in the middle of epoch 2
    with pytest.raises(_SimulatedCrash):
        train(_cfg(data, **cfg), broken, progress=False, stop_after_batches=6)
    assert load_checkpoint(broken / "checkpoints" / "last.pt")["epoch"] == 1
    assert [int(r["epoch"]) for r in _history(broken)] == [1]
    with pytest.raises(XraylensError, match="--resume"):
        train(_cfg(data, **cfg), broken, progress=False)  # never silently overwrites
    train(_cfg(data, **cfg), broken, resume=True, progress=False)
    assert [int(r["epoch"]) for r in _history(broken)] == [1, 2, 3]
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(broken / "checkpoints" / "last.pt")
    assert b["epoch"] == 3
    # same data order and augmentation per epoch: the resumed run ends where the uninterrupted one did
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-5), k


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, fixture_dir):
    with pytest.raises(XraylensError, match="does not exist"):
        train(_cfg(fixture_dir / "knee_kl"), tmp_path / "none", resume=True, progress=False)


def test_predict_files_and_bad_file(fixture_dir, tmp_path):
    run = tmp_path / "p"
    train(_cfg(fixture_dir / "pneumonia", **{"train.epochs": 1}), run, progress=False)
    img = sorted((fixture_dir / "pneumonia" / "PNEUMONIA").iterdir())[0]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    res = predict_files(load_run(run, device="cpu"), [img, bad])
    assert res[0]["class"] in ("NORMAL", "PNEUMONIA")
    assert sum(res[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert "error" in res[1]


def test_cli_train_evaluate_predict_and_errors(fixture_dir, tmp_path):
    run = tmp_path / "cli"
    py = [sys.executable, "-m", "xraylens"]
    r = subprocess.run(
        py
        + [
            "train",
            "--data",
            str(fixture_dir / "pneumonia"),
            "--model",
            "tinyvgg",
            "--loss",
            "ce",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--out",
            str(run),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(py + ["evaluate", str(run), "--split", "val"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "sensitivity" in r.stdout and (run / "metrics-val.json").is_file()
    # --resume keeps the saved config: a finished 1-epoch run stays at 1 epoch unless --epochs says more
    r = subprocess.run(py + ["train", "--out", str(run), "--resume", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(_history(run)) == 1
    r = subprocess.run(
        py + ["train", "--out", str(run), "--resume", "--lr", "0.1", "--image-size", "64"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--lr" in r.stderr and "--image-size" in r.stderr, r.stderr
    r = subprocess.run(
        py + ["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    hist = _history(run)
    assert [int(h["epoch"]) for h in hist] == [1, 2]
    # the default cosine schedule is stretched over the new length: epoch 2 of 2 starts at half the lr
    assert float(hist[1]["lr"]) == pytest.approx(0.5 * float(hist[0]["lr"]), rel=1e-6)
    img = sorted((fixture_dir / "pneumonia" / "NORMAL").iterdir())[0]
    r = subprocess.run(py + ["predict", str(run), str(img)], capture_output=True, text=True)
    assert r.returncode == 0 and ("NORMAL" in r.stdout or "PNEUMONIA" in r.stdout)
    # user mistakes: one line on stderr, exit code 2, no traceback
    for args in (
        ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
        ["evaluate", str(tmp_path / "no-run")],
        ["train", "--data", str(fixture_dir / "pneumonia"), "--model", "nonet", "--out", str(tmp_path / "y")],
    ):
        r = subprocess.run(py + args, capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help_on_every_command():
    py = [sys.executable, "-m", "xraylens"]
    for cmd in ([], ["train"], ["evaluate"], ["predict"], ["demo"], ["models"], ["explain"], ["localize"]):
        r = subprocess.run(py + cmd + ["--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "Usage" in r.stdout, (cmd, r.stderr)


@pytest.fixture(autouse=True)
def _clean_cache_dir(tmp_path, monkeypatch):
    # each test gets its own preprocessing cache, so tests never see each other's arrays
    monkeypatch.setenv("XRAYLENS_CACHE", str(tmp_path / "cache"))
    yield
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_unreadable_training_files_are_skipped_counted_and_reported(fixture_dir, tmp_path, caplog):
    data = tmp_path / "pneumonia"
    shutil.copytree(fixture_dir / "pneumonia", data)
    (data / "NORMAL" / "broken.jpeg").write_text("not a jpeg")
    (data / "PNEUMONIA" / "empty.png").write_bytes(b"")
    with caplog.at_level("WARNING", logger="xraylens.train"):
        train(_cfg(data, **{"train.epochs": 1}), tmp_path / "run", progress=False)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    skipped = report["splits"]["train"]["skipped"] + report["splits"]["val"]["skipped"]
    assert sorted(s["id"] for s in skipped) == ["NORMAL/broken.jpeg", "PNEUMONIA/empty.png"]
    assert "unreadable file(s) skipped" in caplog.text


def _fixture_rows(fixture_dir):
    root = fixture_dir / "knee_kl"
    return [(p, c.name) for c in sorted(root.iterdir()) for p in sorted(c.iterdir())]


def test_train_and_evaluate_from_a_csv_manifest(fixture_dir, tmp_path):
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "age"])
        for p, c in _fixture_rows(fixture_dir):
            w.writerow([p, f"KL{c}", 50])
    run = tmp_path / "run"
    train(_cfg(manifest, **{"train.epochs": 1}), run, progress=False)
    assert RunConfig.load(run / "config.yaml").classes == ["KL0", "KL1", "KL2", "KL3", "KL4"]
    assert evaluate_run(run, split="val")["n_images"] > 0


def test_train_and_evaluate_from_a_medmnist_npz(fixture_dir, tmp_path):
    from PIL import Image

    rows = _fixture_rows(fixture_dir)
    imgs = np.stack([np.asarray(Image.open(p).convert("L").resize((28, 28))) for p, _ in rows])
    labels = np.array([int(c) for _, c in rows])[:, None]
    order = np.random.default_rng(0).permutation(len(rows))
    parts = {"train": order[:24], "val": order[24:32], "test": order[32:]}
    npz = tmp_path / "knee28.npz"
    arrays = {f"{k}_images": imgs[v] for k, v in parts.items()} | {f"{k}_labels": labels[v] for k, v in parts.items()}
    np.savez(npz, **arrays)
    run = tmp_path / "run"
    train(_cfg(npz, **{"train.epochs": 1, "data.image_size": 28}), run, progress=False)
    m = evaluate_run(run, split="test")
    assert m["n_images"] == 8 and len(m["confusion_matrix"]) == 5  # 40 images: 24 train, 8 val, 8 test


def test_config_mistakes_fail_before_any_decoding(fixture_dir, tmp_path, monkeypatch):
    import xraylens.data.cache as cache

    def no_decoding(*a, **k):
        raise AssertionError("data was loaded before the config was checked")

    monkeypatch.setattr(cache, "prepare_image", no_decoding)
    for over, words in (
        ({"model.name": "nonet"}, "unknown model"),
        ({"train.loss": "dice"}, "unknown loss"),
        ({"train.optimizer": "lion"}, "unknown optimizer"),
        ({"train.schedule": "poly"}, "schedule"),
        ({"train.select": "f1 ** 2"}, "selector"),
    ):
        with pytest.raises(XraylensError, match=words):
            train(_cfg(fixture_dir / "pneumonia", **over), tmp_path / "x", progress=False)
