import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from xraylens.errors import XraylensError
from xraylens.io import LOCK_NAME, atomic_path, lock_dir, torch_save, write_csv, write_json, write_text

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


@pytest.mark.parametrize("mask, expect", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask, expect):
    umask(mask)
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "a.json", {"a": np.float32(1)})
    write_csv(tmp_path / "a.csv", ["h"], [[1]])
    torch_save({"w": torch.zeros(2)}, tmp_path / "a.pt")
    with atomic_path(tmp_path / "a.npy", suffix=".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.zeros(3, np.uint8))
    for name in ("a.txt", "a.json", "a.csv", "a.pt", "a.npy"):
        assert _mode(tmp_path / name) == expect, name
    # overwriting gives the same mode, and no temp file is left behind
    write_text(tmp_path / "a.txt", "y")
    assert _mode(tmp_path / "a.txt") == expect and (tmp_path / "a.txt").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.json", "a.npy", "a.pt", "a.txt"]


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert (tmp_path / "a.txt").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def _holder(path: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from xraylens.io import lock_dir
        with lock_dir({str(path)!r}, "train"):
            print("locked", flush=True)
            time.sleep(120)
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_dir_contention_and_release_on_kill(tmp_path):
    run = tmp_path / "runs" / "r1"  # created by the lock
    holder = _holder(run)
    try:
        with pytest.raises(XraylensError) as exc, lock_dir(run, "evaluate"):
            pass
        msg = str(exc.value)
        assert msg == (
            f"{run} is in use by another xraylens train (pid {holder.pid}); "
            "wait for it to finish or choose another --out"
        )
        assert "\n" not in msg
        # another folder is not affected
        with lock_dir(tmp_path / "runs" / "r2", "train"):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        holder.stdout.close()
    # the kernel dropped the dead holder's lock: no stale-lock cleanup needed
    with lock_dir(run, "train") as p:
        assert p == run and (run / LOCK_NAME).read_text() == f"{os.getpid()} train\n"
        with pytest.raises(XraylensError, match=rf"pid {os.getpid()}\)"), lock_dir(run, "train"):
            pass
    with lock_dir(run, "train"):  # released on exit
        pass


def test_lock_dir_unwritable_parent(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(XraylensError, match="choose a writable --out"), lock_dir(tmp_path / "file" / "run", "x"):
        pass


def test_finite_json_turns_nan_and_inf_into_null(tmp_path):
    from xraylens.io import finite_json, write_json

    path = tmp_path / "x.json"
    write_json(path, finite_json({"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": "s"}))
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None, [None, 2]], "c": "s"}
