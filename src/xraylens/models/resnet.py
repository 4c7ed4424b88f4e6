"""ResNet-18/34/50/101/152 from timm (seeds 001 and 003)."""

from __future__ import annotations

import timm
from torch import nn

from xraylens.models.registry import Arch, register_model


def timm_resnet(
    variant: str,
    num_classes: int,
    in_chans: int,
    drop_rate: float,
    new_prefixes: tuple[str, ...] = (),
    **kw: object,
) -> tuple[nn.Module, Arch]:
    """A timm ResNet with our ``Arch``; shared with ``se_resnet``."""
    kw.pop("image_size", None)  # resnets pool globally; any size works
    model = timm.create_model(
        variant, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, **kw
    )
    last = len(model.layer4) - 1
    arch = Arch(
        stem="conv1",
        stages=(("layer1",), ("layer2",), ("layer3",), ("layer4",)),
        head="fc",
        cam=(f"layer4.{last}",),
        new_prefixes=new_prefixes,
    )
    return model, arch


def _make(variant: str):  # one small constructor per depth, registered under its own name
    def build(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
        return timm_resnet(variant, num_classes, in_chans, drop_rate, **kw)

    build.__name__ = build.__qualname__ = variant
    build.__doc__ = f"timm {variant}; stages layer1..layer4, head fc, CAM on the last block of layer4."
    return register_model(build, hub=("timm", variant))


resnet18 = _make("resnet18")
resnet34 = _make("resnet34")
resnet50 = _make("resnet50")
resnet101 = _make("resnet101")
resnet152 = _make("resnet152")
