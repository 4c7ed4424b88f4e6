"""Training losses behind one door: `build_loss(name, num_classes, ...)`.

Every loss is an `nn.Module` called as `loss(logits [B, K], targets [B] int64) -> scalar`.

- `ce`           plain cross-entropy.
- `ce-weighted`  cross-entropy with balanced class weights n / (K * n_c) (sklearn's "balanced").
- `focal`        per-sample focal loss (Lin et al. 2017): FL = -alpha_t (1 - p_t)^gamma log p_t,
                 averaged over the batch, computed from log_softmax so it is stable for any logits.
- `focal-seed`   the KL-grading seed's formula, kept verbatim for comparison (see `SeedFocalLoss`).
- `bce`          BCEWithLogits over one-hot targets across the K outputs (binary tasks, K = 2 works).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xraylens.errors import XraylensError

LOSSES = ("ce", "ce-weighted", "focal", "focal-seed", "bce")

AlphaLike = float | Sequence[float] | torch.Tensor | None


def balanced_class_weights(class_counts: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """n / (K * n_c) per class, the same as sklearn's compute_class_weight('balanced')."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() != num_classes:
        raise XraylensError(
            f"class_counts has {counts.numel()} entries but the task has {num_classes} classes; "
            "pass one count per class"
        )
    if bool((counts <= 0).any()):
        raise XraylensError(
            f"class_counts {counts.tolist()} has an empty class; every class needs training images "
            "for weighted losses (use --loss ce or add images)"
        )
    return (counts.sum() / (num_classes * counts)).float()


def _alpha_vector(alpha: AlphaLike, num_classes: int) -> torch.Tensor | None:
    """None stays None; a scalar or a per-class sequence becomes a [K] float tensor."""
    if alpha is None:
        return None
    a = torch.as_tensor(alpha, dtype=torch.float32).flatten()
    if a.numel() == 1:
        return a.expand(num_classes).clone()
    if a.numel() != num_classes:
        raise XraylensError(
            f"focal alpha has {a.numel()} values but the task has {num_classes} classes; "
            "pass a scalar or one value per class"
        )
    return a


class FocalLoss(nn.Module):
    """FL = -alpha_t (1 - p_t)^gamma log p_t per sample, mean over the batch.

    log p_t comes from log_softmax (never log(softmax)), and (1 - p_t) from -expm1(log p_t), so
    confident samples neither overflow nor lose precision.
    """

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha: AlphaLike = None) -> None:
        super().__init__()
        if gamma < 0:
            raise XraylensError(f"focal gamma must be >= 0, got {gamma}; use e.g. 2.0")
        self.gamma = float(gamma)
        a = _alpha_vector(alpha, num_classes)
        # a buffer follows .to(device); non-persistent so checkpoints hold only model weights
        self.register_buffer("alpha", a if a is not None else torch.empty(0), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp_t = F.log_softmax(logits.float(), dim=1).gather(1, targets.view(-1, 1)).squeeze(1)
        one_minus_p = -torch.expm1(logp_t)  # 1 - p_t, accurate when p_t ~ 1
        if self.gamma == 0:
            mod = torch.ones_like(one_minus_p)  # avoid 0 ** 0 quirks in the gradient
        else:
            # the floor keeps d/dx x^gamma finite for gamma < 1 when p_t rounds to exactly 1
            mod = one_minus_p.clamp_min(1e-12).pow(self.gamma)
        loss = -mod * logp_t
        if self.alpha.numel():
            loss = self.alpha[targets] * loss
        return loss.mean()


class SeedFocalLoss(nn.Module):
    """Seed 000's focal loss, reproduced exactly (it is not a per-sample focal loss).

    Source read: github.com/rae-t627/KL-Severity-Grading-Focal-Loss-Optimization-Grad-CAM
      train.py:    class_weights = compute_class_weight('balanced', ...)
                   loss = nn.CrossEntropyLoss(weight=class_weights)
                   ce_loss = loss(prediction, y); pt = torch.exp(-ce_loss)
                   loss_value = torch.mean(alpha[y] * (1 - pt) ** gamma * ce_loss)
                   with alpha = class_weights, gamma = 2.00
      hyperval.py: the same line times `alpha_scaling_factor` (default 0.25; Optuna searches
                   gamma in [1.5, 2.5] and the factor in [0.1, 3.0]).
    So ce is the class-weighted *batch mean* CE (a scalar), pt = exp(-ce) is one number for the whole
    batch, and each sample only contributes its class weight alpha[y].

    Here: `weight` = balanced weights from class_counts (uniform if None); `alpha` None -> the same
    class weights (train.py); a scalar -> that scaling factor times the class weights (hyperval.py);
    a per-class vector -> used as alpha[y] directly.
    """

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        gamma: float = 2.0,
        alpha: AlphaLike = None,
    ) -> None:
        super().__init__()
        w = balanced_class_weights(class_counts, num_classes) if class_counts is not None else torch.ones(num_classes)
        if alpha is None:
            a = w.clone()
        else:
            a = torch.as_tensor(alpha, dtype=torch.float32).flatten()
            a = a * w if a.numel() == 1 else _alpha_vector(a, num_classes)
        self.gamma = float(gamma)
        self.register_buffer("weight", w, persistent=False)
        self.register_buffer("alpha", a, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), targets, weight=self.weight)
        pt = torch.exp(-ce)
        return torch.mean(self.alpha[targets] * (1 - pt) ** self.gamma * ce)


class OneHotBCELoss(nn.Module):
    """BCEWithLogits on one-hot targets: each of the K outputs is its own sigmoid (seed 004 style)."""

    def __init__(self, num_classes: int, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else torch.empty(0), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(targets, self.num_classes).to(logits.dtype)
        pw = self.pos_weight if self.pos_weight.numel() else None
        return F.binary_cross_entropy_with_logits(logits, onehot, pos_weight=pw)


def loss_key(name: str) -> str:
    """The canonical name for `name` ('_' or '-'); a one-line error listing the losses if unknown."""
    key = name.strip().lower().replace("_", "-")
    if key not in LOSSES:
        raise XraylensError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return key


def build_loss(
    name: str,
    num_classes: int,
    class_counts: Sequence[int] | None = None,
    gamma: float = 2.0,
    alpha: AlphaLike = None,
) -> nn.Module:
    """The loss called `name` for a K-class task; `class_counts` feeds the weighted variants."""
    key = loss_key(name)
    if num_classes < 2:
        raise XraylensError(f"a classifier needs at least 2 classes, got {num_classes}; check the data folders")
    if key == "ce":
        return nn.CrossEntropyLoss()
    if key == "ce-weighted":
        if class_counts is None:
            raise XraylensError(
                "loss 'ce-weighted' needs class_counts (images per class in train); pass them or use --loss ce"
            )
        return nn.CrossEntropyLoss(weight=balanced_class_weights(class_counts, num_classes))
    if key == "focal":
        return FocalLoss(num_classes, gamma=gamma, alpha=alpha)
    if key == "focal-seed":
        return SeedFocalLoss(num_classes, class_counts=class_counts, gamma=gamma, alpha=alpha)
    return OneHotBCELoss(num_classes)  # "bce", the last of LOSSES
