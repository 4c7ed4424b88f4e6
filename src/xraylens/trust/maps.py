"""CAMs of a fixed set of images under any model (trained, randomised, retrained), through CamEngine.

The same images, inputs and explained classes go to every model, so maps differ only by weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from xraylens.explain.engine import CamEngine
from xraylens.models.fusion import bind_clinical, clinical_batch
from xraylens.runs import Run


@dataclass
class MapSet:
    """method -> maps [N, H, W] float32 (numpy) and constant flags [N] bool; predictions [N]."""

    maps: dict[str, np.ndarray]
    constant: dict[str, np.ndarray]
    preds: np.ndarray
    targets: np.ndarray


def model_inputs(run: Run, images: np.ndarray, lo: int, hi: int) -> torch.Tensor:
    """Cached uint8 images [N, H, W] -> the run's normalised model input [hi-lo, C, H, W] on its device."""
    # a copy: `images` may be the read-only memory-mapped cache
    return run.inputs.to_model(torch.from_numpy(np.array(images[lo:hi]))[:, None], run.device)


def cam_maps(
    run: Run,
    model: nn.Module,
    images: np.ndarray,
    methods: Sequence[str],
    targets: str | np.ndarray = "pred",
    *,
    layers: Sequence[str] | None = None,
    combine: str | None = None,
    batch_size: int = 16,
    clinical: np.ndarray | None = None,
) -> MapSet:
    """Maps of `model` for `images` (uint8 [N, H, W] from the run's cache), batched on the run's device.

    `targets`: "pred" (this model's own arg-max) or a class per image [N] (e.g. the trained model's
    predictions, so a randomised model explains the same class). `clinical`: a fused run's feature
    rows [N, F] for `images`, bound per batch so the maps are the image branch's."""
    maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    const: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    preds, tgts = [], []
    model.eval()
    with CamEngine(model, list(layers) if layers else None) as engine:
        for lo in range(0, len(images), batch_size):
            hi = min(len(images), lo + batch_size)
            x = model_inputs(run, images, lo, hi)
            t = targets if isinstance(targets, str) else torch.as_tensor(targets[lo:hi], device=x.device)
            z = clinical_batch(clinical, slice(lo, hi), x.device)
            with bind_clinical(model, z):
                res = engine(x, list(methods), targets=t, combine=combine)
            for m in methods:
                maps[m].append(res.numpy(m))
                const[m].append(res.constant[m].cpu().numpy())
            preds.append(res.preds.cpu().numpy())
            tgts.append(res.targets.cpu().numpy())
    return MapSet(
        maps={m: np.concatenate(v) for m, v in maps.items()},
        constant={m: np.concatenate(v) for m, v in const.items()},
        preds=np.concatenate(preds),
        targets=np.concatenate(tgts),
    )
