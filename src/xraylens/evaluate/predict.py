"""Batched inference over a cached split or single files: the one prediction path that training
validation, `evaluate` and `predict` share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraylens.config import RunConfig
from xraylens.data.loader import iterate_batches, to_model_input


def input_kwargs(config: RunConfig) -> dict:
    """Normalisation settings of a run: identical at train, evaluate, explain and serve time."""
    return {"in_chans": config.model.in_chans, "mean": tuple(config.data.mean), "std": tuple(config.data.std)}


@torch.no_grad()
def predict_logits(model: nn.Module, cached, config: RunConfig, device: torch.device,
                   batch_size: int | None = None) -> np.ndarray:
    """Logits [N, K] (float32, numpy) for every image of a cached split, in cache order."""
    was_training = model.training
    model.eval()
    out = []
    bs = batch_size or config.train.eval_batch_size
    for x, _, _ in iterate_batches(cached, bs, shuffle=False):
        xin = to_model_input(x, device=device, **input_kwargs(config))
        out.append(model(xin).float().cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, len(config.classes)), dtype=np.float32)
    return torch.cat(out).numpy()


def softmax_np(logits: np.ndarray) -> np.ndarray:
    return F.softmax(torch.from_numpy(logits), dim=1).numpy()


def ce_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Plain cross-entropy, reported as `loss` whatever the training loss was (comparable across runs)."""
    if len(labels) == 0:
        return float("nan")
    return float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels).long()).item())


def predict_files(run, paths: list[str | Path]) -> list[dict]:
    """Class and probabilities for single image files, through the same preprocessing as the cache."""
    from xraylens.data.cache import prepare_image
    from xraylens.data.decode import decode_image
    from xraylens.errors import DecodeError

    cfg = run.config
    results = []
    for p in paths:
        try:
            arr, _ = prepare_image(decode_image(p), cfg.data.image_size, cfg.data.center_crop)
        except DecodeError as e:
            results.append({"path": str(p), "error": str(e)})
            continue
        x = torch.from_numpy(arr)[None, None]
        with torch.no_grad():
            logits = run.model(to_model_input(x, device=run.device, **input_kwargs(cfg))).float().cpu()
        probs = F.softmax(logits, dim=1)[0].tolist()
        k = int(np.argmax(probs))
        results.append({"path": str(p), "class": cfg.classes[k], "probability": probs[k],
                        "probabilities": dict(zip(cfg.classes, probs, strict=True))})
    return results
