"""Many processes, one job: the torch.distributed process group under `torchrun`.

`torchrun --nproc-per-node N -m xraylens train|explain|localize ...` starts N copies of the command
with RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous address) in their environment. Every helper
here is a no-op in a plain single process, so the commands run the same code either way:

- `setup(device)` joins the group (NCCL on CUDA, gloo on the CPU) and returns this rank's device
  (`cuda:LOCAL_RANK`).
- `is_main()`: rank 0 alone writes files, logs and progress.
- `barrier`, `main_first` (the local rank 0 decodes the cache while the others wait, then they read it).
- `all_reduce_sum`, `all_gather_array` for numbers, numpy arrays and tensors; `gather_parts` (lists,
  dicts and counts from every rank merged on rank 0, in rank order) and `share_from_main`.
- `shard_range`, `shard_batches`: which part of a split this rank takes.

A rank that dies does not leave the others waiting: torchrun stops the whole job when one process
exits with an error, and every collective times out after XRAYLENS_DIST_TIMEOUT seconds (default
3600: the first decode of a large dataset on rank 0 runs while the others wait at a barrier).
Rank-to-rank objects are pickled: the peers are copies of this same program in one job.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from xraylens.errors import XraylensError

T = TypeVar("T")
log = logging.getLogger("xraylens.distributed")

DEFAULT_TIMEOUT_S = 3600


@dataclass(frozen=True)
class DistEnv:
    """What torchrun put in the environment (rank 0 of 1 when it did not)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def launched(self) -> bool:
        return self.world_size > 1


def env() -> DistEnv:
    def num(name: str, default: int) -> int:
        v = os.environ.get(name, "")
        try:
            return int(v) if v.strip() else default
        except ValueError:
            raise XraylensError(f"{name}={v!r} in the environment is not an integer (set by torchrun)") from None

    world = num("WORLD_SIZE", 1)
    return DistEnv(num("RANK", 0), world, num("LOCAL_RANK", 0), num("LOCAL_WORLD_SIZE", world))


def is_distributed() -> bool:
    """True inside a joined process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else env().rank


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (always True in a single process): the one that writes files, logs and progress."""
    return rank() == 0


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("XRAYLENS_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        s = float(raw)
    except ValueError:
        s = -1.0
    if s <= 0:
        raise XraylensError(f"XRAYLENS_DIST_TIMEOUT={raw!r}: give the collective timeout in seconds, e.g. 3600")
    return datetime.timedelta(seconds=s)


def setup(device: str = "auto") -> str:
    """Join the process group when torchrun launched this process; return this rank's device name.

    Single process: `device` unchanged. Under torchrun, a CUDA device becomes `cuda:LOCAL_RANK` (one GPU
    per process; choose the GPUs with CUDA_VISIBLE_DEVICES) and the backend is NCCL; on the CPU it is
    gloo (XRAYLENS_DIST_BACKEND overrides). Calling it again returns the same device."""
    e = env()
    if not e.launched:
        return device
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if device not in ("auto", "cuda"):
            raise XraylensError(
                f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda "
                "(choose the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        n = torch.cuda.device_count()
        if e.local_rank >= n:
            raise XraylensError(
                f"local rank {e.local_rank} has no GPU ({n} visible): use --nproc-per-node {n} or fewer"
            )
        torch.cuda.set_device(e.local_rank)
        name = f"cuda:{e.local_rank}"
    else:
        name = "cpu"
    if not dist.is_initialized():
        backend = os.environ.get("XRAYLENS_DIST_BACKEND") or ("nccl" if want_cuda else "gloo")
        # NCCL errors abort the process instead of hanging in the collective
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend=backend, timeout=_timeout())
        atexit.register(destroy)
        log.debug("rank %d/%d joined (%s) on %s", dist.get_rank(), dist.get_world_size(), backend, name)
    return name


def destroy() -> None:
    """Leave the process group (safe to call twice, or when never joined)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def quiet_unless_main() -> None:
    """Under torchrun, ranks other than 0 print nothing to stdout and log warnings only: one copy
    of every message (errors still reach stderr from the rank that has them)."""
    if env().rank != 0:
        logging.getLogger("xraylens").setLevel(logging.WARNING)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            # NCCL otherwise guesses the GPU as rank % GPUs, not this rank's cuda:LOCAL_RANK
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_first(local: bool = True) -> Iterator[None]:
    """The (local) rank 0 runs the block first, the others after it: one process decodes a cache that
    the rest then read. `local`: per node, for caches on node-local disks."""
    first = (env().local_rank if local else rank()) == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def _device() -> torch.device:
    """Where tensors travel for a collective: the GPU of this rank under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: T) -> T:
    """Sum of a number, numpy array or tensor over all ranks (returned as the same kind)."""
    if not is_distributed():
        return x
    if isinstance(x, torch.Tensor):
        buf = x.detach().clone().to(_device())
        dist.all_reduce(buf)
        return buf.to(x.device)  # type: ignore[return-value]
    buf = torch.from_numpy(np.array(x, dtype=np.float64)).to(_device())  # exact for counts < 2**53
    dist.all_reduce(buf)
    out = buf.cpu().numpy()
    if isinstance(x, np.ndarray):
        return out.astype(x.dtype)  # type: ignore[return-value]
    if isinstance(x, (tuple, list)):
        return type(x)(out.tolist())  # type: ignore[return-value]
    return type(x)(out.item())  # type: ignore[return-value]


