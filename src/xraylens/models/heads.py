"""Classifier heads and partial unfreezing, shared by every family through ``arch.Arch``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from xraylens.errors import XraylensError
from xraylens.models.arch import Arch


class MLPHead(nn.Sequential):
    """Linear-ReLU-Dropout per hidden size, then Linear(num_classes) (seed 001's extra FC head)."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, drop_rate: float = 0.0) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(drop_rate)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_head(model: nn.Module, head: str, hidden: Sequence[int], num_classes: int, drop_rate: float) -> MLPHead:
    """Swap the final Linear at ``head`` for an ``MLPHead`` with the same input width."""
    old = model.get_submodule(head)
    if not isinstance(old, nn.Linear):  # a family bug, not a user mistake
        raise TypeError(f"head {head!r} is {type(old).__name__}, expected nn.Linear")
    new = MLPHead(old.in_features, hidden, num_classes, drop_rate)
    _set_submodule(model, head, new)
    return new


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def freeze_except_last(model: nn.Module, arch: Arch, n: int, model_name: str) -> list[str]:
    """Freeze all parameters except the last ``n`` stages and the head; returns trainable names.

    BatchNorm running statistics in frozen stages still update in train mode (as in the seeds);
    callers that want them fixed put those modules in eval mode.
    """
    stages = arch.stages
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(stages):
        raise XraylensError(
            f"train_last must be an integer from 0 (head only) to {len(stages)} "
            f"({model_name} has {len(stages)} stages), got {n!r}"
        )
    prefixes = [arch.head] + [p for stage in stages[len(stages) - n :] for p in stage]
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(_under(name, pre) for pre in prefixes))
        if p.requires_grad:
            trainable.append(name)
    return trainable
