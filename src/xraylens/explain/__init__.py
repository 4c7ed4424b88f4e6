"""Explanations: CAM methods (``methods``), the one-pass engine (``engine``) and renders (``render``)."""

from xraylens.explain.engine import CamEngine, CamResult, explain, minmax_normalize
from xraylens.explain.methods import METHODS, available_methods

__all__ = ["METHODS", "CamEngine", "CamResult", "available_methods", "explain", "minmax_normalize"]
