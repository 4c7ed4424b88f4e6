"""Model zoo: ``create_model`` is the only door (see ``registry``)."""

from xraylens.models.registry import cam_layers, create_model, list_models, register_model

__all__ = ["cam_layers", "create_model", "list_models", "register_model"]
