"""Clinical fusion as a model wrapper around any zoo backbone (no fork of the training loop).

`early`: the clinical vector z [B, F] becomes F constant planes appended to the image channels; the
    backbone's stem conv is widened by F input channels (its image weights, pretrained or not, are
    kept; the new ones start at the conv's default init). Augmentation never touches the planes: they
    are added inside the wrapper, after the loop's augmentation.
`late`: the backbone's classifier becomes an identity, so it returns its pooled features [B, D];
    z (optionally through Linear-ReLU layers, `mlp_hidden`) is mapped by Linear + BatchNorm1d to D
    units (the image features' width and scale; see the comment in `__init__` for why), concatenated
    to them, and a new head (Linear, or the MLP head `head_hidden` describes) classifies [2D].
`none`: no wrapper.

`forward(x, clinical)` takes the clinical tensor per batch. Called as `forward(x)` it uses the tensor
bound with `bind(z)`: that is how the CAM engine, Score-CAM and any other image-only caller run the
fused model without knowing about clinical data (the image branch's CAMs, with z held fixed). A batch
that is k copies of the bound batch (Score-CAM's masked inputs) gets z repeated k times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from xraylens.errors import XraylensError
from xraylens.models.heads import MLPHead

FUSION_MODES = ("none", "early", "late")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class FusedModel(nn.Module):
    """A zoo backbone with clinical fusion; `default_cam_layers` point into `backbone`."""

    def __init__(
        self,
        backbone: nn.Module,
        mode: str,
        n_clinical: int,
        *,
        mlp_hidden: Sequence[int] = (),
        head_hidden: Sequence[int] = (),
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in ("early", "late"):
            raise XraylensError(f"fusion mode must be early or late here, got {mode!r}")
        if n_clinical < 1:
            raise XraylensError("fusion needs at least one clinical feature")
        arch = backbone.xraylens_arch
        self.mode, self.n_clinical = mode, int(n_clinical)
        self.num_classes = backbone.num_classes
        self.in_chans = backbone.in_chans
        self.xraylens_name = backbone.xraylens_name
        self.default_cam_layers = [f"backbone.{n}" for n in backbone.default_cam_layers]
        self._bound: torch.Tensor | None = None
        if mode == "early":
            old = backbone.get_submodule(arch.stem)
            if not isinstance(old, nn.Conv2d):
                raise TypeError(f"stem {arch.stem!r} is {type(old).__name__}, expected nn.Conv2d")
            new = nn.Conv2d(
                old.in_channels + self.n_clinical,
                old.out_channels,
                old.kernel_size,
                old.stride,
                old.padding,
                old.dilation,
                old.groups,
                old.bias is not None,
                old.padding_mode,
            )
            with torch.no_grad():
                new.weight[:, : old.in_channels] = old.weight
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            new.requires_grad_(old.weight.requires_grad)
            _set_submodule(backbone, arch.stem, new)
            self.clinical_mlp = nn.Identity()
            self.head = nn.Identity()
        else:
            old = backbone.get_submodule(arch.head)
            first = old if isinstance(old, nn.Linear) else next(m for m in old.modules() if isinstance(m, nn.Linear))
            width = first.in_features
            _set_submodule(backbone, arch.head, nn.Identity())
            layers: list[nn.Module] = []
            f = self.n_clinical
            for h in mlp_hidden:
                layers += [nn.Linear(f, int(h)), nn.ReLU()]
                f = int(h)
            # Why an embedding as wide as the image features, batch-normalised: concatenated raw, the
            # F clinical values met D = 512-1296 image features in one fresh Linear. Adam moves each
            # weight by about lr per step, so a logit can gain ~lr per step per informative input: the
            # image block has D of them, age has one. After a 5-epoch run (~60 steps at lr 1e-3) the
            # clinical weights had not even left their random init (+-1/sqrt(D+F)), and late fusion
            # scored like image-only. Early fusion escapes this because its constant planes go
            # through conv + BatchNorm into every channel. Here z gets the same treatment: a linear
            # map to D units, each normalised to unit scale over the batch, so the head sees the
            # clinical signal in D inputs of the image features' scale. Still linear in z (no ReLU):
            # without `mlp_hidden` the clinical branch stays a linear model of z.
            layers += [nn.Linear(f, width), nn.BatchNorm1d(width)]
            self.clinical_mlp = nn.Sequential(*layers)
            self.head = MLPHead(2 * width, tuple(head_hidden), self.num_classes, drop_rate)
        self.backbone = backbone

    @contextlib.contextmanager
    def bind(self, clinical: torch.Tensor | None) -> Iterator[FusedModel]:
        """Run `forward(x)` with this clinical batch (image-only callers: the CAM engine)."""
        prev, self._bound = self._bound, clinical
        try:
            yield self
        finally:
            self._bound = prev

    def _clinical_for(self, x: torch.Tensor, clinical: torch.Tensor | None) -> torch.Tensor:
        z = clinical if clinical is not None else self._bound
        if z is None:
            raise XraylensError(
                f"this model fuses {self.n_clinical} clinical features ({self.mode}); pass them per batch "
                "(model(x, clinical)) or bind them (with model.bind(z))"
            )
        z = z.to(device=x.device, dtype=x.dtype)
        b = x.shape[0]
        if z.shape[0] != b:
            if z.shape[0] == 1 or (z.shape[0] and b % z.shape[0] == 0 and clinical is None):
                z = z.repeat(b // z.shape[0], 1)  # Score-CAM: k masked copies of the bound batch
            else:
                raise XraylensError(f"clinical batch has {z.shape[0]} rows for {b} images")
        if z.shape[1] != self.n_clinical:
            raise XraylensError(f"clinical batch has {z.shape[1]} features; the model takes {self.n_clinical}")
        return z

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        z = self._clinical_for(x, clinical)
        if self.mode == "early":
            planes = z[:, :, None, None].expand(-1, -1, x.shape[-2], x.shape[-1])
            return self.backbone(torch.cat([x, planes], dim=1))
        feats = self.backbone(x)
        return self.head(torch.cat([feats.flatten(1), self.clinical_mlp(z)], dim=1))


def fuse_model(
    backbone: nn.Module,
    mode: str,
    n_clinical: int,
    *,
    mlp_hidden: Sequence[int] = (),
    head_hidden: Sequence[int] = (),
    drop_rate: float = 0.0,
) -> nn.Module:
    """`backbone` itself for mode none, else the `FusedModel` around it."""
    mode = str(mode).lower()
    if mode not in FUSION_MODES:
        raise XraylensError(f"fusion mode {mode!r}: use {', '.join(FUSION_MODES)}")
    if mode == "none":
        return backbone
    return FusedModel(backbone, mode, n_clinical, mlp_hidden=mlp_hidden, head_hidden=head_hidden, drop_rate=drop_rate)


def is_fused(model: nn.Module) -> bool:
    return isinstance(getattr(model, "module", model), FusedModel) or isinstance(model, FusedModel)


def bind_clinical(model: nn.Module, clinical: torch.Tensor | None):
    """`model.bind(clinical)` for a fused model, a no-op context otherwise."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    if isinstance(inner, FusedModel):
        return inner.bind(clinical)
    return contextlib.nullcontext(model)


def clinical_batch(rows: np.ndarray | None, idx, device: torch.device | str | None = None) -> torch.Tensor | None:
    """A split's clinical feature rows `rows[idx]` as a tensor on `device`; None for a run without a table.
    `idx`: indices (numpy or a tensor on any device) or a slice."""
    if rows is None:
        return None
    if isinstance(idx, torch.Tensor):
        idx = idx.cpu().numpy()
    return torch.from_numpy(np.asarray(rows[idx])).to(device)


def forward_with(model: nn.Module, x: torch.Tensor, clinical: torch.Tensor | None) -> torch.Tensor:
    """`model(x, clinical)` when there is a clinical batch, else `model(x)`: the one call site rule."""
    return model(x) if clinical is None else model(x, clinical)
