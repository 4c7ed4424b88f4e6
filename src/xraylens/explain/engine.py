"""The CAM engine: hooks, targets, one forward + one backward pass, upsampling and normalisation.

``CamEngine`` runs every requested gradient method from ONE forward and ONE backward pass per batch:
activations and gradients of the chosen layers are captured once and each method in
``methods.METHODS`` is a pure function of them. Score-CAM adds its masked forward passes (batched).
What is explained is a target: a class ("pred", "true", an index, one per image) of a classifier's
logits [B, K], or any callable ``target(output) -> [B]`` (``targets.py``), for models that return
something else (segmentation maps [B,K,H,W], fused outputs).

Design choices worth knowing:

* Gradients are captured with tensor hooks (``output.register_hook``) registered in the forward hook,
  before any in-place op (DenseNet's ``relu(inplace=True)``) can touch the tensor; the activation is
  stored as a detached copy for the same reason.
* The backward pass starts at the target score and stops at the first hooked layer: that layer's
  output is replaced by a fresh leaf, and ``torch.autograd.grad`` asks only for it. So no parameter
  gradient is computed or accumulated (``.grad`` of the model is never touched), nothing below the
  layer is back-propagated, and it works whatever the parameters' ``requires_grad`` are.
* The model's train/eval mode is left as the caller set it (explain in eval mode: in train mode
  BatchNorm uses batch statistics and updates its running averages).
* Per-layer maps are ReLU'd by the method, upsampled bilinearly (``align_corners=False``, the same
  sampling as OpenCV's ``INTER_LINEAR`` for enlargement) and min-max normalised per image. With several
  layers each is normalised before combining (mean / max / product), then the result is normalised
  again; each method's record gives its default combination (NormGrad: the product, Rebuffi et al.'s
  "combined" maps; the others: the mean, pytorch-grad-cam's aggregation).
* A map that is constant (e.g. all zero after the ReLU) cannot be normalised: it is returned as zeros
  and flagged in ``CamResult.constant``; maps never contain NaN.
* ``precision="bf16"`` runs the forward and the backward pass under bfloat16 autocast (CUDA, or CPU
  autocast); the captured activations and gradients are cast to float32 before any method's
  arithmetic, upsampling and normalisation. Measured with CPU bf16 on the fixture radiographs (8 chest,
  8 knee; resnet18/50, densenet121, efficientnet_b0 at 224 px) the normalised maps of every method but
  XGrad-CAM stay within ``BF16_TOLERANCE`` (worst 0.0075 mean absolute difference per map, 0.020 at the
  99th percentile pixel). XGrad-CAM divides by the sum of the activations, which is near zero for a
  layer before its ReLU (DenseNet's ``norm5``): there bf16 moved maps by up to 0.40 on average; use
  fp32 for XGrad-CAM on such layers (on ResNets it equals Grad-CAM and stays within tolerance).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xraylens.errors import XraylensError
from xraylens.explain.methods import METHODS, CamContext, ScoreFn, resolve_methods
from xraylens.explain.targets import ClassTarget, class_scores
from xraylens.ops import class_probabilities

Targets = str | int | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

_COMBINE = ("mean", "max", "product")
_SCORES = ("logit", "prob")
PRECISIONS = ("fp32", "bf16")
# bf16 vs fp32 normalised maps ([0, 1]): the mean absolute difference per map stays below this, the
# 99th percentile of the pixelwise difference below BF16_TOLERANCE_P99 (tests/test_explain_bf16.py);
# XGrad-CAM on a layer whose activations sum to about zero is the exception (module docstring)
BF16_TOLERANCE = 0.01
BF16_TOLERANCE_P99 = 0.03


@dataclass
class CamResult:
    """Everything one engine call produced; tensors stay on the model's device.

    maps: method -> [B,1,H,W] float, upsampled to the input (or ``output_size``), per-image in [0, 1]
        when normalised.
    raw: method -> layer -> [B,1,h,w], the method's map at the layer's resolution, un-normalised.
    logits: the model's output of the explained pass: logits [B, K] for a classifier, whatever the
        model returned (e.g. [B,K,H,W]) when the target is a callable.
    targets: [B] long, the explained class per image; -1 for a callable target other than
        ``ClassTarget`` (it explains a score, not a class index).
    constant: method -> [B] bool, True where the map was constant (returned as zeros).
    """

    maps: dict[str, torch.Tensor]
    raw: dict[str, dict[str, torch.Tensor]]
    logits: torch.Tensor
    targets: torch.Tensor
    constant: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def probs(self) -> torch.Tensor:
        """Probability of the explained class per image, [B] float32; NaN where no class was explained
        (target -1) or the output is not logits [B, K]."""
        b = self.targets.shape[0]
        if self.logits.ndim != 2:
            return torch.full((b,), float("nan"), device=self.logits.device)
        p = class_probabilities(self.logits).gather(1, self.targets.clamp_min(0)[:, None]).squeeze(1)
        return torch.where(self.targets >= 0, p, float("nan"))

    @property
    def preds(self) -> torch.Tensor:
        """Arg-max class per image, [B]; needs logits [B, K]."""
        if self.logits.ndim != 2:
            raise XraylensError(f"preds need logits [B, K]; this model returned {tuple(self.logits.shape)}")
        return class_probabilities(self.logits).argmax(dim=1)

    def numpy(self, method: str):
        """``maps[method]`` as a float32 numpy array [B,H,W] (copied to the CPU)."""
        return self.maps[method][:, 0].float().cpu().numpy()


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (x - min) / (max - min) of [B,1,H,W]; constant maps -> zeros, flagged in the [B] mask."""
    maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    lo = maps.amin(dim=(1, 2, 3), keepdim=True)
    hi = maps.amax(dim=(1, 2, 3), keepdim=True)
    rng = hi - lo
    # relative test so a large but flat map (float noise) also counts as constant
    const = rng <= eps * torch.maximum(hi.abs(), torch.ones_like(hi))
    out = torch.where(const, torch.zeros_like(maps), (maps - lo) / torch.where(const, 1.0, rng))
    return out, const.flatten()


