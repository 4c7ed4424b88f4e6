"""bench/gpu_suite.py: the tiny CPU run exercises every section; on a GPU the full goals' checks run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", BENCH / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod
    spec.loader.exec_module(mod)
    return mod


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_tiny_cpu_run_writes_the_table_and_json(suite, fixture_dir, tmp_path, capsys):
    out = tmp_path / "suite.json"
    rc = suite.main(
        ["--tiny", "--device", "cpu", "--data-root", str(fixture_dir.parent), "--cache-dir", str(tmp_path / "c")]
        + ["--json", str(out)]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["meta"]["tiny"] and r["meta"]["image_size"] == 32 and "--tiny" in r["meta"]["command"]
    rows = r["train"]
    assert [(Path(t["data"]).name, t["model"]) for t in rows] == [
        (d, m) for d in ("knee_kl", "pneumonia") for m in ("resnet18", "resnet50", "densenet121", "efficientnet_b0")
    ]
    for t in rows:
        assert t["real_img_s"] > 0 and t["synthetic_img_s"] > 0 and t["placement"] == "mmap"
        assert t["ratio"] == pytest.approx(t["real_img_s"] / t["synthetic_img_s"], rel=0.02)
    cam = r["cam"]
    assert cam["installed"] == {"pytorch-grad-cam": _installed("pytorch_grad_cam"), "captum": _installed("captum")}
    assert cam["ours_img_s"] > 0 and cam["ours_bf16_img_s"] > 0 and cam["forward_img_s"] > 0
    assert cam["ours_vs_forward"] == pytest.approx(cam["ours_img_s"] / cam["forward_img_s"], rel=0.02)
    mem = r["memory"]
    assert mem["images"] == 12 and "rss_growth" in mem and "allocated_growth" not in mem
    goals = {g["goal"]: g for g in r["goals"]}
    assert len(goals) == 8 + 3
    assert goals["GPU memory growth over 12 images"]["status"] == "SKIP (CUDA only)"
    for g in r["goals"]:
        if isinstance(g["measured"], float):  # a goal with a figure is judged by it
            ok = g["measured"] >= float(g["target"].strip(">= x"))
            assert g["status"] == ("PASS" if ok else "FAIL")
    table = capsys.readouterr().out
    assert "goal" in table and "train knee_kl densenet121: real/synthetic" in table and str(out) in table
    assert all(g["status"].split()[0] in table for g in r["goals"])


def test_missing_peers_are_reported_not_fatal(suite, monkeypatch):
    real = suite._optional
    monkeypatch.setattr(suite, "_optional", lambda name: None if name != "numpy" else real(name))
    cam = suite.cam_benchmark(device=torch.device("cpu"), model_name="resnet18", size=32, batch=2, iters=1, warmup=0)
    assert cam["installed"] == {"pytorch-grad-cam": False, "captum": False}
    assert cam["ours_vs_pgc"] is None and "pgc_img_s" not in cam and "captum_img_s" not in cam
    rows = suite.goals({"train": [], "cam": cam, "memory": {"images": 1, "rss_growth": 0}})
    assert rows[0] == {
        "goal": "Grad-CAM ours/pytorch-grad-cam",
        "measured": "not installed",
        "target": ">= 5x",
        "status": "SKIP",
    }
    result = {
        "meta": {"date": "d", "machine": "m", "device": "cpu", "torch": "t", "command": "c", "tiny": True},
        "train": [],
        "cam": cam,
        "memory": {"images": 1, "rss_after_first": 0, "rss_after_last": 0, "rss_growth": 0},
        "goals": rows,
    }
    assert "pytorch-grad-cam Grad-CAM                     not installed" in suite.format_report(result)


def test_cuda_refused_without_a_gpu(suite):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal is for machines without one")
    with pytest.raises(SystemExit, match="no CUDA device visible"):
        suite.main(["--device", "cuda"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the GPU goals (memory, placement)")
def test_small_cuda_run_checks_every_goal(suite, fixture_dir, tmp_path):
    out = tmp_path / "suite.json"
    args = ["--device", "cuda", "--data-root", str(fixture_dir.parent), "--cache-dir", str(tmp_path / "c")]
    args += ["--tiny", "--image-size", "64", "--mem-images", "64", "--json", str(out)]
    assert suite.main(args) == 0
    r = json.loads(out.read_text())
    assert all(t["placement"] == "gpu" for t in r["train"])
    mem = r["memory"]
    assert "allocated_growth" in mem and mem["images"] == 64
    status = {g["goal"]: g["status"] for g in r["goals"]}
    assert status["GPU memory growth over 64 images (bytes)"] in ("PASS", "FAIL")
