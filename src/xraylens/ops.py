"""Small tensor operations shared by augmentation, localisation, faithfulness and explanations."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from xraylens.errors import XraylensError


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W], radius 3 sigma, replicate-padded (edges keep their value)."""
    r = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities [B, K] in float32 from model logits [B, K].

    A single logit z (a BCE model) reads as two classes: [1 - sigmoid(z), sigmoid(z)], computed as
    [sigmoid(-z), sigmoid(z)] so neither side rounds to 0 early. K >= 2 logits: softmax.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise XraylensError(f"expected logits [B, K], got {tuple(getattr(logits, 'shape', ()))}")
    z = logits.float()
    if z.shape[1] == 1:
        return torch.cat([torch.sigmoid(-z), torch.sigmoid(z)], dim=1)
    return torch.softmax(z, dim=1)


def class_probabilities_np(logits: np.ndarray) -> np.ndarray:
    """``class_probabilities`` for a numpy array [B, K]; returns float32 [B, K'] (K' = 2 for one logit)."""
    return class_probabilities(torch.from_numpy(np.ascontiguousarray(logits))).numpy()