def _resolve_layers(model: nn.Module, layers: Sequence[str] | str | None) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    if layers is None:
        layers = getattr(model, "default_cam_layers", None)
    if layers is None:
        try:  # the model registry knows the default CAM layers of zoo models
            from xraylens.models.registry import cam_layers

            layers = cam_layers(model)
        except Exception:  # registry missing or model unknown to it: the caller must name layers
            layers = None
    if not layers:
        raise XraylensError(
            f"no CAM layer known for {type(model).__name__}; pass layers=[...] with module names "
            "(see model.named_modules())"
        )
    names = dict(model.named_modules())
    for name in layers:
        if name not in names:
            close = [n for n in names if n and (name in n or n.endswith(name.split(".")[-1]))][:5]
            # otherwise suggest the default CAM layers and the top-level conv stages, not the classifier
            top = [n for n, m in model.named_children() if any(isinstance(c, nn.Conv2d) for c in m.modules())]
            hint = close or [*getattr(model, "default_cam_layers", []), *top][:6]
            raise XraylensError(
                f"layer {name!r} not found in {type(model).__name__}; pass a module name such as {hint}"
            )
    return list(layers)


class CamEngine:
    """Explain a batch with many CAM methods from one forward and one backward pass.

    Use as a context manager; hooks are registered on entry and always removed on exit::

        with CamEngine(model, ["layer4"]) as engine:
            result = engine(x, ["gradcam", "normgrad-conv1x1"], targets="pred")

    Calling it outside ``with`` registers and removes the hooks around that one call.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | str | None = None) -> None:
        self.model = model
        self.layers = _resolve_layers(model, layers)
        self._modules = {n: model.get_submodule(n) for n in self.layers}
        self._handles: list = []
        self._capture = False
        self._need_grad = False
        self._cut: torch.Tensor | None = None
        self._acts: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._precision = "fp32"

    # -- hooks -----------------------------------------------------------------------------------
    def __enter__(self) -> CamEngine:
        if not self._handles:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and drop captured tensors (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._clear()

    def _clear(self) -> None:
        self._acts.clear()
        self._grads.clear()
        self._cut = None

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs, output):
            if not self._capture:  # Score-CAM's masked passes and foreign forwards are not recorded
                return None
            if not isinstance(output, torch.Tensor) or output.ndim != 4:
                raise XraylensError(
                    f"layer {name!r} outputs {type(output).__name__} "
                    f"{tuple(getattr(output, 'shape', ()))}; choose a layer with a [B,C,h,w] tensor output"
                )
            if not self._need_grad:
                self._acts[name] = output.detach().clone()
                return None
            if self._cut is None:
                # first hooked layer: backward stops here. Downstream gets a copy of the leaf so an
                # in-place op there cannot touch the leaf (autograd forbids it) or our activations.
                leaf = output.detach().requires_grad_(True)
                self._cut = leaf
                self._acts[name] = leaf.detach()
                leaf.register_hook(self._grad_saver(name))
                return leaf.clone()
            # later layers: copy the value now, hook the gradient before any in-place op runs
            self._acts[name] = output.detach().clone()
            if output.requires_grad:
                output.register_hook(self._grad_saver(name))
            return None

        return hook

    def _grad_saver(self, name: str):
        def save(grad: torch.Tensor) -> None:
            self._grads[name] = grad.detach()

        return save

    # -- call ------------------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        methods: Sequence[str] | str = ("gradcam",),
        targets: Targets = "pred",
        labels: torch.Tensor | Sequence[int] | None = None,
        combine: str | None = None,
        score: str = "logit",
        normalize: bool = True,
        output_size: tuple[int, int] | None = None,
        scorecam_batch_size: int = 64,
        precision: str = "fp32",
    ) -> CamResult:
        """Explain ``x`` [B,C,H,W] (already normalised model input).

        methods: names, as a list or a comma string (see ``methods.resolve_methods``).
        targets: "pred" (arg-max), "true" (needs ``labels``), one class index, one per image, or a
            callable ``target(output) -> [B]`` such as ``ClassTarget`` / ``SegmentationTarget``;
            only with a callable may the model return something other than logits [B, K].
        combine: how several layers merge — "mean", "max" or "product"; None = each method's
            default (product for NormGrad, mean for the rest).
        score: back-propagate the target class's "logit" or softmax "prob" (also Score-CAM's score);
            a callable target defines its own score, so it needs the default "logit".
        precision: "fp32", or "bf16" for the model's passes under bfloat16 autocast (maps within
            ``BF16_TOLERANCE`` of fp32; the maps' own arithmetic stays float32).
        """
        methods = resolve_methods(methods)
        self._check_args(x, combine, score)
        check_precision(precision)
        if not self._handles:  # not entered: hooks for this call only
            with self:
                return self(
                    x, methods, targets, labels, combine, score, normalize, output_size, scorecam_batch_size, precision
                )
        device = _model_device(self.model, x)
        x = x.to(device)
        self._precision = precision
        self._need_grad = any(METHODS[m].needs_gradients for m in methods)
        self._clear()
        self._capture = True
        try:
            with torch.enable_grad() if self._need_grad else torch.no_grad():
                with self._autocast(device):  # the forward only: backward runs in the forward's dtypes
                    out = self.model(x)
                if not isinstance(out, torch.Tensor):
                    raise XraylensError(f"the model returned {type(out).__name__}; wrap it to return a tensor")
                if precision != "fp32":
                    out = out.float()  # scores (softmax for score="prob") in float32; the cast is differentiable
                self._capture = False
                target, tgt = _resolve_targets(targets, labels, out, score)
                missing = [n for n in self.layers if n not in self._acts]
                if missing:
                    raise XraylensError(f"layers {missing} did not run in the forward pass; choose others")
                if self._need_grad:
                    total = target(out).sum()
                    if not total.requires_grad:
                        raise XraylensError("the model's output does not depend on the CAM layer; check layers")
                    # ONE backward for every gradient method; only reaches the first hooked layer
                    torch.autograd.grad(total, [self._cut], allow_unused=True)
                    missing = [n for n in self.layers if n not in self._grads]
                    if missing:
                        raise XraylensError(
                            f"layers {missing} got no gradient (they do not lie after {self.layers[0]!r} "
                            "on the path to the output); explain them in a separate engine"
                        )
            out = out.detach()
            if precision != "fp32":  # the maps' arithmetic in float32, whatever the passes ran in
                self._acts = {k: v.float() for k, v in self._acts.items()}
                self._grads = {k: v.float() for k, v in self._grads.items()}
            raw: dict[str, dict[str, torch.Tensor]] = {}
            for m in methods:
                raw[m] = {}
                for name in self.layers:
                    ctx = CamContext(
                        self._acts[name], self._grads.get(name), x, self._forward_plain, target, scorecam_batch_size
                    )
                    raw[m][name] = METHODS[m].compute(ctx).detach().unsqueeze(1)
        finally:
            self._capture = False
            self._clear()  # no tensors (and so no graph) survive the call
        size = tuple(output_size) if output_size is not None else tuple(x.shape[-2:])
        maps: dict[str, torch.Tensor] = {}
        constant: dict[str, torch.Tensor] = {}
        for m in methods:
            how = combine or METHODS[m].default_combine
            maps[m], constant[m] = _combine(list(raw[m].values()), size, how, normalize)
        return CamResult(maps=maps, raw=raw, logits=out, targets=tgt, constant=constant)

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast(x.device):
            out = self.model(x)
            return out.float() if self._precision != "fp32" else out

    def _autocast(self, device: torch.device):
        if self._precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_args(self, x, combine, score) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise XraylensError(f"expected an input batch [B,C,H,W], got {tuple(getattr(x, 'shape', ()))}")
        check_options(combine, score)


def check_precision(precision: str) -> None:
    """--precision: fp32 or bf16 (bf16 needs a device with bfloat16 autocast: CUDA or CPU)."""
    if precision not in PRECISIONS:
        raise XraylensError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")


def check_options(combine: str | None = None, score: str = "logit") -> None:
    """The engine's string options, checkable before any data is loaded (--combine, --score)."""
    if combine is not None and combine not in _COMBINE:
        raise XraylensError(f"combine={combine!r} is not one of {', '.join(_COMBINE)}")
    if score not in _SCORES:
        raise XraylensError(f"score={score!r} is not one of {', '.join(_SCORES)}")


