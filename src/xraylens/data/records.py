"""The records every data source yields, and the geometry that maps an original image onto the
model input. Shared by the data layer, the explanation engine and the localisation metrics.

Coordinates: always (x, y) = (column, row), continuous, with pixel (r, c) covering
[c, c+1) x [r, r+1). A box is (x, y, w, h) in the same system (NIH convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Record:
    id: str  # stable id: path relative to the source root (posix), or "<npz name>:<split>:<index>"
    label: int  # index into SourceSet.classes
    split: str  # "train", "val", "test", ...
    path: str | None = None  # absolute file path; None for in-memory sources (npz)
    array_index: int | None = None  # row in the npz array for in-memory sources
    clinical: dict[str, Any] | None = None
    group: str | None = None  # patient (or other) group: never split between train and the carved val


@dataclass
class SourceSet:
    """All records of one dataset, with a stable class order."""

    root: str
    classes: list[str]
    records: list[Record]
    kind: str = "folders"  # "folders" | "manifest" | "npz"
    # how the splits came about, saved in the run, e.g. {"val": {"from": "train", "fraction": .15, "seed": 0}}
    split_info: dict[str, Any] = field(default_factory=dict)
    # npz sources keep their arrays here: {split: uint8 array [N, H, W]}
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records})

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]


@dataclass(frozen=True)
class Geometry:
    """How one original image became the model input: keep `crop` (x0, y0, w, h) of the original,
    then resize that region to (out_h, out_w)."""

    orig_h: int
    orig_w: int
    crop: tuple[float, float, float, float]
    out_h: int
    out_w: int

    @property
    def scale_x(self) -> float:
        return self.out_w / self.crop[2]

    @property
    def scale_y(self) -> float:
        return self.out_h / self.crop[3]

    def to_input(self, xy: np.ndarray) -> np.ndarray:
        """Map (..., 2) original (x, y) coordinates to model-input coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        x0, y0, _, _ = self.crop
        return np.stack([(xy[..., 0] - x0) * self.scale_x, (xy[..., 1] - y0) * self.scale_y], axis=-1)

    def to_original(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        x0, y0, _, _ = self.crop
        return np.stack([xy[..., 0] / self.scale_x + x0, xy[..., 1] / self.scale_y + y0], axis=-1)


def center_crop_box(h: int, w: int, fraction: float) -> tuple[float, float, float, float]:
    """The central `fraction` of each side, in original pixels (fraction 1.0 keeps everything)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"center crop fraction must be in (0, 1], got {fraction}")
    cw, ch = w * fraction, h * fraction
    return ((w - cw) / 2.0, (h - ch) / 2.0, cw, ch)
