"""Batches straight from the cached uint8 arrays, and THE normalisation every command uses.

No per-item Python Dataset: a batch is one fancy-index of the uint8 tensor by a slice of a
permutation. uint8 travels to the device (4x less than float) and is normalised there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from xraylens.data.cache import CachedSplit
from xraylens.errors import XraylensError


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
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield `(x uint8 [B,1,H,W], y int64 [B], idx int64 [B])`; `idx` indexes `cached.ids` / geometry."""
    if batch_size < 1:
        raise XraylensError(f"batch_size must be >= 1, got {batch_size}")
    images = torch.from_numpy(cached.images)  # shares memory with the cache array, no copy
    labels = torch.from_numpy(np.asarray(cached.labels, dtype=np.int64))
    order = torch.from_numpy(epoch_order(cached.labels, shuffle=shuffle, balanced=balanced, seed=seed, epoch=epoch))
    n = len(order)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx].unsqueeze(1), labels[idx], idx


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
