"""Sanity checks and the shortcut audit, proven on planted shortcuts (issue 14).

Two tiny phantom models are trained once per session: one on phantoms whose "L" marker follows the
label in train/val (95 %) and not in test (50 %), one on the same phantoms without the marker. The
audit must flag the first and not the second; the sanity check must pass the trained model and see
its maps fall apart when the weights are randomised."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xraylens.cli import main
from xraylens.config import RunConfig
from xraylens.data.phantom import write_phantom
from xraylens.models.registry import create_model
from xraylens.trust import randomize
from xraylens.trust.audit import audit_run
from xraylens.trust.similarity import bootstrap_mean_ci, map_similarity

SIZE = 64


def _train(root: Path, marker) -> Path:
    from xraylens.train.loop import train

    data = write_phantom(root / "data", 200, 60, 100, size=SIZE, seed=1, marker=marker)
    cfg = RunConfig().apply(
        {
            "data.path": data,
            "model.name": "tinyvgg_bn",
            "data.image_size": SIZE,
            "train.epochs": 5,
            "train.batch_size": 16,
            "train.lr": 2e-3,
            "train.schedule": "cosine",
            "train.select": "accuracy",
            "data.augment": "jitter",
            "train.device": "cpu",
        }  # fmt: skip
    )
    train(cfg, root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="session")
def marker_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("marker"), (0.95, 0.95, 0.5))


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("clean"), None)


# ------------------------------------------------------------------------------ randomisation units


def test_units_run_head_first_and_reinit_is_seeded_and_leaves_the_model_alone():
    model = create_model("resnet18", num_classes=2, in_chans=1, image_size=64).eval()
    units = randomize.layer_units(model)
    # forward order, the stem's BatchNorm joined to its conv, the head last
    assert units[0] == "conv1+bn1" and units[-1] == "fc" and "layer4.1" in units
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = randomize.randomized_copy(model, seed=3)
    b = randomize.randomized_copy(model, seed=3)
    c = randomize.randomized_copy(model, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same weights
    assert not torch.equal(sa["layer4.1.conv2.weight"], sc["layer4.1.conv2.weight"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original untouched
    assert not torch.equal(sa["fc.weight"], before["fc.weight"])
    # the cascade's last step is the fully randomised model, with the same seeds per unit
    steps = [(u, {k: v.clone() for k, v in m.state_dict().items()}) for u, m in randomize.cascading(model, seed=3)]
    assert [u for u, _ in steps] == units[::-1]
    assert all(torch.equal(steps[-1][1][k], sa[k]) for k in sa if "num_batches" not in k)
    # independent: only that unit differs from the trained weights
    unit, m = next(randomize.independent(model, seed=3))
    changed = {k.split(".")[0] for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert unit == "fc" and changed == {"fc"}


def test_similarity_measures_on_known_maps():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    blobs = np.stack([np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 60.0) for cx, cy in rng.uniform(8, 40, (12, 2))])
    same = map_similarity(blobs, blobs.copy())
    for m in ("spearman", "ssim", "hog"):
        assert np.allclose(same[m], 1.0)
    noise = rng.random(blobs.shape)
    diff = map_similarity(blobs, noise)
    assert abs(diff["spearman"].mean()) < 0.1 and diff["ssim"].mean() < 0.2 and diff["hog"].mean() < 0.3
    # Spearman is a rank measure: a monotone transform of the map does not change it
    assert np.allclose(map_similarity(blobs, blobs**3)["spearman"], 1.0)
    # a constant map against a real one carries none of its structure; two constant maps are equal
    zeros = np.zeros_like(blobs)
    z = map_similarity(blobs, zeros, np.zeros(12, bool), np.ones(12, bool))
    assert np.all(z["spearman"] == 0) and np.all(z["hog"] == 0)
    assert np.all(map_similarity(zeros, zeros, np.ones(12, bool), np.ones(12, bool))["spearman"] == 1)
    lo, hi = bootstrap_mean_ci(np.arange(100.0), seed=1)
    assert (lo, hi) == bootstrap_mean_ci(np.arange(100.0), seed=1) and lo < 49.5 < hi


# ----------------------------------------------------------------------------------- planted shortcut


def test_audit_flags_the_planted_marker(marker_run, tmp_path):
    from xraylens.evaluate.run import evaluate_run
    from xraylens.runs import open_run

    run = open_run(marker_run, device="cpu")
    val, test = evaluate_run(run, split="val")["accuracy"], evaluate_run(run, split="test")["accuracy"]
    # the marker agrees with the label in val (95 %) and not in test (50 %): the model that read it falls
    assert val - test > 0.2, (val, test)
    s = audit_run(run, split="test", out=tmp_path / "audit")  # default methods: gradcam, layercam
    row = s.report["classes"]["all"]["corner_tl"]
    assert s.verdict == "SHORTCUT" and "corner_tl" in s.report["flagged_regions"], s.table()
    assert row["flip_rate"] - row["control_flip_rate"] >= 0.2, row  # flips when the marker is blanked
    assert row["score_change"] < -0.1
    # LayerCAM's energy sits on the marker (Grad-CAM's may not: see audit.DEFAULT_METHODS)
    assert row["energy"]["layercam"] >= 2 * row["area"], row
    assert row["energy_flipped"]["layercam"] >= 2 * row["area"], row
    # the other corners hold no marker: blanking them does next to nothing
    for c in ("corner_tr", "corner_bl", "corner_br"):
        assert s.report["classes"]["all"][c]["flip_rate"] < 0.1
    assert any("corner_tl" in e for e in s.evidence)
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["verdict"] == "SHORTCUT" and "rule" in saved
    rows = list(csv.DictReader((tmp_path / "audit" / "audit.csv").open()))
    assert {r["class"] for r in rows} == {"all", "normal", "opacity"}
    assert {r["region"] for r in rows} == {"border", "corner_tl", "corner_tr", "corner_bl", "corner_br"}
    assert "energy_flipped_layercam" in rows[0]


def test_audit_does_not_flag_a_model_trained_without_the_marker(clean_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["audit", str(clean_run), "--device", "cpu", "--out", str(tmp_path / "a")])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["verdict"] != "SHORTCUT" and report["flagged_regions"] == [], printed
    assert f"verdict: {report['verdict']}" in printed and "rule:" in printed
    tl = report["classes"]["all"]["corner_tl"]
    assert tl["flip_rate"] - tl["control_flip_rate"] < 0.1


def test_sanity_passes_a_trained_model_and_randomised_weights_change_its_maps(clean_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sanity", str(clean_run), "--methods", "gradcam,layercam", "--limit", "16", "--device", "cpu",
              "--out", str(tmp_path / "s")])  # fmt: skip
    assert e.value.code == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "s" / "sanity.json").read_text())
    units = summary["units_forward_order"]
    assert summary["threshold"] == 0.5 and "below 0.5" in summary["rule"]
    for method in ("gradcam", "layercam"):
        v = summary["verdicts"][method]
        assert v["verdict"] == "PASS", printed
        assert v["spearman_full_randomization"] < 0.5
        rows = [r for r in summary["rows"] if r["method"] == method and r["test"] == "cascading"]
        assert [r["step"] for r in rows] == list(range(len(units) + 1))
        assert rows[0]["spearman_mean"] == 1.0 and rows[0]["ssim_mean"] == 1.0
        # the randomised model's maps do not look like the trained one's: every measure drops
        for m in ("spearman", "ssim", "hog"):
            assert rows[-1][f"{m}_mean"] < 0.75, (method, m, rows[-1])
        assert any(r["test"] == "independent" for r in summary["rows"] if r["method"] == method)
        assert (tmp_path / "s" / f"sanity_{method}.png").stat().st_size > 5000
    lines = list(csv.DictReader((tmp_path / "s" / "sanity.csv").open()))
    assert len(lines) == 2 * (1 + 2 * len(units))
    assert "PASS" in printed and "< 0.5" in printed


def test_sanity_verdict_follows_the_stated_threshold_and_label_randomisation(clean_run, tmp_path):
    from xraylens.trust.sanity import sanity_run

    # a threshold no similarity can be under: the same maps now FAIL (the verdict is the rule, not a constant)
    s = sanity_run(clean_run, methods="gradcam", limit=8, threshold=-0.99, independent=False,
                   label_randomization=True, label_epochs=1, out=tmp_path / "s", device="cpu", plots=False)  # fmt: skip
    v = s.verdicts["gradcam"]
    assert v["verdict"] == "FAIL" and v["label_verdict"] == "FAIL"
    info = json.loads(s.json_path.read_text())["label_randomization"]
    manifest = list(csv.DictReader(open(info["manifest"])))
    train_rows = [r for r in manifest if r["split"] == "train"]
    # the training labels are a permutation: the class counts stay, about half the labels change
    truth = {Path(r["path"]).name: Path(r["path"]).parent.name for r in manifest}
    assert sorted(r["label"] for r in train_rows) == sorted(truth[Path(r["path"]).name] for r in train_rows)
    assert 0.3 < info["train_label_agreement"] < 0.7
    assert (Path(info["run"]) / "checkpoints" / "best.pt").is_file()
    assert any(r["test"] == "label" for r in s.rows)


# ------------------------------------------------------------------------------------- real images


def test_audit_and_sanity_on_real_radiographs(tiny_run, fixture_dir, tmp_path):
    """The real pneumonia fixture (tiny run): both commands run end to end and write their files."""
    from xraylens.trust.sanity import sanity_run

    a = audit_run(tiny_run, split="val", methods="gradcam", out=tmp_path / "a", device="cpu")
    assert a.n_images > 0 and a.verdict in ("OK", "WARN", "SHORTCUT")
    assert (tmp_path / "a" / "audit.csv").is_file()
    s = sanity_run(tiny_run, split="val", methods="gradcam", limit=4, out=tmp_path / "s", device="cpu")
    assert s.verdicts["gradcam"]["verdict"] in ("PASS", "FAIL") and s.plots[0].is_file()


def test_demo_reports_the_sanity_verdicts_and_the_audit(clean_run):
    """The demo's trust lines (run_demo calls them after localise, on its own loaded run)."""
    from xraylens.demo import _trust_lines
    from xraylens.runs import open_run

    run = open_run(clean_run, device="cpu")
    text = "\n".join(_trust_lines(run, "test", clean_run))
    assert "sanity check on 16 test images" in text and "< 0.5" in text
    assert "gradcam" in text and "layercam" in text and ("PASS" in text or "FAIL" in text)
    assert "shortcut audit on 64 test images: " in text
    verdict = json.loads((clean_run / "audit" / "audit.json").read_text())["verdict"]
    assert f"test images: {verdict}" in text
    assert (clean_run / "sanity" / "sanity.csv").is_file()