def _model_device(model: nn.Module, x: torch.Tensor) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else x.device


def _resolve_targets(targets: Targets, labels, out: torch.Tensor, score: str) -> tuple[ScoreFn, torch.Tensor]:
    """(score function out -> [B], explained class per image [B] or -1s) for the engine's targets."""
    b = out.shape[0]
    dev = out.device
    if callable(targets) and not isinstance(targets, torch.Tensor):
        if score != "logit":
            raise XraylensError(
                f"score={score!r} applies to class targets; a callable target defines its own "
                "score (e.g. ClassTarget(k, prob=True))"
            )
        if isinstance(targets, ClassTarget):
            tgt = targets.classes(b, dev)
            if out.ndim == 2:
                _check_classes(tgt, out)
        else:
            tgt = torch.full((b,), -1, device=dev, dtype=torch.long)
        return _checked(targets, b), tgt
    if out.ndim != 2:
        raise XraylensError(
            f"the model returned {tuple(out.shape)}, not logits [B, K]; pass a callable target "
            "such as xraylens.explain.targets.SegmentationTarget"
        )
    t = _class_indices(targets, labels, out)
    return _checked(ClassTarget(t, prob=score == "prob"), b), t


def _checked(target: Callable[[torch.Tensor], torch.Tensor], b: int) -> ScoreFn:
    """``target`` with its result checked to be one score per image, returned as [B]."""

    def score(out: torch.Tensor) -> torch.Tensor:
        s = target(out)
        if not isinstance(s, torch.Tensor) or s.numel() != b:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise XraylensError(f"target(output) must return one score per image ({b}), got {got}")
        return s.reshape(b)

    return score


