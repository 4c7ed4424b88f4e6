"""The model zoo's public import path: ``create_model(name, ...)`` is the one door.

Like timm, each family file registers small constructors with ``@register_model``; a constructor
returns the model with an ``Arch`` naming its parts. The pieces live apart so nothing imports in
a circle: ``arch`` (the ``Arch`` record), ``catalog`` (static names, no torch), ``_registry`` (the
live table), ``heads``/``weights`` (generic parts) and ``factory`` (``create_model``). This module
only re-exports them so that ``from xraylens.models.registry import ...`` keeps working.
"""

from __future__ import annotations

from xraylens.models._registry import list_models, model_key, register_model
from xraylens.models.arch import Arch, Constructor
from xraylens.models.factory import cam_layers, create_model

__all__ = ["Arch", "Constructor", "cam_layers", "create_model", "list_models", "model_key", "register_model"]