def all_gather_array(x: T) -> T:
    """Concatenate a numpy array or tensor along its first axis over all ranks, in rank order (the
    first axis may differ in length between ranks; the others must match). Every rank gets it."""
    if not is_distributed():
        return x
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    buf = t.detach().to(_device())
    sizes = [torch.zeros(1, dtype=torch.int64, device=buf.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([buf.shape[0]], dtype=torch.int64, device=buf.device))
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(lengths), *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
    padded[: buf.shape[0]] = buf
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:n] for p, n in zip(parts, lengths, strict=True)])
    if isinstance(x, torch.Tensor):
        return out.to(x.device)  # type: ignore[return-value]
    return out.cpu().numpy()  # type: ignore[return-value]


def merge_parts(parts: list[Any]) -> Any:
    """Merge the same structure from every rank, in rank order: lists concatenate, dicts merge per key
    (a key some ranks lack is fine), tuples merge item by item, numbers (counts) add."""
    first = parts[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for p in parts for k in p))
        return {k: merge_parts([p[k] for p in parts if k in p]) for k in keys}
    if isinstance(first, tuple):
        return tuple(merge_parts(list(items)) for items in zip(*parts, strict=True))
    if isinstance(first, list):
        return [v for p in parts for v in p]
    if isinstance(first, (int, float, np.integer, np.floating)) and not isinstance(first, bool):
        return sum(parts)
    raise TypeError(f"cannot merge {type(first).__name__} across ranks")


def gather_parts(obj: T) -> T:
    """Rank 0 gets `obj` of every rank merged (`merge_parts`); other ranks get their own back. One
    process: `obj` unchanged. Used with `shard_batches`: the merged lists are in single-process order."""
    if not is_distributed():
        return obj
    got: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, got, dst=0)
    return merge_parts(got) if got is not None else obj


def share_from_main(obj: T) -> T:
    """Rank 0's `obj` on every rank (what a command returns: the same summary everywhere)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def shard_range(n: int, r: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous share of n items; shares differ by at most one."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    lo = r * base + min(r, extra)
    return lo, lo + base + (r < extra)


def shard_batches(indices: np.ndarray, batch_size: int, r: int | None = None, world: int | None = None) -> np.ndarray:
    """This rank's share of `indices` in whole batches of `batch_size`, contiguous and in order: every
    batch is exactly the one a single process would run (per-image results cannot depend on which
    rank or batch they ran in), and concatenating the shares in rank order gives `indices` back."""
    n_batches = -(-len(indices) // batch_size)
    lo, hi = shard_range(n_batches, r, world)
    return indices[lo * batch_size : hi * batch_size]


def kill_point(name: str) -> None:
    """Tests of a crashed job: XRAYLENS_KILL_AT=<name>[@<rank>] kills this process (SIGKILL, no clean-up)
    when it reaches `name` (e.g. `epoch1`), on every rank or only on <rank>."""
    spec = os.environ.get("XRAYLENS_KILL_AT")
    if not spec:
        return
    where, _, who = spec.partition("@")
    if where == name and (not who or int(who) == rank()):
        os.kill(os.getpid(), signal.SIGKILL)
