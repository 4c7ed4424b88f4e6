"""CAM methods as small pure torch functions: ``(activations [B,C,h,w], gradients [B,C,h,w]) -> [B,h,w]``.

Each function only holds a method's maths; the engine (``engine.py``) owns hooks, targets, upsampling
and normalisation, so several methods can share one forward and one backward pass. All functions run
on the tensors' device, batched, with no per-image Python loop.

The channel-weight formulas follow pytorch-grad-cam 1.5.7 (same epsilons) so the maps agree with it;
NormGrad follows Rebuffi et al., "There and back again: revisiting backpropagation saliency methods",
CVPR 2020, as used by Ozer et al. for chest X-ray quality.

Score-CAM needs extra forward passes through the model, so it is not a pure function of one pass:
``scorecam`` lives here too but has its own signature and is listed in ``SCORE_METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

CamFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _spatial_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=(2, 3), keepdim=True)


def gradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of the gradients."""
    w = g.mean(dim=(2, 3), keepdim=True)
    return torch.relu((w * a).sum(dim=1))


def gradcam_pp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19) with the exp-score shortcut pytorch-grad-cam uses."""
    g2 = g * g
    g3 = g2 * g
    alpha = g2 / (2 * g2 + _spatial_sum(a) * g3 + 1e-6)
    # where the gradient is exactly zero the coefficient is undefined: zero it, as the paper's ReLU does
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    w = _spatial_sum(torch.relu(g) * alpha)
    return torch.relu((w * a).sum(dim=1))


def xgradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): gradients weighted by the activations' share of their channel sum."""
    w = _spatial_sum(g * a / (_spatial_sum(a) + 1e-7))
    return torch.relu((w * a).sum(dim=1))


def layercam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): per-position positive gradients times activations."""
    return torch.relu((torch.relu(g) * a).sum(dim=1))


def hirescam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): element-wise gradient x activation, summed over channels."""
    return torch.relu((g * a).sum(dim=1))


def eigencam(a: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): projection on the first principal component of activations.

    The SVD's sign is arbitrary, so the projection is flipped when its most negative value outweighs
    its most positive one (the sign correction pytorch-grad-cam applies in its Seg-Eigen-CAM helper;
    its plain EigenCAM leaves the sign to LAPACK, which can give an all-zero map after the ReLU).
    """
    b, c, h, w = a.shape
    x = torch.nan_to_num(a.float()).reshape(b, c, h * w).transpose(1, 2)  # [B, hw, C]
    x = x - x.mean(dim=1, keepdim=True)  # centre each channel over positions, as pytorch-grad-cam
    # X v1 = s1 u1: the first left singular vector scaled is the projection, no need for V
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    proj = u[:, :, 0] * s[:, :1]  # [B, hw]
    flip = proj.amin(dim=1).abs() > proj.amax(dim=1).abs()
    proj = torch.where(flip[:, None], -proj, proj)
    return torch.relu(proj.reshape(b, h, w)).to(a.dtype)


def normgrad_scaling(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """NormGrad, scaling: gradient of a virtual per-channel scaling layer, ‖A ⊙ G‖₂ over channels."""
    return torch.linalg.vector_norm(a * g, dim=1)


def normgrad_conv1x1(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """NormGrad, conv1x1: a virtual 1x1 conv's weight gradient G Aᵀ has norm ‖A‖₂·‖G‖₂ per position."""
    return torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(g, dim=1)


def normgrad_conv3x3(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """NormGrad, conv3x3: ‖unfold₃ₓ₃(A)‖₂·‖G‖₂ with zero padding 1.

    The norm of the unfolded 3x3 patch is the square root of a 3x3 box sum of Σ_c A², which avoids
    materialising the 9x larger unfolded tensor.
    """
    sq = (a * a).sum(dim=1, keepdim=True)
    box = F.avg_pool2d(sq, 3, stride=1, padding=1, count_include_pad=True) * 9.0
    return torch.sqrt(box.clamp_min(0)).squeeze(1) * torch.linalg.vector_norm(g, dim=1)


METHODS: dict[str, CamFn] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_pp,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "hirescam": hirescam,
    "eigencam": eigencam,
    "normgrad-scaling": normgrad_scaling,
    "normgrad-conv1x1": normgrad_conv1x1,
    "normgrad-conv3x3": normgrad_conv3x3,
}
"""One-pass methods: name -> ``fn(activations, gradients) -> maps [B,h,w]``."""

NO_GRADIENT = frozenset({"eigencam", "scorecam"})
"""Methods that need no backward pass."""

NORMGRAD = frozenset(k for k in METHODS if k.startswith("normgrad"))
"""Methods whose multi-layer ("combined") mode is a product of per-layer maps, as Rebuffi et al."""


@torch.no_grad()
def scorecam(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    a: torch.Tensor,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    batch_size: int = 64,
) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020), batched over all channels of all images.

    Each channel of ``a`` [B,C,h,w] is upsampled to the input (bilinear, align_corners=True, as
    pytorch-grad-cam's ``UpsamplingBilinear2d``), min-max scaled to [0, 1] and multiplied into its
    image; the masked images of the whole batch go through ``forward`` in chunks of ``batch_size``.
    The channel weights are the softmax over channels of ``score(outputs, targets)``.
    """
    b, c, h, w = a.shape
    size = x.shape[-2:]
    flat = a.reshape(b * c, 1, h, w)
    scores = torch.empty(b * c, device=x.device, dtype=torch.float32)
    for start in range(0, b * c, batch_size):  # loop over chunks of (image, channel) pairs only
        idx = torch.arange(start, min(start + batch_size, b * c), device=x.device)
        img = torch.div(idx, c, rounding_mode="floor")
        m = F.interpolate(flat[idx].to(x.dtype), size=size, mode="bilinear", align_corners=True)
        lo = m.amin(dim=(2, 3), keepdim=True)
        hi = m.amax(dim=(2, 3), keepdim=True)
        m = (m - lo) / (hi - lo + 1e-8)
        out = forward(x[img] * m)
        scores[idx] = score(out, targets[img]).float()
    weights = torch.softmax(scores.reshape(b, c), dim=1).to(a.dtype)
    return torch.relu((weights[:, :, None, None] * a).sum(dim=1))


SCORE_METHODS = frozenset({"scorecam"})
"""Methods that run the model again on masked inputs (handled by the engine)."""


def available_methods() -> list[str]:
    return [*METHODS, *sorted(SCORE_METHODS)]
