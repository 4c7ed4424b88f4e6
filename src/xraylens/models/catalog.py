"""The built-in model names as a static table: name -> family module and a one-line description.

Listing or checking a name must not cost the ~4 s and ~800 MB of importing torch, timm and every
family, so this module imports nothing heavy. ``tests/test_model_catalog.py`` checks that the table
equals what the family modules actually register, so it cannot drift from the code.
"""

from __future__ import annotations

from typing import NamedTuple


class ModelInfo(NamedTuple):
    family: str  # module under xraylens.models that registers the name
    description: str


CATALOG: dict[str, ModelInfo] = {
    "tinyvgg": ModelInfo("tinyvgg", "TinyVGG, the CNN-Explainer baseline; fixed input size; no ImageNet weights"),
    "tinyvgg_bn": ModelInfo(
        "tinyvgg", "TinyVGG with BatchNorm; trains in a few epochs (the demo's model); no ImageNet weights"
    ),
    "vgg16": ModelInfo("vgg", "VGG-16 (torchvision); ImageNet weights"),
    "vgg19": ModelInfo("vgg", "VGG-19 (torchvision); ImageNet weights"),
    "resnet18": ModelInfo("resnet", "ResNet-18 (timm); ImageNet weights"),
    "resnet34": ModelInfo("resnet", "ResNet-34 (timm); ImageNet weights"),
    "resnet50": ModelInfo("resnet", "ResNet-50 (timm); ImageNet weights"),
    "resnet101": ModelInfo("resnet", "ResNet-101 (timm); ImageNet weights"),
    "resnet152": ModelInfo("resnet", "ResNet-152 (timm); ImageNet weights"),
    "se_resnet18": ModelInfo("se_resnet", "ResNet-18 with SE (reduction 16) in each block; ImageNet weights, SE fresh"),
    "densenet121": ModelInfo("densenet", "DenseNet-121 (torchvision); ImageNet weights"),
    "se_densenet121": ModelInfo("se_densenet", "DenseNet-121 with 67 SE layers; ImageNet weights, SE fresh"),
    "efficientnet_b0": ModelInfo("efficientnet", "EfficientNet-B0 (timm); ImageNet weights"),
}
