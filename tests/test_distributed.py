"""torchrun on the CPU (gloo, 2 processes): DDP training equals one process on the same global batch,
a killed job resumes to the same weights, and sharded explain / localize write exactly what one
process writes. Real fixture radiographs; the torchrun jobs are shared by the tests (startup is slow).

What must match, and why: with `train.batch_size` per process, 2 ranks x 2 images average their
gradients over the same 4 images a single process with batch 4 sees (same seeded permutation), so the
weights agree up to float summation order (tolerance 1e-5; the model, tinyvgg, has no BatchNorm and
no dropout, and augmentation is off, since those draw per-rank randomness). Explanations are
per-image and each rank runs whole batches of the single-process order, so maps are bit-identical.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xraylens import distributed

TOL = 1e-5  # |w_ddp - w_single|, float summation order of the gradient all-reduce
TRAIN = ["--model", "tinyvgg", "--image-size", "32", "--epochs", "2", "--batch-size", "2", "--lr", "0.01"]
TRAIN += ["--augment", "none", "--device", "cpu", "--quiet"]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", XRAYLENS_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("XRAYLENS_KILL_AT", None)
    return env


def _free_port() -> int:
    # torchrun's --master-port 0 leaves the workers waiting for each other: give it a free port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    cmd += ["-m", "xraylens", *args]
    # a timeout, not a hang: a job whose rank died must end on its own (torchrun stops the others)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def jobs(fixture_dir, tmp_path_factory):
    """One killed-and-resumed 2-process training, then 2-process explain and localize of it; the
    epoch-1 checkpoint of the killed job is kept for comparison."""
    tmp = tmp_path_factory.mktemp("ddp")
    env = _env(tmp / "cache")
    run = tmp / "ddp-run"
    data = ["--data", str(fixture_dir / "knee_kl")]  # 35 train images (8 steps of 4), 5 val: shares 3 + 2

    t0 = time.perf_counter()
    killed = _torchrun(["train", *data, *TRAIN, "--out", str(run)], tmp, {**env, "XRAYLENS_KILL_AT": "epoch1@1"})
    killed_s = time.perf_counter() - t0
    epoch1 = _weights(run / "checkpoints" / "last.pt") if (run / "checkpoints" / "last.pt").is_file() else None
    history1 = _history(run) if (run / "history.csv").is_file() else []
    resumed = _torchrun(["train", "--out", str(run), "--resume", "--quiet"], tmp, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    images, boxes = fixture_dir / "cxr_bbox" / "images", fixture_dir / "cxr_bbox" / "BBox_List_256.csv"
    cam = ["--methods", "gradcam,gradcam++", "--batch-size", "3", "--device", "cpu", "--data", str(images)]
    explain = _torchrun(
        ["explain", str(run), *cam, "--overlays", "5", "--grid", "9", "--out", str(tmp / "ex")], tmp, env
    )
    assert explain.returncode == 0, explain.stderr[-3000:]
    loc = ["--annotations", str(boxes), "--format", "nih", "--out", str(tmp / "loc")]
    localize = _torchrun(["localize", str(run), *cam, *loc], tmp, env)
    assert localize.returncode == 0, localize.stderr[-3000:]
    return {
        "tmp": tmp,
        "run": run,
        "data": fixture_dir / "knee_kl",
        "images": images,
        "boxes": boxes,
        "killed": killed,
        "killed_s": killed_s,
        "epoch1": epoch1,
        "history1": history1,
        "resumed": resumed,
        "explain": explain,
        "localize": localize,
    }


@pytest.fixture(scope="module")
def single(jobs):
    """The same training in one process with the same global batch (2 ranks x 2 = 4); epoch-1 weights
    are read back from last.pt after that epoch."""
    from tests.conftest import tiny_config
    from xraylens.train.loop import train

    run = jobs["tmp"] / "single-run"
    cfg = tiny_config(jobs["data"], **{"train.epochs": 2, "train.batch_size": 4, "train.lr": 0.01})
    cfg.apply({"data.augment": "none", "data.cache_dir": str(jobs["tmp"] / "cache")})
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    try:
        train(
            cfg,
            run,
            progress=False,
            on_epoch=lambda e, *_: snaps.__setitem__(e, _weights(run / "checkpoints" / "last.pt")),
        )
    finally:
        torch.set_num_threads(threads)
    return {"run": run, "epoch1": snaps[1], "final": _weights(run / "checkpoints" / "last.pt")}


def test_killed_rank_ends_the_job_and_the_run_resumes(jobs):
    killed = jobs["killed"]
    # rank 1 was SIGKILLed after epoch 1: the job fails at once instead of rank 0 waiting forever
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr or "Signal 9" in killed.stderr, killed.stderr[-2000:]
    assert jobs["killed_s"] < 60
    assert jobs["epoch1"] is not None and len(jobs["history1"]) == 1  # rank 0 had written epoch 1
    assert "resuming" in jobs["resumed"].stderr
    history = _history(jobs["run"])
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert history[0] == jobs["history1"][0]  # epoch 1 kept as written, not redone
    metrics = json.loads((jobs["run"] / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    # rank 0 alone prints: one summary line, not one per process
    assert jobs["resumed"].stdout.count("best epoch") == 1, jobs["resumed"].stdout


def test_ddp_matches_one_process_on_the_same_global_batch(jobs, single):
    moved = _max_diff(single["epoch1"], single["final"])
    assert moved > 100 * TOL  # the weights changed in epoch 2: agreement below is not vacuous
    assert _max_diff(jobs["epoch1"], single["epoch1"]) < TOL
    # ... and after the kill and the resume (optimizer and schedule state restored from last.pt)
    assert _max_diff(_weights(jobs["run"] / "checkpoints" / "last.pt"), single["final"]) < TOL
    ddp, one = _history(jobs["run"]), _history(single["run"])
    for a, b in zip(ddp, one, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy", "val_auc", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5), key


def _explain_single(jobs, out: Path):
    from xraylens.explain.run import explain_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return explain_run(
            jobs["run"], jobs["images"], methods="gradcam,gradcam++", batch_size=3, device="cpu",
            overlays=5, grid=9, out=out,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def test_sharded_explain_writes_what_one_process_writes(jobs):
    ex, one = jobs["tmp"] / "ex", jobs["tmp"] / "ex-single"
    s = _explain_single(jobs, one)
    assert s.n_images == 16  # 6 batches of 3 (the last one ragged): 3 per rank
    assert jobs["explain"].stdout.count("explained 16 images") == 1
    a, b = np.load(ex / "maps.npz"), np.load(one / "maps.npz")
    assert sorted(a.files) == sorted(b.files) and "gradcam++" in a.files
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert float(np.abs(a["gradcam"].astype(np.float32)).max()) > 0
    assert (ex / "index.csv").read_bytes() == (one / "index.csv").read_bytes()
    pngs = sorted(p.relative_to(ex) for p in ex.rglob("*.png"))
    assert pngs == sorted(p.relative_to(one) for p in one.rglob("*.png")) and len(pngs) == 2 + 2 * 5
    for p in pngs:
        assert (ex / p).read_bytes() == (one / p).read_bytes(), p


def test_sharded_localize_writes_what_one_process_writes(jobs):
    from xraylens.localize.run import localize_run

    loc, one = jobs["tmp"] / "loc", jobs["tmp"] / "loc-single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = localize_run(
            jobs["run"], annotations=jobs["boxes"], fmt="nih", data=jobs["images"], methods="gradcam,gradcam++",
            batch_size=3, device="cpu", out=one,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert s.n_annotated == 16
    rows = (loc / "localization.csv").read_text().splitlines()
    assert len(rows) == 1 + 16 * 4  # 2 methods + 2 baselines per image, gathered from both ranks
    for name in ("localization.csv", "localization_summary.csv", "localization_summary.json"):
        assert (loc / name).read_bytes() == (one / name).read_bytes(), name
    assert jobs["localize"].stdout.count("wrote ") == 1  # rank 0 alone prints


def test_shards_cover_the_split_in_order_in_whole_batches():
    idx = np.arange(100, 116)  # 16 images, batches of 3: 6 batches, 3 per rank
    parts = [distributed.shard_batches(idx, 3, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [9, 7]
    np.testing.assert_array_equal(np.concatenate(parts), idx)
    parts = [distributed.shard_batches(idx, 3, r, 4) for r in range(4)]  # 6 batches over 4 ranks
    assert [len(p) for p in parts] == [6, 6, 3, 1]
    np.testing.assert_array_equal(np.concatenate(parts), idx)
    assert [distributed.shard_range(5, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert len(distributed.shard_batches(idx[:2], 3, 1, 2)) == 0  # more ranks than batches: some idle


def test_merge_parts_concatenates_in_rank_order_and_adds_counts():
    a = ({"m": [1, 2]}, {"raw/x": [3]}, [4], 2)
    b = ({"m": [5]}, {}, [], 3)  # a rank without batches contributes empty lists and no raw keys
    assert distributed.merge_parts([a, b]) == ({"m": [1, 2, 5]}, {"raw/x": [3]}, [4], 5)


def test_helpers_are_no_ops_in_one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.setup("cpu") == "cpu" and distributed.is_main() and distributed.world_size() == 1
    x = np.arange(3)
    assert distributed.all_gather_array(x) is x and distributed.all_reduce_sum(2.5) == 2.5
    assert distributed.gather_parts([1]) == [1] and distributed.share_from_main("s") == "s"
    np.testing.assert_array_equal(distributed.shard_batches(x, 2), x)


def _gather_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    assert distributed.setup("auto" if not torch.cuda.is_available() else "cpu") == "cpu"
    arr = np.arange(rank * 10, rank * 10 + 2 + rank, dtype=np.float32).reshape(-1, 1)  # 2 rows, then 3
    got = distributed.all_gather_array(arr)
    total = distributed.all_reduce_sum((1.5, rank + 1))
    t = distributed.all_reduce_sum(torch.tensor([rank], dtype=torch.int64))
    parts = distributed.gather_parts(([rank], {"n": rank + 1}))
    shared = distributed.share_from_main(f"from {rank}")
    torch.save({"got": torch.from_numpy(got), "total": total, "t": t, "parts": parts, "shared": shared},
               f"{out}/{rank}.pt")  # fmt: skip
    distributed.destroy()


def test_collectives_gather_uneven_arrays_and_sum_on_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_gather_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2))
    want = np.array([0, 1, 10, 11, 12], dtype=np.float32).reshape(-1, 1)
    for r in (r0, r1):
        np.testing.assert_array_equal(r["got"].numpy(), want)
        assert r["total"] == (3.0, 3.0) and int(r["t"]) == 1 and r["shared"] == "from 0"
    assert r0["parts"] == ([0, 1], {"n": 3})  # rank 0 merged, in rank order
    assert r1["parts"] == ([1], {"n": 2})  # the others keep their own


def test_setup_mistakes_are_one_line_errors(monkeypatch):
    from xraylens.errors import XraylensError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    # one fixed GPU for every process would put all ranks on it
    with pytest.raises(XraylensError, match="cuda:LOCAL_RANK"):
        distributed.setup("cuda:1")
    monkeypatch.setenv("XRAYLENS_DIST_TIMEOUT", "soon")
    with pytest.raises(XraylensError, match="XRAYLENS_DIST_TIMEOUT"):
        distributed.setup("cpu")  # checked before joining any group
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(XraylensError, match="RANK"):
        distributed.env()
    assert not distributed.is_distributed()
