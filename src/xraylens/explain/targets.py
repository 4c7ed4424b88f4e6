"""Explanation targets: what score per image the CAM explains, as pytorch-grad-cam's ``model_targets``.

A target is any callable ``target(output) -> scores [B]``: it gets the model's output for the B
explained images, rows in batch order, and returns the scalar per image whose gradient (or, for
Score-CAM, whose value on masked inputs) the CAM is built from. So a model whose output is not
class logits [B, K] (a segmentation net returning [B,K,H,W], a fused model) can be explained by
passing a callable target to ``CamEngine``. Score-CAM calls the target once per channel, always on
the B images' outputs in batch order, so per-image targets stay valid there too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from xraylens.errors import XraylensError
from xraylens.ops import class_probabilities


def class_scores(logits: torch.Tensor, prob: bool = False) -> torch.Tensor:
    """[B, K'] score per class: logits, or probabilities when ``prob``.

    A single BCE logit z reads as two classes, with logit scores (-z, z) or probabilities
    (1 - sigmoid(z), sigmoid(z)).
    """
    if prob:
        return class_probabilities(logits)
    if logits.shape[1] == 1:
        return torch.cat([-logits, logits], dim=1)
    return logits


class ClassTarget:
    """The logit (or probability, ``prob=True``) of class ``k`` of a classifier's logits [B, K].

    k: one class for every image, or one per image (a sequence or tensor of B ints).
    """

    def __init__(self, k: int | Sequence[int] | torch.Tensor, prob: bool = False) -> None:
        t = torch.as_tensor(k).long()
        if t.ndim > 1:
            raise XraylensError(f"ClassTarget takes one class index or one per image, got shape {tuple(t.shape)}")
        self.k = t
        self.prob = prob
        self._valid_for: int | None = None  # class count the indices were checked against

    def classes(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The class explained for each of ``n`` images, [n] long."""
        if device is not None and self.k.device != torch.device(device):
            self.k = self.k.to(device)  # kept there: one copy, not one per call
        t = self.k
        if t.ndim == 0:
            return t.expand(n).clone()
        if t.numel() != n:
            raise XraylensError(f"got {t.numel()} targets for a batch of {n} images; pass one per image")
        return t

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim != 2:
            raise XraylensError(f"ClassTarget needs logits [B, K], the model returned {tuple(output.shape)}")
        scores = class_scores(output, self.prob)
        t = self.classes(output.shape[0], output.device)
        k = scores.shape[1]
        # checked once per class count: Score-CAM calls the target once per channel, and each check
        # would wait for the GPU
        if self._valid_for != k:
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
                raise XraylensError(f"target classes must lie in 0..{k - 1} for this model, got {t.tolist()}")
            self._valid_for = k
        return scores.gather(1, t[:, None]).squeeze(1)

    def __repr__(self) -> str:
        k = int(self.k) if self.k.ndim == 0 else self.k.tolist()
        return f"ClassTarget({k!r}, prob={self.prob})"


class SegmentationTarget:
    """Sum of output channel ``class_index`` over ``mask``, for a model returning [B,K,H,W].

    mask: [H,W] (the same region for every image) or [B,H,W], bool or float weights, at the
    output's resolution. As pytorch-grad-cam's ``SemanticSegmentationTarget``: raw outputs, no softmax.
    """

    def __init__(self, class_index: int, mask: torch.Tensor | np.ndarray) -> None:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        if m.ndim not in (2, 3):
            raise XraylensError(f"SegmentationTarget mask must be [H,W] or [B,H,W], got {tuple(m.shape)}")
        self.class_index = int(class_index)
        self.mask = m.float()

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim != 4:
            raise XraylensError(f"SegmentationTarget needs outputs [B,K,H,W], the model returned {tuple(output.shape)}")
        b, k, h, w = output.shape
        if not 0 <= self.class_index < k:
            raise XraylensError(f"class_index {self.class_index} is out of range for {k} output channels")
        if tuple(self.mask.shape[-2:]) != (h, w) or (self.mask.ndim == 3 and self.mask.shape[0] != b):
            raise XraylensError(
                f"mask {tuple(self.mask.shape)} does not fit outputs {tuple(output.shape)}; "
                "give [H,W] or [B,H,W] at the output's resolution"
            )
        if self.mask.device != output.device or self.mask.dtype != output.dtype:
            self.mask = self.mask.to(device=output.device, dtype=output.dtype)  # once, not once per call
        m = self.mask
        return (output[:, self.class_index] * m).sum(dim=(-2, -1))
