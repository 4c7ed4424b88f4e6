"""Faithfulness of saliency maps: deletion and insertion curves (Petsiuk et al., RISE, 2018).

Deletion: remove the most relevant pixels first (replace them by a baseline) and watch the target
score fall; a faithful map gives a LOW area under the curve. Insertion: start from the baseline and
put the most relevant pixels back; a faithful map gives a HIGH area.

Everything runs batched on the input's device: per-image pixel order by `argsort`, every step of every
image stacked into one stream of perturbed inputs and fed to the model in chunks of `batch_size`
(no per-image Python loop). The model's train/eval mode is left as the caller set it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xraylens.errors import XraylensError
from xraylens.ops import class_probabilities, gaussian_blur


@dataclass
class CurveResult:
    """auc [B]: area under the score curve over the fraction of pixels perturbed (trapezoid rule, x in
    [0, 1]); curves [B, steps + 1]: target score after perturbing fractions[s] of the pixels;
    fractions [steps + 1]: exact fraction of pixels perturbed at each step (0 ... 1)."""

    auc: torch.Tensor
    curves: torch.Tensor
    fractions: torch.Tensor


def make_baseline(x: torch.Tensor, kind: str = "blur", blur_sigma: float = 5.0) -> torch.Tensor:
    """What a removed pixel becomes: "blur" (Gaussian blur of the image, sigma in input pixels),
    "zero" (0 in the model's input space, i.e. the normalised mean for a normalised input), or "mean"
    (each image's per-channel mean)."""
    if kind == "blur":
        return gaussian_blur(x, blur_sigma)
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    raise XraylensError(f"baseline must be 'blur', 'zero' or 'mean', got {kind!r}")


def _scores(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Target probability: softmax over classes, or for a single-logit model sigmoid (target 1) /
    1 - sigmoid (target 0)."""
    if out.dim() != 2:
        raise XraylensError(f"the model must return logits [B, classes], got {tuple(out.shape)}")
    return class_probabilities(out).gather(1, t[:, None])[:, 0]


@torch.no_grad()
def deletion_insertion(
    model: torch.nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 20,
    baseline: str = "blur",
    mode: str = "deletion",
    batch_size: int = 64,
    blur_sigma: float = 5.0,
) -> CurveResult:
    """Deletion or insertion curve and AUC per image.

    x [B, C, H, W] model input; maps [B, 1, h, w] (bilinearly resized to H x W if smaller); targets [B]
    class indices. Pixels are ordered per image by decreasing map value (ties: row-major order, stable
    sort); at step s the first round(s / steps * H*W) of them are replaced by the baseline (deletion) or
    taken from x on top of the baseline (insertion), all channels at once. Step 0 is the intact image
    (deletion) or the pure baseline (insertion); the last step is the reverse.
    """
    if mode not in ("deletion", "insertion"):
        raise XraylensError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1 or batch_size < 1:
        raise XraylensError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if x.dim() != 4:
        raise XraylensError(f"x must be [B, C, H, W], got {tuple(x.shape)}")
    b, _, h, w = x.shape
    if maps.dim() == 3:
        maps = maps[:, None]
    if maps.dim() != 4 or maps.shape[:2] != (b, 1):
        raise XraylensError(f"maps must be [B, 1, h, w] with B = {b}, got {tuple(maps.shape)}")
    maps = maps.to(x.device, torch.float32)
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
    targets = torch.as_tensor(targets, device=x.device).long().reshape(-1)
    if targets.shape[0] != b:
        raise XraylensError(f"targets must hold one class per image ({b}), got {targets.shape[0]}")

    n = h * w
    order = torch.argsort(maps.reshape(b, n), dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)  # rank[b, pixel] = position of the pixel in the removal order
    rank.scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
    counts = torch.round(torch.linspace(0, n, steps + 1, device=x.device, dtype=torch.float64)).long()
    base = make_baseline(x, baseline, blur_sigma)

    total = b * (steps + 1)
    scores = torch.empty(total, device=x.device, dtype=torch.float32)
    for start in range(0, total, batch_size):  # chunks of (image, step) pairs, not images
        j = torch.arange(start, min(start + batch_size, total), device=x.device)
        img, step = j // (steps + 1), j % (steps + 1)
        changed = (rank[img] < counts[step][:, None]).view(-1, 1, h, w)
        if mode == "deletion":
            xin = torch.where(changed, base[img], x[img])
        else:
            xin = torch.where(changed, x[img], base[img])
        scores[start : start + j.shape[0]] = _scores(model(xin), targets[img])
    curves = scores.view(b, steps + 1)
    fractions = counts.float() / n
    auc = torch.trapezoid(curves, fractions, dim=1)
    return CurveResult(auc, curves, fractions)
