"""Dice and IoU of binary masks, batched."""

from __future__ import annotations

import torch


@torch.no_grad()
def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice 2|A∩B| / (|A| + |B|) and IoU |A∩B| / |A∪B| of bool masks [B, ...], [B] float32 each.

    Two empty masks agree perfectly (1.0): an image without lung that the model leaves empty is right."""
    p = pred.reshape(pred.shape[0], -1).bool()
    t = target.reshape(target.shape[0], -1).bool()
    inter = (p & t).sum(1).float()
    total = p.sum(1).float() + t.sum(1).float()
    union = (p | t).sum(1).float()
    empty = total == 0
    dice = torch.where(empty, torch.ones_like(inter), 2 * inter / total.clamp(min=1))
    iou = torch.where(empty, torch.ones_like(inter), inter / union.clamp(min=1))
    return dice, iou
