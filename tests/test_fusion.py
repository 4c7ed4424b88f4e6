"""Clinical fusion (models.fusion) end to end on the real osteoporosis fixture: every mode trains,
saves, reloads with the same outputs, evaluates (with permutation importance) and explains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xraylens.errors import XraylensError

COLS = "Age,Gender,BMI"


def _cfg(osteo, mode, **extra):
    from tests.conftest import tiny_config

    settings = {
        "clinical.file": str(osteo / "clinical.csv"),
        "clinical.key": "patient_id",
        "clinical.cols": COLS,
        "clinical.mode": mode,
        "train.batch_size": 4,
        **extra,
    }
    return tiny_config(osteo / "images", **settings)


@pytest.fixture(scope="module")
def runs(osteo, tmp_path_factory):
    from xraylens.train.loop import train

    root = tmp_path_factory.mktemp("fusion")
    out = {}
    for mode, extra in (("none", {}), ("early", {}), ("late", {"clinical.mlp_hidden": [8]})):
        out[mode] = train(_cfg(osteo, mode, **extra), root / mode, progress=False).run_dir
    return out


@pytest.mark.parametrize("mode", ["none", "early", "late"])
def test_mode_trains_saves_reloads_evaluates_explains(runs, mode):
    from xraylens.evaluate.run import evaluate_run
    from xraylens.explain.run import explain_run
    from xraylens.models.fusion import FusedModel
    from xraylens.runs import ce_loss, open_run

    run_dir = runs[mode]
    run = open_run(run_dir, device="cpu")
    assert isinstance(run.model, FusedModel) == (mode != "none")
    # clinical.json is the fitted preprocessing; the checkpoint carries the same
    saved = json.loads((run_dir / "clinical.json").read_text())
    assert [c["name"] for c in saved["columns"]] == COLS.split(",")
    if mode != "none":
        assert run.clinical.feature_names == saved["features"]
    # reload: the reloaded model on val gives the loss training measured in memory (best = epoch 1)
    _, val = run.load_split(None, "val")
    assert (val.clinical is not None) == (run.clinical is not None)
    logits = run.predict_logits(val)
    trained = json.loads((run_dir / "metrics.json").read_text())["val"]["loss"]
    assert ce_loss(logits, val.labels) == pytest.approx(trained, abs=1e-5)
    again = open_run(run_dir, device="cpu").predict_logits(val)
    assert np.array_equal(logits, again)

    m = evaluate_run(run, split="val", bootstrap=0, importance_repeats=2)
    assert 0.0 <= m["accuracy"] <= 1.0 and m["n_images"] == len(val.labels)
    if mode == "none":
        assert "clinical_importance" not in m
    else:
        rows = m["clinical_importance"]
        assert [r["column"] for r in rows] == COLS.split(",")
        assert all(np.isfinite(r["accuracy_drop_mean"]) and r["repeats"] == 2 for r in rows)
        assert (run_dir / "clinical_importance-val.csv").is_file()

    s = explain_run(run, split="val", methods="gradcam,scorecam", out=run_dir / "cams", overlays=1, grid=0)
    maps = np.load(s.maps_path)
    for meth in ("gradcam", "scorecam"):
        a = maps[meth].astype(np.float32)
        assert a.shape == (len(val.labels), 32, 32)
        assert np.isfinite(a).all()


def test_fused_outputs_depend_on_clinical_and_cams_follow_the_bound_rows(runs):
    """The clinical values change the output (late and early), and the CAM engine sees the bound rows."""
    from xraylens.explain.engine import CamEngine
    from xraylens.models.fusion import bind_clinical
    from xraylens.runs import open_run

    for mode in ("early", "late"):
        run = open_run(runs[mode], device="cpu")
        _, val = run.load_split(None, "val")
        x = run.inputs.to_model(torch.from_numpy(np.array(val.images))[:, None])
        z = torch.from_numpy(val.clinical)
        with torch.no_grad():
            a, b = run.model(x, z), run.model(x, z + 3.0)
        assert not torch.allclose(a, b), mode
        with bind_clinical(run.model, z), torch.no_grad():
            assert torch.equal(run.model(x), a)  # image-only call with the bound rows
        with CamEngine(run.model) as engine, bind_clinical(run.model, z):
            res = engine(x, ["gradcam"])
        assert torch.allclose(res.logits, a, atol=1e-6)
        with pytest.raises(XraylensError, match="clinical"):
            run.model(x)  # nothing bound, nothing passed: a clear error, not a silent zero vector


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_wrappers_fit_any_zoo_backbone(name):
    """early widens the stem conv, late replaces the head; CAM layers resolve inside the backbone."""
    from xraylens.explain.engine import CamEngine
    from xraylens.models.fusion import fuse_model
    from xraylens.models.registry import create_model

    x, z = torch.randn(2, 1, 32, 32), torch.randn(2, 5)
    for mode in ("early", "late"):
        base = create_model(name, num_classes=3, in_chans=1)
        model = fuse_model(base, mode, 5, mlp_hidden=(4,) if mode == "late" else ()).eval()
        with torch.no_grad():
            assert model(x, z).shape == (2, 3)
        rebuilt = fuse_model(
            create_model(name, num_classes=3, in_chans=1), mode, 5, mlp_hidden=(4,) if mode == "late" else ()
        )
        rebuilt.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.equal(rebuilt.eval()(x, z), model(x, z))
        with CamEngine(model) as engine, model.bind(z):
            maps = engine(x, ["gradcam"]).maps["gradcam"]
        assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all()


def test_bce_training_selects_best_epoch_by_f2(osteo, tmp_path):
    """Seed 004's recipe: BCE loss and the best epoch chosen by F2 on validation."""
    from xraylens.train.loop import train

    r = train(_cfg(osteo, "late", **{"train.loss": "bce", "train.select": "f2", "train.epochs": 2}), tmp_path / "r",
              progress=False)  # fmt: skip
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["select"] == "f2"
    assert metrics["best_score"] == pytest.approx(metrics["val"]["f2"])
    assert r.best_epoch in (1, 2)