def _check_classes(t: torch.Tensor, logits: torch.Tensor) -> None:
    k = 2 if logits.shape[1] == 1 else logits.shape[1]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
        raise XraylensError(f"target classes must lie in 0..{k - 1} for this model, got {t.tolist()}")


def _class_indices(targets: Targets, labels, logits: torch.Tensor) -> torch.Tensor:
    b = logits.shape[0]
    dev = logits.device
    if isinstance(targets, str):
        if targets == "pred":
            return class_scores(logits.detach()).argmax(dim=1)
        if targets == "true":
            if labels is None:
                raise XraylensError('targets="true" needs labels=[...] (one class index per image)')
            t = torch.as_tensor(labels, device=dev).long().flatten()
        else:
            raise XraylensError(f'targets={targets!r}: use "pred", "true", a class index or one per image')
    elif isinstance(targets, int):
        t = torch.full((b,), int(targets), device=dev, dtype=torch.long)
    else:
        t = torch.as_tensor(targets, device=dev).long().flatten()
    if t.numel() != b:
        raise XraylensError(f"got {t.numel()} targets for a batch of {b} images; pass one per image")
    _check_classes(t, logits)
    return t


def _combine(
    per_layer: list[torch.Tensor], size: tuple[int, int], how: str, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    ups = [F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in per_layer]
    if len(ups) == 1:
        out = ups[0]
    else:
        # several layers: bring each to [0, 1] first, so no layer dominates by its scale
        stack = torch.stack([minmax_normalize(u)[0] for u in ups])
        out = stack.mean(0) if how == "mean" else stack.amax(0) if how == "max" else stack.prod(0)
    if normalize:
        return minmax_normalize(out)
    out = torch.nan_to_num(out)
    _, const = minmax_normalize(out)
    return torch.where(const[:, None, None, None], 0.0, out), const


def explain(
    model: nn.Module,
    x: torch.Tensor,
    methods: Sequence[str] | str = ("gradcam",),
    layers: Sequence[str] | str | None = None,
    **kw,
) -> CamResult:
    """One-shot convenience: ``CamEngine(model, layers)(x, methods, **kw)`` with hooks released after."""
    with CamEngine(model, layers) as engine:
        return engine(x, methods, **kw)