def test_localize_randomized_baseline_scores_each_method_on_a_randomised_copy(tiny_run, fixture_dir, tmp_path):
    """Real NIH boxes: randomized:<method> rows beside the baselines; the loaded model is left trained."""
    from xraylens.localize.run import localize_run
    from xraylens.runs import open_run

    run = open_run(tiny_run, device="cpu")
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    s = localize_run(run, annotations=fixture_dir / "cxr_bbox" / "BBox_List_256.csv", fmt="nih",
                     data=fixture_dir / "cxr_bbox" / "images", methods="gradcam,normgrad-conv3x3",
                     randomized_baseline=True, bootstrap=50, out=tmp_path, device="cpu")  # fmt: skip
    names = set(s.overall)
    assert {"randomized:gradcam", "randomized:normgrad-conv3x3", "baseline:center"} <= names
    rows = list(csv.DictReader((tmp_path / "localization.csv").open()))
    for m in ("gradcam", "randomized:gradcam"):
        assert len([r for r in rows if r["method"] == m]) == s.n_images
    # the randomised copy's maps differ from the trained model's on the same images
    peaks = {
        m: [(r["peak_x"], r["peak_y"]) for r in rows if r["method"] == m] for m in ("gradcam", "randomized:gradcam")
    }
    assert peaks["gradcam"] != peaks["randomized:gradcam"]
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in before.items())


