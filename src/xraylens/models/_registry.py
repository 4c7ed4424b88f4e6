"""The live model table: ``register_model`` fills it, ``model_entrypoint`` reads it.

Like timm's ``_registry``: no torch here and no import of heads, weights or the factory, so
family modules import this (and ``arch``) without any cycle. Built-in families are imported on
first use of one of their names, found through the static ``catalog``; so building a TinyVGG
never imports timm, and listing names imports no family at all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from xraylens.errors import XraylensError
from xraylens.models.arch import Constructor
from xraylens.models.catalog import CATALOG

_REGISTRY: dict[str, Constructor] = {}
# name -> where pretrained=True gets ImageNet weights: ("timm", "resnet50") or ("torchvision", "vgg16").
# Kept beside the constructor so the offline check runs before any (slow) build.
_HUB: dict[str, tuple[str, str] | None] = {}


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


def list_models() -> list[str]:
    """Names accepted by ``create_model``, sorted: the built-in catalog plus any registered since."""
    return sorted(CATALOG.keys() | _REGISTRY.keys())


def model_key(name: str) -> str:
    """The registry key for `name` (case and '-'/'_' folded); a one-line error listing names if unknown."""
    key = name.lower().replace("-", "_")
    if key not in CATALOG and key not in _REGISTRY:
        raise XraylensError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return key


def _ensure_registered(key: str) -> None:
    if key not in _REGISTRY:
        family = CATALOG[key].family
        importlib.import_module(f"xraylens.models.{family}")  # registers on import
        if key not in _REGISTRY:  # catalog out of step with the code: our bug, not the user's
            raise LookupError(f"catalog says xraylens.models.{family} registers {key!r}, but it does not")


def model_entrypoint(key: str) -> Constructor:
    """The constructor registered as ``key`` (a ``model_key`` result), importing its family if needed."""
    _ensure_registered(key)
    return _REGISTRY[key]


def model_hub(key: str) -> tuple[str, str] | None:
    """Where ``pretrained=True`` gets ImageNet weights for ``key``; None if it has none."""
    _ensure_registered(key)
    return _HUB[key]
