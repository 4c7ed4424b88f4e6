"""The segmentation network: a segmentation-models-pytorch U-Net, randomly initialised."""

from __future__ import annotations

from torch import nn

from xraylens.errors import XraylensError

ENCODERS = ("resnet18", "resnet34", "resnet50", "efficientnet-b0", "mobilenet_v2")


def check_encoder(name: str) -> None:
    if name not in ENCODERS:
        raise XraylensError(f"--encoder {name!r}: use one of {', '.join(ENCODERS)}")


def build_unet(encoder: str) -> nn.Module:
    """U-Net, one grey input channel, one lung logit per pixel; `encoder_weights=None` so nothing downloads."""
    import segmentation_models_pytorch as smp

    check_encoder(encoder)
    return smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=1, classes=1)