def test_audit_with_real_lung_masks(tiny_run, fixture_dir, tmp_path):
    """Real chest films with their lung masks (fixture lung_seg): the lungs become a region of their own,
    compared with the border band; every flag carries a paired interval."""
    seg = fixture_dir / "lung_seg"
    s = audit_run(tiny_run, data=seg / "images", masks=seg / "masks", out=tmp_path, device="cpu")
    lungs = s.report["classes"]["all"]["lungs"]
    assert lungs["n"] == s.n_images == 8
    assert 0.1 < lungs["area"] < 0.7  # lungs cover a fair share of a frontal film
    assert all(0 <= e <= 1 for e in lungs["energy"].values())
    for row in s.report["classes"]["all"].values():
        lo, hi = row["flip_gap_ci"]
        assert lo <= row["flip_rate"] - row["control_flip_rate"] <= hi
    assert s.report["accuracy"] is None  # a plain folder has no labels
    assert "lungs" in {r["region"] for r in csv.DictReader((tmp_path / "audit.csv").open())}
    assert "interval" in s.report["rule"]


def test_audit_warns_about_a_region_that_flips_one_class_only():
    """Hand-built per-image records (known truth): 30 of 200 images are class 1 and blanking the top-left
    corner flips 15 of them, no control flips. Over all images the gap (7.5 %) is under the 10-point
    margin, so no SHORTCUT; the class-1 gap (50 %, interval clear of 0) must still come out as a WARN."""
    from types import SimpleNamespace

    from xraylens.trust.audit import _report

    n, names, methods = 200, ["border", "corner_tl"], ["gradcam"]
    label = np.r_[np.zeros(170, int), np.ones(30, int)]

    def records(flips_in_class1: int) -> dict[str, np.ndarray]:
        arr = {"label": label, "pred": label.copy(), "has_lungs": np.zeros(n, bool)}
        for r in names:
            flip = np.zeros(n, bool)
            if r == "corner_tl":
                flip[170 : 170 + flips_in_class1] = True
            arr |= {f"{r}:flip": flip, f"{r}:cflip": np.zeros(n, bool), f"{r}:correct": ~flip}
            arr |= {f"{r}:dscore": -0.5 * flip, f"{r}:cdscore": np.zeros(n)}
            arr[f"gradcam:{r}:energy"] = np.full(n, 0.35 if r == "border" else 0.02)
        return arr

    run = SimpleNamespace(classes=["0", "1"])
    areas = {"border": 0.34, "corner_tl": 0.024}
    rep = _report(run, records(15), names, methods, areas, True, 0.10, 2.0)
    assert rep["flagged_regions"] == [] and rep["verdict"] == "WARN", rep["evidence"]
    assert any(e.startswith("corner_tl, class 1 only (30 images)") for e in rep["evidence"]), rep["evidence"]
    clean = _report(run, records(0), names, methods, areas, True, 0.10, 2.0)
    assert clean["verdict"] == "OK", clean["evidence"]
