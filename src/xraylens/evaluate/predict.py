"""`xraylens predict`: class and probabilities for single image files, through the run's own
preprocessing (`InputSettings.prepare` is the cache's crop and resize)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xraylens.errors import DecodeError
from xraylens.ops import class_probabilities
from xraylens.runs import RunLike, open_run


@torch.no_grad()
def predict_files(run: RunLike, paths: list[str | Path], device: str = "auto") -> list[dict]:
    """Class and probabilities per file; an unreadable file gives {"path", "error"} and the rest go on."""
    run = open_run(run, device=device)
    inputs = run.inputs
    results = []
    for p in paths:
        try:
            arr, _ = inputs.prepare(p)
        except DecodeError as e:
            results.append({"path": str(p), "error": str(e)})
            continue
        x = inputs.to_model(torch.from_numpy(arr)[None, None], run.device)
        probs = class_probabilities(run.model(x))[0].tolist()
        k = int(np.argmax(probs))
        results.append(
            {
                "path": str(p),
                "class": run.classes[k],
                "probability": probs[k],
                "probabilities": dict(zip(run.classes, probs, strict=True)),
            }
        )
    return results
