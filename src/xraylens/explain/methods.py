"""CAM methods: one ``CamMethod`` record per method, each method's maths a small pure torch function.

Gradient methods are ``(activations [B,C,h,w], gradients [B,C,h,w] | None) -> [B,h,w]``; they only
hold a method's maths, and the engine (``engine.py``) owns hooks, targets, upsampling and
normalisation, so several methods share one forward and one backward pass. All functions run on the
tensors' device, batched, with no per-image Python loop.

The channel-weight formulas follow pytorch-grad-cam 1.5.7 (same epsilons) so the maps agree with it;
NormGrad follows Rebuffi et al., "There and back again: revisiting backpropagation saliency methods",
CVPR 2020, as used by Ozer et al. for chest X-ray quality.

Score-CAM needs extra forward passes through the model, so it is not a pure function of one pass:
its record has ``extra_forward=True`` and gets the model through a ``CamContext``. The engine calls
every method the same way, ``METHODS[name].compute(ctx)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xraylens.errors import XraylensError

CamFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""A one-pass method: ``(activations, gradients) -> maps [B,h,w]``."""
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""A target: model output of the B images (rows in batch order) -> one score per image [B]."""


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


@torch.no_grad()
def scorecam(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    a: torch.Tensor,
    target: ScoreFn,
    batch_size: int = 64,
) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020), batched over all channels of all images.

    Each channel of ``a`` [B,C,h,w] is upsampled to the input (bilinear, align_corners=True, as
    pytorch-grad-cam's ``UpsamplingBilinear2d``), min-max scaled to [0, 1] and multiplied into its
    image. The masked images go through ``forward`` channel by channel for the whole batch at once,
    so ``target`` always sees the B images' outputs in batch order (per-image targets stay valid);
    one forward holds ``batch_size // B`` channels (at least one). The channel weights are the
    softmax over channels of ``target(outputs)``.
    """
    b, c, h, w = a.shape
    size = x.shape[-2:]
    per_fwd = max(1, batch_size // max(b, 1))
    scores = torch.empty(c, b, device=x.device, dtype=torch.float32)
    for lo in range(0, c, per_fwd):  # loop over chunks of channels only
        n = min(per_fwd, c - lo)
        # channel-major rows: row j*b + i is image i masked by its channel lo + j
        m = a[:, lo : lo + n].transpose(0, 1).reshape(n * b, 1, h, w)
        m = F.interpolate(m.to(x.dtype), size=size, mode="bilinear", align_corners=True)
        m_lo = m.amin(dim=(2, 3), keepdim=True)
        m_hi = m.amax(dim=(2, 3), keepdim=True)
        m = (m - m_lo) / (m_hi - m_lo + 1e-8)
        out = forward(x.repeat(n, *([1] * (x.ndim - 1))) * m)
        for j in range(n):
            scores[lo + j] = target(out[j * b : (j + 1) * b]).float()
    weights = torch.softmax(scores.t(), dim=1).to(a.dtype)
    return torch.relu((weights[:, :, None, None] * a).sum(dim=1))


@dataclass(frozen=True)
class CamContext:
    """What one method may use for one layer: its captures, plus the model for Score-CAM.

    activations / gradients: [B,C,h,w] of the layer (gradients None when no backward ran).
    x: the model input [B,C,H,W]; forward: a no-grad forward of the model that records nothing;
    target: model output -> score per image [B] (the explained score); batch_size: Score-CAM's
    masked images per forward.
    """

    activations: torch.Tensor
    gradients: torch.Tensor | None = None
    x: torch.Tensor | None = None
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    target: ScoreFn | None = None
    batch_size: int = 64


@dataclass(frozen=True)
class CamMethod:
    """Everything the engine and the CLI know about one CAM method.

    fn: the maths — ``fn(activations, gradients)`` for one-pass methods, ``fn(ctx)`` when
        ``extra_forward``. Call ``compute(ctx)`` to run either kind.
    needs_gradients: the engine runs the backward pass only when a requested method needs it.
    extra_forward: the method runs the model again (Score-CAM's masked inputs).
    default_combine: how several layers' maps merge unless the caller says ("mean", "max", "product").
    summary: one line for --help.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    needs_gradients: bool = True
    extra_forward: bool = False
    default_combine: str = "mean"
    summary: str = ""

    def compute(self, ctx: CamContext) -> torch.Tensor:
        """The method's raw map [B,h,w] for one layer."""
        if self.extra_forward:
            return self.fn(ctx)
        return self.fn(ctx.activations, ctx.gradients)


def _scorecam_ctx(ctx: CamContext) -> torch.Tensor:
    if ctx.x is None or ctx.forward is None or ctx.target is None:
        raise XraylensError("scorecam needs the model input, its forward and a target; run it through CamEngine")
    return scorecam(ctx.forward, ctx.x, ctx.activations, ctx.target, ctx.batch_size)


# NormGrad's "combined" maps are the product of per-layer maps (Rebuffi et al.); the rest take the
# mean, pytorch-grad-cam's aggregation.
_RECORDS = [
    CamMethod("gradcam", gradcam, summary="Grad-CAM: channels weighted by their mean gradient"),
    CamMethod("gradcam++", gradcam_pp, summary="Grad-CAM++: higher-order gradient weights"),
    CamMethod("xgradcam", xgradcam, summary="XGrad-CAM: activation-normalised gradient weights"),
    CamMethod("layercam", layercam, summary="LayerCAM: positive gradients x activations per position"),
    CamMethod("hirescam", hirescam, summary="HiResCAM: gradients x activations, summed over channels"),
    CamMethod(
        "eigencam",
        eigencam,
        needs_gradients=False,
        summary="Eigen-CAM: first principal component of the activations (no gradients, no target)",
    ),
    CamMethod(
        "normgrad-scaling",
        normgrad_scaling,
        default_combine="product",
        summary="NormGrad, virtual per-channel scaling layer",
    ),
    CamMethod(
        "normgrad-conv1x1", normgrad_conv1x1, default_combine="product", summary="NormGrad, virtual 1x1 convolution"
    ),
    CamMethod(
        "normgrad-conv3x3", normgrad_conv3x3, default_combine="product", summary="NormGrad, virtual 3x3 convolution"
    ),
    CamMethod(
        "scorecam",
        _scorecam_ctx,
        needs_gradients=False,
        extra_forward=True,
        summary="Score-CAM: one masked forward pass per channel (slow)",
    ),
]

METHODS: dict[str, CamMethod] = {m.name: m for m in _RECORDS}
"""name -> ``CamMethod``, in the order help texts list them."""


def available_methods() -> list[str]:
    """Every method name, in help order."""
    return list(METHODS)


def methods_help(verbose: bool = False) -> str:
    """The method names as a comma list for CLI help; ``verbose``: one "name: summary" line each."""
    if verbose:
        return "\n".join(f"{m.name}: {m.summary}" for m in METHODS.values())
    return ", ".join(METHODS)


def resolve_methods(names: str | Sequence[str]) -> list[str]:
    """Validated method names from a comma string or a list: stripped, lower-cased, duplicates dropped
    (first kept). Unknown or no names raise ``XraylensError`` listing the known ones."""
    items = [names] if isinstance(names, str) else names
    if items is None or not all(isinstance(n, str) for n in items):
        raise XraylensError(f"CAM methods must be names such as 'gradcam,layercam'; choose from {methods_help()}")
    out: list[str] = []
    for item in items:
        for n in item.split(","):
            n = n.strip().lower()
            if n and n not in out:
                out.append(n)
    bad = [n for n in out if n not in METHODS]
    if bad:
        raise XraylensError(f"unknown CAM method(s) {', '.join(bad)}; choose from {methods_help()}")
    if not out:
        raise XraylensError(f"no CAM method given; choose from {methods_help()}")
    return out
