"""``Arch``: where things are inside one architecture, so generic code needs no per-family cases.

Its own module (no torch) so that family files, heads, weights and the factory can all import it
without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


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
