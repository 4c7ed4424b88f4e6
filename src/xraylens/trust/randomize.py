"""Weight randomisation for the model-randomisation sanity check (Adebayo et al., NeurIPS 2018).

A model is cut into *units* in forward order: each top-level child that holds parameters, or, when
that child is a container of several parametrised parts (ResNet's `layer4` = two blocks, a VGG block
= conv, BN, conv, BN), each of those parts; a lone normalisation layer joins the unit before it
(ResNet's `bn1` goes with `conv1`). Top-down order is the reverse: the head first, as in the paper.

Randomising a unit calls every submodule's own `reset_parameters` (the paper re-initialises with
the layer's initialiser; BatchNorm's resets its affine weights and running statistics) under a
seeded torch generator, so a step is reproducible. The caller's model is never touched: the
functions work on a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from xraylens.errors import XraylensError

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def layer_units(model: nn.Module) -> list[str]:
    """Module names of the randomisable units, in forward (registration) order: input side first."""
    units: list[list[str]] = []
    for name, child in model.named_children():
        if not _has_params(child):
            continue
        parts = [(f"{name}.{n}", c) for n, c in child.named_children() if _has_params(c)]
        for part, mod in parts if len(parts) >= 2 else [(name, child)]:
            # a normalisation layer alone is no layer of its own: it scales what the layer before made
            if isinstance(mod, _NORMS) and units:
                units[-1].append(part)
            else:
                units.append([part])
    if not units:
        raise XraylensError(f"{type(model).__name__} has no parameters to randomise")
    return ["+".join(u) for u in units]


def _modules_of(model: nn.Module, unit: str) -> list[nn.Module]:
    return [model.get_submodule(n) for n in unit.split("+")]


@torch.no_grad()
def reinit_unit(model: nn.Module, unit: str, seed: int) -> int:
    """Re-initialise every submodule of `unit` (a `layer_units` name) with its own `reset_parameters`,
    seeded; returns how many modules were reset. Parameters of a module without `reset_parameters`
    (rare custom layers) are redrawn from a normal with their own mean and standard deviation."""
    devices = {p.device for p in model.parameters()}
    n = 0
    # fork_rng: the global generator (training, dropout) is left as it was
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        torch.manual_seed(seed)
        for top in _modules_of(model, unit):
            for mod in top.modules():
                if hasattr(mod, "reset_parameters") and callable(mod.reset_parameters):
                    mod.reset_parameters()
                    n += 1
                elif isinstance(mod, nn.Module) and any(True for _ in mod.parameters(recurse=False)):
                    for p in mod.parameters(recurse=False):
                        std = float(p.std()) if p.numel() > 1 else 1.0
                        p.copy_(torch.randn_like(p) * std + float(p.mean()))
                    n += 1
    return n


def randomized_copy(model: nn.Module, units: Sequence[str] | None = None, seed: int = 0) -> nn.Module:
    """A deep copy of `model` (same device, eval mode) with `units` (default: all) re-initialised."""
    m = copy.deepcopy(model).eval()
    all_units = layer_units(m)
    bad = [u for u in units or () if u not in all_units]
    if bad:
        raise XraylensError(f"unknown unit(s) {bad}; the model's units are {all_units}")
    for i, u in enumerate(all_units):
        if units is None or u in units:
            reinit_unit(m, u, seed + 1000 * i)  # the seeds of `cascading`: the same weights per unit
    return m


def cascading(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """(unit, model) per step of the cascade: the head first, then each unit below it is randomised
    on top of the previous step's; the last step is the fully randomised model. One copy is reused
    (and changed) between steps: use each model before asking for the next."""
    m = copy.deepcopy(model).eval()
    units = layer_units(m)
    for i in range(len(units) - 1, -1, -1):
        reinit_unit(m, units[i], seed + 1000 * i)
        yield units[i], m


def independent(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """(unit, model) with only that unit randomised, head first; the same seeds as `cascading`, so
    a unit gets the same random weights in both tests. One copy is reused between steps."""
    m = copy.deepcopy(model).eval()
    trained = copy.deepcopy(m.state_dict())
    units = layer_units(m)
    for i in range(len(units) - 1, -1, -1):
        m.load_state_dict(trained)
        reinit_unit(m, units[i], seed + 1000 * i)
        yield units[i], m
