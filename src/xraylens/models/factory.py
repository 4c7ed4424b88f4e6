"""``create_model``: build a registered architecture, then apply everything generic from its ``Arch``.

A family constructor only builds the ImageNet-shaped network for ``num_classes`` and names its
parts; pretrained weights, the extra FC head, partial unfreezing and the CAM-layer attributes are
done here once, so no family re-implements them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import nn

from xraylens.errors import XraylensError
from xraylens.models import heads, weights
from xraylens.models._registry import model_entrypoint, model_hub, model_key


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    pretrained: bool | str | os.PathLike[str] = False,
    head_hidden: Sequence[int] = (),
    train_last: int | None = None,
    drop_rate: float = 0.0,
    image_size: int | tuple[int, int] = 224,
    **kw: object,
) -> nn.Module:
    """Build a registered model.

    pretrained: False (random init, never downloads), True (ImageNet weights from the hub; fails
        fast offline) or a path to a local ImageNet state dict (``.pt``/``.pth``/``.safetensors``).
    head_hidden: hidden sizes of an extra FC head Linear-ReLU-Dropout-...-Linear(num_classes).
    train_last: freeze the backbone except its last N stages (0 = head only); None trains all.
    image_size: only TinyVGG needs it (its flatten size); int or (height, width).
    """
    key = model_key(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise XraylensError(f"num_classes must be a positive integer, got {num_classes!r}")
    if in_chans not in (1, 2, 3):
        raise XraylensError(
            f"in_chans must be 1 (greyscale), 2 ([original, enhanced], data.enhance) or 3 (RGB), got {in_chans!r}"
        )
    if not 0.0 <= drop_rate < 1.0:
        raise XraylensError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    try:
        hidden = tuple(int(h) for h in head_hidden)
    except (TypeError, ValueError):
        hidden = (0,)
    if any(h < 1 for h in hidden):
        raise XraylensError(f"head_hidden sizes must be positive integers, got {tuple(head_hidden)!r}")

    if pretrained is True:  # fail fast offline, before spending seconds on the build
        hub = weights.check_hub(model_hub(key), key)
    try:
        model, arch = model_entrypoint(key)(
            num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, image_size=image_size, **kw
        )
    except TypeError as e:
        if not kw:  # not an option the user passed: a real bug, keep the traceback
            raise
        raise XraylensError(
            f"{key} does not accept option(s) {', '.join(kw)} ({str(e).splitlines()[0][:120]}); remove them"
        ) from None
    # Weights first, head second: the file holds the ImageNet classifier, never our head.
    if pretrained is True:
        weights.load_hub_weights(model, arch, key, hub)
    elif pretrained not in (False, None, ""):
        weights.load_weights_file(model, arch, pretrained, key)
    if hidden:
        heads.replace_head(model, arch.head, hidden, num_classes, drop_rate)
    if train_last is not None:
        heads.freeze_except_last(model, arch, train_last, key)

    model.default_cam_layers = list(arch.cam)
    model.num_classes = num_classes
    model.in_chans = in_chans
    model.xraylens_name = key
    model.xraylens_arch = arch
    return model


def cam_layers(model: nn.Module) -> list[str]:
    """Default CAM layer names of a registry model (valid for ``model.get_submodule``)."""
    layers = getattr(model, "default_cam_layers", None)
    if not layers:
        raise XraylensError("model has no default CAM layers; build it with create_model or name the layers explicitly")
    return list(layers)
