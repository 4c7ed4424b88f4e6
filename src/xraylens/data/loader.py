"""Batches straight from the cached uint8 arrays, and THE normalisation every command uses.

No per-item Python Dataset: a batch is one fancy-index of the uint8 array by a slice of a
permutation. uint8 travels to the device (4x less than float) and is normalised there.

Where the split's pixels live while batches are drawn (`data.placement`, `stage_images`):

* "mmap": gathered from the cache file's memory map per batch (a split larger than RAM works; the
  kernel's page cache keeps the hot part);
* "pinned": copied once into page-locked host memory, so each batch's copy to the GPU is asynchronous;
* "gpu": copied once onto the GPU, so a batch is an index on the device and nothing crosses the bus;
* "auto" (default): on CUDA "gpu" when the split takes under `GPU_FRACTION` of the free GPU memory,
  else "pinned" when it takes under `PINNED_FRACTION` of the available RAM, else "mmap"; on a CPU
  device always "mmap" (pinning or copying buys nothing there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from xraylens.data.cache import CachedSplit
from xraylens.distributed import shard_range
from xraylens.errors import XraylensError

PLACEMENTS = ("auto", "gpu", "pinned", "mmap")
GPU_FRACTION = 0.5  # at most this share of the free GPU memory goes to a resident split
PINNED_FRACTION = 0.5  # at most this share of the available RAM is page-locked for a split

log = logging.getLogger("xraylens.loader")
_STAGE_ROWS = 4096  # rows per host-to-GPU copy when a split is placed on the GPU


def resolve_placement(placement: str, nbytes: int, device: torch.device | str | None) -> str:
    """Where a split of `nbytes` lives for batches drawn for `device` (see the module docstring)."""
    p = str(placement).lower()
    if p not in PLACEMENTS:
        raise XraylensError(f"data.placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda":
        return "mmap"
    if p != "auto":
        return p
    free, _ = torch.cuda.mem_get_info(dev)
    if nbytes < GPU_FRACTION * free:
        return "gpu"
    import psutil

    return "pinned" if nbytes < PINNED_FRACTION * psutil.virtual_memory().available else "mmap"


def stage_images(
    cached: CachedSplit, device: torch.device | str | None = None, placement: str = "auto"
) -> tuple[str, torch.Tensor | None]:
    """(placement used, the split's pixels as a tensor on the GPU / in pinned memory, or None for
    "mmap"). Staged once per (split, device, placement) and kept on the split object."""
    where = resolve_placement(placement, int(cached.images.nbytes), device)
    if where == "mmap":
        return where, None
    key = (str(device), where)
    staged = cached.staged.get(key)
    if staged is None:
        shape = tuple(cached.images.shape)
        if where == "pinned":
            staged = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            np.copyto(staged.numpy(), cached.images)  # one sequential read of the map, no second host copy
        else:
            staged = torch.empty(shape, dtype=torch.uint8, device=device)
            for lo in range(0, shape[0], _STAGE_ROWS):  # in slices: host RAM holds one slice at a time
                staged[lo : lo + _STAGE_ROWS].copy_(torch.from_numpy(np.array(cached.images[lo : lo + _STAGE_ROWS])))
        cached.staged.clear()  # one resident copy per split
        cached.staged[key] = staged
        log.info("split %s: %d images placed %s", cached.split, len(cached), where)
    return where, staged


def epoch_order(
    labels: np.ndarray, *, shuffle: bool = False, balanced: bool = False, seed: int = 0, epoch: int = 0
) -> np.ndarray:
    """The sample order of one epoch (int64 indices), deterministic in (seed, epoch).

    `balanced`: N draws with replacement, each class equally likely (classes with no sample excluded).
    """
    n = len(labels)
    if not (shuffle or balanced):
        return np.arange(n, dtype=np.int64)
    # SeedSequence over (seed, epoch): independent, reproducible streams per epoch
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF])
    if not balanced:
        return rng.permutation(n).astype(np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]  # every present class gets total weight 1
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum()).astype(np.int64)


def iterate_batches(
    cached: CachedSplit,
    batch_size: int,
    *,
    shuffle: bool = False,
    balanced: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    device: torch.device | str | None = None,
    placement: str = "mmap",
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield `(x uint8 [B,C,H,W], y int64 [B], idx int64 [B])`; `idx` indexes `cached.ids` / geometry.

    Grey splits ([N,H,W]) give C = 1. With `placement` "gpu" `x` is already on `device`; with
    "pinned" it is in page-locked memory (copy it with `non_blocking=True`); "mmap" gathers it from
    the cache file's map. Every placement yields the same values in the same order.

    `shard=(rank, world_size)` (DDP): `batch_size` is per process, so each global batch is
    `batch_size * world_size` images of the epoch's order (the same on every rank; `drop_last` drops
    a ragged last *global* batch) and this rank yields only its contiguous share of it
    (`distributed.shard_range`: shares differ by at most one, lower ranks take the extra), reading
    only that share. Concatenating the ranks' shares in rank order gives the global batch back.
    """
    if batch_size < 1:
        raise XraylensError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = (0, 1) if shard is None else (int(shard[0]), int(shard[1]))
    if world < 1 or not 0 <= rank < world:
        raise XraylensError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    where, staged = stage_images(cached, device, placement)
    labels = torch.from_numpy(np.asarray(cached.labels, dtype=np.int64))
    order_np = epoch_order(cached.labels, shuffle=shuffle, balanced=balanced, seed=seed, epoch=epoch)
    order = torch.from_numpy(order_np)
    if where == "gpu":
        order_dev = order.to(device)
    n = len(order)
    step = batch_size * world  # one global batch
    stop = n - n % step if drop_last else n
    for start in range(0, stop, step):
        lo, hi = shard_range(min(step, n - start), rank, world)
        if lo == hi:
            raise XraylensError(f"{n} training images cannot feed {world} processes; use fewer (--nproc-per-node)")
        a, b = start + lo, start + hi  # this rank's share of the global batch, in epoch-order positions
        idx = order[a:b]
        if where == "gpu":
            x = staged[order_dev[a:b]]  # type: ignore[index]
        elif where == "pinned":
            out = torch.empty((len(idx), *staged.shape[1:]), dtype=torch.uint8, pin_memory=True)  # type: ignore[union-attr]
            x = torch.index_select(staged, 0, idx, out=out)  # type: ignore[arg-type]
        else:
            # one gather from the map into a fresh (writable) array: only these rows are read
            x = torch.from_numpy(np.asarray(cached.images[order_np[a:b]]))
        yield (x.unsqueeze(1) if x.ndim == 3 else x), labels[idx], idx