def test_localize_explains_a_fused_run_and_refuses_faithfulness(runs, tmp_path):
    """localize goes through the same engine with the clinical rows bound; deletion/insertion curves
    (which mix images' perturbed copies in a batch) are refused for fused runs."""
    import csv

    from xraylens.localize.run import localize_run
    from xraylens.runs import open_run

    run = open_run(runs["late"], device="cpu")
    _, val = run.load_split(None, "val")
    boxes = tmp_path / "boxes.csv"
    with boxes.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        for i in val.ids:  # a box in the middle of every val image (original pixels)
            w.writerow([i.split("/")[-1], "joint", 100, 100, 200, 200])
    s = localize_run(run, annotations=boxes, fmt="nih", split="val", out=tmp_path / "loc", bootstrap=0)
    assert s.n_annotated == len(val.ids) and s.csv_path.is_file()
    assert 0.0 <= s.overall["gradcam"] <= 1.0
    with pytest.raises(XraylensError, match="faithfulness"):
        localize_run(run, annotations=boxes, fmt="nih", split="val", out=tmp_path / "f", faithfulness=True)


@pytest.fixture(scope="module")
def clinical_only_task(tmp_path_factory):
    """Phantom images that carry no label information (all drawn as `normal`, then assigned to class
    a or b by a coin) and a clinical CSV in which `age` alone decides the class; `noise` is noise."""
    import csv
    import random

    from xraylens.data.phantom import write_phantom

    root = tmp_path_factory.mktemp("clinical_only")
    ph = write_phantom(root / "phantom", n_train=96, n_val=48, n_test=0, size=32, seed=3)
    rng = random.Random(0)
    rows = []
    for split in ("train", "val"):
        imgs = sorted((ph / split / "normal").glob("*.png"))
        labels = [i % 2 for i in range(len(imgs))]
        rng.shuffle(labels)
        for img, y in zip(imgs, labels, strict=True):
            d = root / "set" / split / "ab"[y]
            d.mkdir(parents=True, exist_ok=True)
            (d / img.name).symlink_to(img)
            rows.append((img.stem, 35 + 30 * y + rng.gauss(0, 5), rng.gauss(0, 1)))  # classes 6 sd apart
    with (root / "clinical.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("id", "age", "noise"), *rows])
    return root


@pytest.mark.parametrize("mode", ["early", "late"])
def test_fusion_learns_a_label_only_the_clinical_table_carries(clinical_only_task, mode, tmp_path):
    """Both modes must fit a label that one clinical column determines (the image is uninformative) in
    a few epochs. Late fusion used to score at chance here: the raw clinical values entered the new
    head beside 400 image features, and ~30 Adam steps never moved their weights off the random init."""
    from xraylens.config import RunConfig
    from xraylens.runs import open_run
    from xraylens.train.loop import train

    root = clinical_only_task
    cfg = RunConfig().apply({
        "data.path": str(root / "set"), "model.name": "tinyvgg_bn", "data.image_size": 32,
        "train.epochs": 4, "train.batch_size": 8, "train.device": "cpu",
        "clinical.file": str(root / "clinical.csv"), "clinical.key": "id", "clinical.cols": "age,noise",
        "clinical.mode": mode, "clinical.allow_leaky": ["age"],  # it is the label's only source, on purpose
    })  # fmt: skip
    run_dir = train(cfg, tmp_path / mode, progress=False).run_dir
    run = open_run(run_dir, device="cpu")
    for split in ("train", "val"):
        _, s = run.load_split(None, split)
        acc = float((run.predict_logits(s).argmax(1) == s.labels).mean())
        assert acc >= 0.9, f"{mode} fusion: {split} accuracy {acc:.3f} on a label the clinical table determines"


@pytest.mark.parametrize("mode", ["early", "late"])
def test_sanity_and_audit_explain_a_fused_run_with_its_clinical_rows(runs, mode, tmp_path):
    """The trust checks go through the same engine with each image's own clinical rows bound: the trained
    maps equal explain's, and the randomised copies (deep copies of the wrapper) bind them too."""
    from xraylens.explain.run import explain_run
    from xraylens.runs import open_run
    from xraylens.trust.audit import audit_run
    from xraylens.trust.maps import cam_maps
    from xraylens.trust.sanity import sanity_run

    run = open_run(runs[mode], device="cpu")
    _, val = run.load_split(None, "val")
    ms = cam_maps(run, run.model, val.images, ["gradcam"], clinical=val.clinical)
    s = explain_run(run, split="val", methods="gradcam", out=tmp_path / "cams", overlays=0, grid=0)
    assert np.allclose(ms.maps["gradcam"], np.load(s.maps_path)["gradcam"].astype(np.float32), atol=2e-3)
    with pytest.raises(XraylensError, match="clinical"):
        cam_maps(run, run.model, val.images, ["gradcam"])  # nothing bound: an error, never a zero vector

    sanity = sanity_run(run, split="val", methods="gradcam", out=tmp_path / "sanity", plots=False, independent=False)
    rows = json.loads(sanity.json_path.read_text())["rows"]
    step0 = [r for r in rows if r["test"] == "cascading" and r["step"] == 0]
    assert step0 and step0[0]["spearman_mean"] == pytest.approx(1.0)
    assert len([r for r in rows if r["test"] == "cascading"]) > 2  # every randomised step was explained

    audit = audit_run(run, split="val", out=tmp_path / "audit")
    assert audit.n_images == len(val.labels) and audit.verdict in ("OK", "WARN", "SHORTCUT")
    assert audit.json_path.is_file()
