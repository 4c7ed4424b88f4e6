"""VGG-16/19 from torchvision (seed 001).

torchvision's VGG already pools adaptively to 7x7 before the classifier, so 64 px and
non-square inputs work and ImageNet weights (fc6/fc7 included) still fit.
"""

from __future__ import annotations

import torchvision
from torch import nn

from xraylens.errors import XraylensError
from xraylens.models._registry import register_model
from xraylens.models.arch import Arch


def _vgg(variant: str, num_classes: int, in_chans: int, drop_rate: float, kw: dict) -> tuple[nn.Module, Arch]:
    if kw:
        raise XraylensError(f"{variant} takes no extra options, got {', '.join(kw)}")
    model = getattr(torchvision.models, variant)(weights=None, num_classes=num_classes, dropout=drop_rate)
    if in_chans != 3:
        old = model.features[0]
        model.features[0] = nn.Conv2d(in_chans, old.out_channels, 3, padding=1)
    # Stages = the five conv blocks (each ends at a MaxPool), then fc6/fc7 as a sixth stage:
    # they are pretrained backbone weights, while classifier.6 is the head we replace.
    stages: list[tuple[str, ...]] = []
    current: list[str] = []
    pools: list[int] = []
    for i, m in enumerate(model.features):
        if isinstance(m, nn.Conv2d):
            current.append(f"features.{i}")
        elif isinstance(m, nn.MaxPool2d):
            stages.append(tuple(current))
            current = []
            pools.append(i)
    stages.append(("classifier.0", "classifier.3"))
    arch = Arch(
        stem="features.0",
        stages=tuple(stages),
        head="classifier.6",
        cam=(f"features.{pools[-1]}",),  # output of the last conv block (after its pool)
    )
    return model, arch


@register_model(hub=("torchvision", "vgg16"))
def vgg16(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
    kw.pop("image_size", None)
    return _vgg("vgg16", num_classes, in_chans, drop_rate, kw)


@register_model(hub=("torchvision", "vgg19"))
def vgg19(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
    kw.pop("image_size", None)
    return _vgg("vgg19", num_classes, in_chans, drop_rate, kw)
