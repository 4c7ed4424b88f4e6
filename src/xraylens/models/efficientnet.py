"""EfficientNet-B0 from timm (seed 003)."""

from __future__ import annotations

import timm
from torch import nn

from xraylens.models._registry import register_model
from xraylens.models.arch import Arch


@register_model(hub=("timm", "efficientnet_b0"))
def efficientnet_b0(
    num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object
) -> tuple[nn.Module, Arch]:
    kw.pop("image_size", None)
    model = timm.create_model(
        "efficientnet_b0",
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=drop_rate,
        **kw,
    )
    n = len(model.blocks)
    stages = [(f"blocks.{i}",) for i in range(n)]
    stages[-1] = stages[-1] + ("conv_head", "bn2")  # the 1x1 head conv belongs to the last stage
    arch = Arch(
        stem="conv_stem",
        stages=tuple(stages),
        head="classifier",
        # bn2 = BatchNorm + SiLU on conv_head: the activated 1280-channel map the pool sees
        cam=("bn2",),
    )
    return model, arch
