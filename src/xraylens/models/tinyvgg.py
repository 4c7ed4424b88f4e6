"""TinyVGG, the CNN-Explainer baseline of the pneumonia seed (001)."""

from __future__ import annotations

import torch
from torch import nn

from xraylens.errors import XraylensError
from xraylens.models._registry import register_model
from xraylens.models.arch import Arch


def _size2(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _block(in_ch: int, out_ch: int, batch_norm: bool = False) -> nn.Sequential:
    # Unpadded 3x3 convs as in CNN Explainer; ReLU not in-place so CAM hooks see clean tensors.
    def conv(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, bias=not batch_norm), *([nn.BatchNorm2d(o)] if batch_norm else []), nn.ReLU()]

    return nn.Sequential(*conv(in_ch, out_ch), *conv(out_ch, out_ch), nn.MaxPool2d(2))


class TinyVGG(nn.Module):
    """Two conv blocks (conv3x3-ReLU-conv3x3-ReLU-maxpool), flatten, linear.

    The flatten size follows from ``image_size`` at build time (no lazy modules), so the model
    takes exactly that input size, square or not.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        hidden_units: int = 10,
        image_size: int | tuple[int, int] = 64,
        drop_rate: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = _size2(image_size)
        h, w = self.image_size
        for _ in range(2):  # each block: two unpadded convs (-4) then pool (//2)
            h, w = (h - 4) // 2, (w - 4) // 2
        if h < 1 or w < 1:
            raise XraylensError(f"image_size {image_size} is too small for tinyvgg; use at least 16 px")
        self.block1 = _block(in_chans, hidden_units, batch_norm)
        self.block2 = _block(hidden_units, hidden_units, batch_norm)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(hidden_units * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            raise XraylensError(
                f"tinyvgg was built for {self.image_size[0]}x{self.image_size[1]} input, got "
                f"{x.shape[-2]}x{x.shape[-1]}; build it with image_size=(height, width) of your data"
            )
        x = self.block2(self.block1(x))
        return self.classifier(self.dropout(self.flatten(x)))


def _build(
    name: str,
    num_classes: int,
    in_chans: int,
    drop_rate: float,
    image_size: int | tuple[int, int],
    hidden_units: int,
    batch_norm: bool,
    kw: dict,
) -> tuple[nn.Module, Arch]:
    if kw:
        raise XraylensError(f"{name} does not take {', '.join(kw)}; it takes hidden_units")
    model = TinyVGG(num_classes, in_chans, hidden_units, image_size, drop_rate, batch_norm=batch_norm)
    arch = Arch(stem="block1.0", stages=(("block1",), ("block2",)), head="classifier", cam=("block2",))
    return model, arch


@register_model
def tinyvgg(
    num_classes: int,
    in_chans: int = 1,
    drop_rate: float = 0.0,
    image_size: int | tuple[int, int] = 224,
    hidden_units: int = 10,
    **kw: object,
) -> tuple[nn.Module, Arch]:
    return _build("tinyvgg", num_classes, in_chans, drop_rate, image_size, hidden_units, False, kw)


@register_model
def tinyvgg_bn(
    num_classes: int,
    in_chans: int = 1,
    drop_rate: float = 0.0,
    image_size: int | tuple[int, int] = 224,
    hidden_units: int = 16,
    **kw: object,
) -> tuple[nn.Module, Arch]:
    """TinyVGG with BatchNorm after each conv: the same layout and CAM layer, but it trains in a few
    epochs where plain TinyVGG stalls at chance for ~20 (measured on the phantom); the demo's model."""
    return _build("tinyvgg_bn", num_classes, in_chans, drop_rate, image_size, hidden_units, True, kw)
