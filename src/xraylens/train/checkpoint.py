"""Checkpoints and loading a run directory back.

A checkpoint holds only tensors and plain Python values so that it loads with
`torch.load(..., weights_only=True)`: no pickled classes, ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xraylens.config import RunConfig
from xraylens.errors import XraylensError
from xraylens.io import torch_save
from xraylens.runtime import resolve_device

FORMAT = 1


def save_checkpoint(path: str | Path, *, model: nn.Module, config: RunConfig, epoch: int,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    state: dict[str, Any] | None = None) -> None:
    """`epoch` is the number of completed epochs; `state` carries history, best score, counters."""
    torch_save(
        {
            "format": FORMAT,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": int(epoch),
            "config": config.to_dict(),
            "classes": list(config.classes),
            "state": state or {},
        },
        path,
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise XraylensError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, or a pickle that is not weights-only
        raise XraylensError(f"cannot load checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise XraylensError(f"{path} is not an xraylens checkpoint (no model/config entries)")
    return ckpt


def build_model(config: RunConfig, *, weights: bool = True) -> nn.Module:
    """The model a config describes (pretrained weights only when training starts)."""
    from xraylens.models.registry import create_model

    m = config.model
    pretrained: bool | str = False
    if weights and m.weights:
        pretrained = True if m.weights == "hub" else m.weights
    return create_model(
        m.name,
        num_classes=len(config.classes),
        in_chans=m.in_chans,
        pretrained=pretrained,
        head_hidden=tuple(m.head_hidden),
        train_last=m.train_last,
        drop_rate=m.drop_rate,
        image_size=config.data.image_size,
    )


@dataclass
class LoadedRun:
    run_dir: Path
    model: nn.Module
    config: RunConfig
    device: torch.device
    epoch: int
    checkpoint: str

    @property
    def classes(self) -> list[str]:
        return self.config.classes


def find_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if not run_dir.is_dir():
        raise XraylensError(f"run directory not found: {run_dir}")
    path = run_dir / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise XraylensError(f"{path} not found: is {run_dir} a finished xraylens run? (train writes it)")
    return path


def load_run(run_dir: str | Path, which: str = "best", device: str = "auto") -> LoadedRun:
    """Rebuild the trained model of a run (eval mode, on `device`) with its resolved config."""
    path = find_checkpoint(run_dir, which)
    ckpt = load_checkpoint(path)
    config = RunConfig.from_dict(ckpt["config"])
    model = build_model(config, weights=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise XraylensError(f"{path} does not fit model {config.model.name}: {str(e).splitlines()[0]}") from None
    dev = resolve_device(device)
    model.to(dev).eval()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return LoadedRun(run, model, config, dev, int(ckpt.get("epoch", 0)), str(path))
