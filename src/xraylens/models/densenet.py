"""DenseNet-121 from torchvision parts (osteoporosis design, and the base of SE-DenseNet-121)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from xraylens.errors import XraylensError
from xraylens.models._registry import register_model
from xraylens.models.arch import Arch

# Old torchvision checkpoints name dense-layer parts "norm.1" instead of "norm1".
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def remap_old_densenet_key(key: str) -> str:
    m = _OLD_KEY.match(key)
    return m.group(1) + m.group(2) if m else key


class DenseNetClassifier(nn.Module):
    """``features`` -> ReLU -> global average pool -> dropout -> ``classifier``.

    Same parameter names as torchvision's DenseNet, but the final ReLU is not in place, so a hook
    on ``features.norm5`` (the default CAM layer) keeps the tensor it saw.
    """

    def __init__(self, features: nn.Sequential, num_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.features = features
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(num_features, num_classes)
        nn.init.constant_(self.classifier.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(self.dropout(x))


def densenet_arch(
    block_count: int, new_prefixes: tuple[str, ...] = (), extra: dict[int, tuple[str, ...]] | None = None
) -> Arch:
    """Stages: stage k = transition(k-1) + denseblock k (+ ``extra[k]``); norm5 joins the last."""
    extra = extra or {}
    stages = []
    for k in range(1, block_count + 1):
        parts = ([f"features.transition{k - 1}"] if k > 1 else []) + [f"features.denseblock{k}"]
        parts += list(extra.get(k, ()))
        if k == block_count:
            parts.append("features.norm5")
        stages.append(tuple(parts))
    return Arch(
        stem="features.conv0",
        stages=tuple(stages),
        head="classifier",
        cam=("features.norm5",),
        new_prefixes=new_prefixes,
        remap=remap_old_densenet_key,
    )


@register_model(hub=("torchvision", "densenet121"))
def densenet121(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
    kw.pop("image_size", None)
    if kw:
        raise XraylensError(f"densenet121 takes no extra options, got {', '.join(kw)}")
    tv = torchvision.models.densenet121(weights=None)
    features = tv.features
    if in_chans != 3:
        features.conv0 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(features.conv0.weight)
    model = DenseNetClassifier(features, tv.classifier.in_features, num_classes, drop_rate)
    return model, densenet_arch(4)
