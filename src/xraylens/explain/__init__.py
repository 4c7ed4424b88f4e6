"""Explanations: CAM methods (``methods``), targets (``targets``), the one-pass engine (``engine``) and renders
(``render``)."""

from xraylens.explain.engine import CamEngine, CamResult, explain, minmax_normalize
from xraylens.explain.methods import METHODS, CamMethod, available_methods, methods_help, resolve_methods
from xraylens.explain.targets import ClassTarget, SegmentationTarget

__all__ = [
    "METHODS",
    "CamEngine",
    "CamMethod",
    "CamResult",
    "ClassTarget",
    "SegmentationTarget",
    "available_methods",
    "explain",
    "methods_help",
    "minmax_normalize",
    "resolve_methods",
]
