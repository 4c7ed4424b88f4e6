"""Writing checkpoints during training (reading them back is `xraylens.runs`).

A checkpoint holds only tensors and plain Python values so that it loads with
`torch.load(..., weights_only=True)`: no pickled classes, ever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from xraylens.config import RunConfig
from xraylens.io import torch_save
from xraylens.runs import CHECKPOINT_FORMAT


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: RunConfig,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: dict[str, Any] | None = None,
) -> None:
    """`epoch` is the number of completed epochs; `state` carries history, best score, counters.
    A wrapped model (torch.compile, DistributedDataParallel) is saved as the model inside it, so the
    keys carry no `_orig_mod.` / `module.` prefix and load into a plain model anywhere."""
    torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": int(epoch),
            "config": config.to_dict(),
            "classes": list(config.classes),
            "state": state or {},
        },
        path,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's and DistributedDataParallel's wrappers (any nesting)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner
