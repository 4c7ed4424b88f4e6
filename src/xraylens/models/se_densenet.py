"""SE-DenseNet-121 of the knee KL seed (000).

SE placement follows the seed's upstream ``custom_densenets.py``: one SE layer after the stem
(after pool0), one before and one after each dense block, and one at the start of every dense
layer (on its concatenated input, before norm1). For DenseNet-121 (6, 12, 24, 16 layers) that is
1 + 4 + 4 + 58 = 67 SE layers. Convs, norms and transitions keep torchvision's names, so ImageNet
densenet121 weights load and only the SE layers start fresh.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from xraylens.errors import XraylensError
from xraylens.models._registry import register_model
from xraylens.models.arch import Arch
from xraylens.models.densenet import DenseNetClassifier, densenet_arch


class SELayer(nn.Module):
    """Squeeze-and-excitation: global mean -> FC(c/r) -> ReLU -> FC(c) -> sigmoid -> rescale."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * w[:, :, None, None]


class SEDenseLayer(nn.Module):
    """SE -> BN-ReLU-conv1x1 -> BN-ReLU-conv3x3, producing ``growth_rate`` new channels."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int, reduction: int) -> None:
        super().__init__()
        self.se = SELayer(in_ch, reduction)
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(self.se(x))))
        return self.conv2(self.relu2(self.norm2(x)))


class SEDenseBlock(nn.ModuleDict):
    """Each layer sees the concatenation of the block input and all earlier layers' outputs."""

    def __init__(self, num_layers: int, in_ch: int, growth_rate: int, bn_size: int, reduction: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = SEDenseLayer(in_ch + i * growth_rate, growth_rate, bn_size, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.values():
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


def _transition(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            norm=nn.BatchNorm2d(in_ch),
            relu=nn.ReLU(),
            conv=nn.Conv2d(in_ch, out_ch, 1, bias=False),
            pool=nn.AvgPool2d(2, 2),
        )
    )


def se_densenet_features(
    in_chans: int,
    growth_rate: int = 32,
    block_config: tuple[int, ...] = (6, 12, 24, 16),
    num_init_features: int = 64,
    bn_size: int = 4,
    reduction: int = 16,
) -> tuple[nn.Sequential, int]:
    """The SE-DenseNet feature extractor and its output width."""
    f = nn.Sequential(
        OrderedDict(
            conv0=nn.Conv2d(in_chans, num_init_features, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(num_init_features),
            relu0=nn.ReLU(),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
            se0=SELayer(num_init_features, reduction),
        )
    )
    ch = num_init_features
    for k, n in enumerate(block_config, start=1):
        f.add_module(f"se{k}a", SELayer(ch, reduction))
        f.add_module(f"denseblock{k}", SEDenseBlock(n, ch, growth_rate, bn_size, reduction))
        ch += n * growth_rate
        f.add_module(f"se{k}b", SELayer(ch, reduction))
        if k < len(block_config):
            f.add_module(f"transition{k}", _transition(ch, ch // 2))
            ch //= 2
    f.add_module("norm5", nn.BatchNorm2d(ch))
    # torchvision's init: kaiming convs, unit BN
    for m in f.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return f, ch


@register_model(hub=("torchvision", "densenet121"))
def se_densenet121(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
    """DenseNet-121 with 67 SE layers (reduction 16); see the module docstring for where."""
    kw.pop("image_size", None)
    if kw:
        raise XraylensError(f"se_densenet121 takes no extra options, got {', '.join(kw)}")
    features, width = se_densenet_features(in_chans)
    model = DenseNetClassifier(features, width, num_classes, drop_rate)
    se_names = tuple(n for n, m in model.named_modules() if isinstance(m, SELayer))
    extra = {k: (f"features.se{k}a", f"features.se{k}b") for k in range(1, 5)}
    return model, densenet_arch(4, new_prefixes=se_names, extra=extra)