def to_model_input(
    x_uint8: torch.Tensor,
    *,
    in_chans: int = 1,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.25,),
    device: torch.device | str | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 [B,1,H,W] (or [B,H,W]) -> float32 [B,in_chans,H,W]: ((x / 255) - mean) / std.

    Moved to `device` first (uint8 is 4x smaller on the wire); grey is repeated to `in_chans`.
    """
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_model_input expects uint8 images, got {x_uint8.dtype}")
    if x_uint8.ndim == 3:
        x_uint8 = x_uint8.unsqueeze(1)
    if x_uint8.ndim != 4 or x_uint8.shape[1] not in (1, in_chans):
        raise ValueError(f"to_model_input expects [B,1,H,W] or [B,{in_chans},H,W], got {list(x_uint8.shape)}")
    mean, std = list(mean), list(std)
    for name, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, in_chans):
            raise XraylensError(f"data.{name} has {len(v)} values; give 1 or in_chans={in_chans}")
    if any(s <= 0 for s in std):
        raise XraylensError(f"data.std must be positive, got {std}")
    if device is not None:
        x_uint8 = x_uint8.to(device, non_blocking=True)
    m = torch.tensor(mean, dtype=torch.float32, device=x_uint8.device)
    s = torch.tensor(std, dtype=torch.float32, device=x_uint8.device)
    m, s = m.expand(in_chans).view(1, in_chans, 1, 1), s.expand(in_chans).view(1, in_chans, 1, 1)
    # one fused affine: x * 1/(255 s) - m/s; broadcasting [B,1] against [1,C] repeats grey to C channels
    out = torch.addcmul(-m / s, x_uint8.float(), 1.0 / (255.0 * s))
    if out.shape[1] != in_chans:
        out = out.expand(-1, in_chans, -1, -1).contiguous()
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
