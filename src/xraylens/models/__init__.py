"""Model zoo: ``create_model`` is the only door (see ``registry``).

The names below load on first use (PEP 562), so ``import xraylens.models.catalog`` -- listing
model names -- does not import torch through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xraylens.models.registry import cam_layers, create_model, list_models, register_model

__all__ = ["cam_layers", "create_model", "list_models", "register_model"]


def __getattr__(name: str) -> object:
    if name in __all__:
        return getattr(importlib.import_module("xraylens.models.registry"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
