"""Atomic file writes (a crash mid-write never leaves a truncated checkpoint, CSV or JSON behind) and
the run-directory lock (two processes never write into one folder at once)."""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from xraylens.errors import XraylensError

LOCK_NAME = ".xraylens.lock"


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it over `path` only on success.

    The file gets mode 0666 & ~umask like any file a shell or `open` creates (tempfile.mkstemp
    would force 0600 and make outputs unreadable to the rest of a group).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, f".{path.name}.", suffix or ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temp(folder: Path, prefix: str, suffix: str) -> Path:
    # O_EXCL with mode 0o666: the kernel applies the umask (and any default ACL) itself
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name for {prefix}*{suffix} in {folder}")


def atomic_write(path: str | os.PathLike, writer: Callable[[IO], Any], mode: str = "w") -> None:
    with atomic_path(path) as tmp, open(tmp, mode, newline="" if "b" not in mode else None) as fh:
        writer(fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN/inf float replaced by None, so the JSON written is standard (null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    import csv

    def _w(fh):
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)

    atomic_write(path, _w)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(o: Any) -> Any:
    # numpy scalars / arrays and Paths show up in metrics and configs
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextmanager
def lock_dir(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on the folder `path` (created if needed) for the `with` block.

    An OS lock (flock on `path/.xraylens.lock`), so the kernel drops it when the holder dies, even
    by kill -9: a stale lock file never blocks anyone. Raises XraylensError at once if another
    process holds it. The lock file itself stays (deleting it would let two processes lock two
    different files of the same name).
    """
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unlocked rather than not at all
        yield path
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise XraylensError(f"cannot create {path / LOCK_NAME} ({e.strerror}); choose a writable --out") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, holder = _lock_holder(fd)
            raise XraylensError(
                f"{path} is in use by another xraylens {holder or what} (pid {pid or '?'}); "
                "wait for it to finish or choose another --out"
            ) from None
        # who holds it, for the message a second process prints
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> tuple[str, str]:
    try:
        parts = os.pread(fd, 256, 0).decode(errors="replace").split(maxsplit=1)
    except OSError:
        return "", ""
    pid = parts[0] if parts and parts[0].isdigit() else ""
    return pid, parts[1].strip() if len(parts) > 1 else ""
