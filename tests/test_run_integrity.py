"""Run integrity: no silently wrong result, no mixed or lost run, runs usable from anywhere."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import tiny_config

import xraylens.runs as runs_mod
from xraylens.cli import app
from xraylens.config import RunConfig
from xraylens.demo import run_demo
from xraylens.errors import XraylensError
from xraylens.evaluate.run import evaluate_run
from xraylens.explain.run import explain_run
from xraylens.io import lock_dir
from xraylens.train.loop import train


@pytest.fixture(scope="module")
def pneu_run(tiny_run) -> Path:
    return tiny_run


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_unlabelled_images_have_no_true_class(pneu_run, fixture_dir, tmp_path):
    s = explain_run(
        pneu_run, fixture_dir / "cxr_bbox" / "images", methods="gradcam", out=tmp_path, device="cpu", overlays=2, grid=4
    )
    rows = _rows(s.index_path)
    assert len(rows) == 16 and all(r["true"] == "" for r in rows)
    assert {r["pred"] for r in rows} <= {"NORMAL", "PNEUMONIA"}


def test_overlays_show_every_class_and_keep_one_extension(pneu_run, tmp_path):
    s = explain_run(pneu_run, split="val", methods="gradcam", out=tmp_path, device="cpu", overlays=4)
    shown = [r for r in _rows(s.index_path) if r["overlay_gradcam"]]
    assert len(shown) == 4
    assert {r["true"] for r in shown} == {"NORMAL", "PNEUMONIA"}  # the cache is ordered by class
    for r in shown:
        name = Path(r["overlay_gradcam"]).name
        assert name.endswith(".png") and ".jpeg" not in name and ".png.png" not in name
        assert (tmp_path / r["overlay_gradcam"]).is_file()


def test_second_train_into_a_locked_run_fails_at_once(fixture_dir, tmp_path):
    out = tmp_path / "run"
    with lock_dir(out, "train"), pytest.raises(XraylensError, match="in use by another xraylens train"):
        train(tiny_config(fixture_dir / "pneumonia"), out, progress=False)
    assert not (out / "config.yaml").exists()  # the loser wrote nothing


def test_run_works_from_any_directory(fixture_dir, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    (tmp_path / "a" / "data").symlink_to(fixture_dir / "pneumonia", target_is_directory=True)
    train(tiny_config(Path("data")), Path("run"), progress=False)  # relative data and run paths
    assert Path(RunConfig.load(tmp_path / "a" / "run" / "config.yaml").data.path).is_absolute()
    monkeypatch.chdir(tmp_path / "b")
    m = evaluate_run(tmp_path / "a" / "run", split="val", device="cpu")
    assert m["n_images"] > 0


def test_every_option_has_help_and_a_default(fixture_dir):
    import typer.main

    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        for p in getattr(sub, "commands", {name: sub}).values():
            for param in p.params:
                if param.param_type_name != "option" or param.name == "help":
                    continue
                assert param.help, f"{name} {param.opts[0]} has no description"
                if param.default is None and not param.required:
                    assert "default" in param.help.lower() or "used like" in param.help, (
                        f"{name} {param.opts[0]}: say what happens when it is not given"
                    )


def test_demo_reuses_only_the_same_run_and_loads_its_model_once(tmp_path, fixture_dir, monkeypatch):
    out = tmp_path / "demo"
    run_demo(out, epochs=1, progress=False, device="cpu")
    last = out / "run" / "checkpoints" / "last.pt"
    stamp = last.stat().st_mtime_ns

    reads: list[str] = []
    real = runs_mod.read_checkpoint
    monkeypatch.setattr(runs_mod, "read_checkpoint", lambda p, *a, **k: reads.append(Path(p).name) or real(p, *a, **k))
    summary = run_demo(out, epochs=1, progress=False, device="cpu")  # same data and settings: reused
    assert last.stat().st_mtime_ns == stamp and "accuracy" in summary
    assert reads.count("best.pt") == 1  # evaluate, explain and localise share one loaded model

    with pytest.raises(XraylensError, match="train.epochs"):
        run_demo(out, epochs=2, progress=False, device="cpu")
    with pytest.raises(XraylensError, match="data.path"):
        run_demo(out, data=fixture_dir / "pneumonia", epochs=1, progress=False, device="cpu")
    run_demo(out, epochs=2, progress=False, device="cpu", force=True)
    assert RunConfig.load(out / "run" / "config.yaml").train.epochs == 2
