"""The model zoo's one door: ``create_model(name, ...)``.

Like timm's registry, each family file registers small constructors with ``@register_model``.
A constructor builds the ImageNet-shaped architecture for ``num_classes`` and returns it together
with an ``Arch`` that names its parts (stem conv, stages, classifier, CAM layers). Everything
generic -- pretrained weights, the extra FC head, partial unfreezing -- is done here from the
``Arch``, so no family re-implements it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from xraylens.errors import XraylensError


@dataclass(frozen=True)
class Arch:
    """Where things are inside one architecture (dotted names for ``get_submodule``).

    stem: the first conv (adapted to ``in_chans`` when loading RGB weights).
    stages: backbone stages from input to output; each is a tuple of module-name prefixes.
        Anything not in a stage or the head (the stem, mostly) is frozen by ``train_last``.
    head: the final ``nn.Linear``; skipped when loading ImageNet weights, replaced by ``head_hidden``.
    cam: default CAM layer(s).
    new_prefixes: modules that ImageNet weights of the base model lack (SE layers): allowed missing.
    remap: optional key rewrite for old-style checkpoints.
    """

    stem: str
    stages: tuple[tuple[str, ...], ...]
    head: str
    cam: tuple[str, ...]
    new_prefixes: tuple[str, ...] = ()
    remap: Callable[[str], str] | None = field(default=None, compare=False)


# constructor(num_classes, in_chans, drop_rate=..., image_size=..., **kw) -> (model, Arch)
Constructor = Callable[..., "tuple[nn.Module, Arch]"]

_REGISTRY: dict[str, Constructor] = {}
# name -> where pretrained=True gets ImageNet weights: ("timm", "resnet50") or ("torchvision", "vgg16").
# Kept beside the constructor so the offline check runs before any (slow) build.
_HUB: dict[str, tuple[str, str] | None] = {}
# Family modules register on import; importing them lazily keeps `import xraylens` light.
_FAMILIES = ("tinyvgg", "vgg", "resnet", "se_resnet", "densenet", "se_densenet", "efficientnet")
_loaded = False


def register_model(
    fn: Constructor | None = None, *, hub: tuple[str, str] | None = None
) -> Constructor | Callable[[Constructor], Constructor]:
    """Register ``fn`` under its function name: ``@register_model`` or ``@register_model(hub=...)``.

    hub: ("timm" | "torchvision", name) of the ImageNet weights ``pretrained=True`` fetches (None: none).
    """

    def add(f: Constructor) -> Constructor:
        if f.__name__ in _REGISTRY:
            raise ValueError(f"model {f.__name__!r} registered twice")
        _REGISTRY[f.__name__] = f
        _HUB[f.__name__] = hub
        return f

    return add(fn) if fn is not None else add


def _load_families() -> None:
    global _loaded
    if not _loaded:
        for fam in _FAMILIES:
            importlib.import_module(f"xraylens.models.{fam}")
        _loaded = True


def list_models() -> list[str]:
    """Names accepted by ``create_model``, sorted."""
    _load_families()
    return sorted(_REGISTRY)


def model_key(name: str) -> str:
    """The registry key for `name` (case and '-'/'_' folded); a one-line error listing names if unknown."""
    _load_families()
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise XraylensError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return key


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
    from xraylens.models import heads, weights  # late: they import this module

    key = model_key(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise XraylensError(f"num_classes must be a positive integer, got {num_classes!r}")
    if in_chans not in (1, 3):
        raise XraylensError(f"in_chans must be 1 (greyscale) or 3 (RGB), got {in_chans!r}")
    if not 0.0 <= drop_rate < 1.0:
        raise XraylensError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    try:
        hidden = tuple(int(h) for h in head_hidden)
    except (TypeError, ValueError):
        hidden = (0,)
    if any(h < 1 for h in hidden):
        raise XraylensError(f"head_hidden sizes must be positive integers, got {tuple(head_hidden)!r}")

    if pretrained is True:  # fail fast offline, before spending seconds on the build
        weights.check_hub(_HUB[key], key)
    try:
        model, arch = _REGISTRY[key](
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
        weights.load_hub_weights(model, arch, key, _HUB[key])
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
