"""ResNet-18/34/50/101/152 from timm (seeds 001 and 003)."""

from __future__ import annotations

import timm
from torch import nn

from xraylens.models._registry import register_model
from xraylens.models.arch import Arch


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


@register_model(hub=("timm", "resnet18"))
def resnet18(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
    """timm resnet18; stages layer1..layer4, head fc, CAM on the last block of layer4."""
    return timm_resnet("resnet18", num_classes, in_chans, drop_rate, **kw)


@register_model(hub=("timm", "resnet34"))
def resnet34(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
    """timm resnet34; stages layer1..layer4, head fc, CAM on the last block of layer4."""
    return timm_resnet("resnet34", num_classes, in_chans, drop_rate, **kw)


@register_model(hub=("timm", "resnet50"))
def resnet50(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
    """timm resnet50; stages layer1..layer4, head fc, CAM on the last block of layer4."""
    return timm_resnet("resnet50", num_classes, in_chans, drop_rate, **kw)


@register_model(hub=("timm", "resnet101"))
def resnet101(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
    """timm resnet101; stages layer1..layer4, head fc, CAM on the last block of layer4."""
    return timm_resnet("resnet101", num_classes, in_chans, drop_rate, **kw)


@register_model(hub=("timm", "resnet152"))
def resnet152(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
    """timm resnet152; stages layer1..layer4, head fc, CAM on the last block of layer4."""
    return timm_resnet("resnet152", num_classes, in_chans, drop_rate, **kw)
