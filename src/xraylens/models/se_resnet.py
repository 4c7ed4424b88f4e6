"""SE-ResNet18 of the knee KL seed (000).

Check against timm's ``seresnet18`` (timm 1.0.x, ``BasicBlock.forward``): it runs
conv1-bn1-act1-conv2-bn2-**se**-(+shortcut)-act2, i.e. SE after the second batch norm and before
the residual add, with 1x1-conv FCs (bias) and a sigmoid gate -- the placement we want. It is NOT
exactly reduction 16, though: timm's ``SEModule`` rounds the squeeze width up to a multiple of 8
(``rd_divisor=8``), so layer1's 64 channels squeeze to 8 instead of 64 / 16 = 4. We therefore build
timm's resnet18 with ``SEModule(rd_divisor=1)``: the same block as ``seresnet18`` with exact
reduction 16 (4/8/16/32 hidden units in layer1..layer4). Parameter names match timm's seresnet18.
"""

from __future__ import annotations

from functools import partial

from timm.layers import SEModule
from torch import nn

from xraylens.models._registry import register_model
from xraylens.models.arch import Arch
from xraylens.models.resnet import timm_resnet


@register_model(hub=("timm", "resnet18"))
def se_resnet18(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
    """ResNet-18 with SE (reduction 16) in every block; ImageNet resnet18 weights fit (SE starts fresh)."""
    se = partial(SEModule, rd_ratio=1.0 / 16, rd_divisor=1)
    se_names = tuple(f"layer{i}.{j}.se" for i in range(1, 5) for j in range(2))
    return timm_resnet(
        "resnet18",
        num_classes,
        in_chans,
        drop_rate,
        new_prefixes=se_names,
        block_args=dict(attn_layer=se),
        **kw,
    )
