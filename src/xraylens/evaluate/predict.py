"""`xraylens predict`: class and probabilities for single image files, through the run's own
preprocessing (`InputSettings.prepare` is the cache's crop and resize)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xraylens.errors import DecodeError, XraylensError
from xraylens.models.fusion import forward_with
from xraylens.ops import class_probabilities
from xraylens.runs import RunLike, open_run


@torch.no_grad()
def predict_files(
    run: RunLike, paths: list[str | Path], device: str = "auto", clinical: str | Path | None = None
) -> list[dict]:
    """Class and probabilities per file; an unreadable file gives {"path", "error"} and the rest go on.

    A clinically fused run reads each file's values from `clinical` (a CSV with the run's key and
    columns; default: the run's own table, or its file-name pattern) through the run's fitted
    preprocessing; a file without a row gives {"path", "error"}, a column the table lacks is an error."""
    run = open_run(run, device=device)
    if clinical is not None and run.clinical is None:
        raise XraylensError(f"--clinical {clinical}: {run.run_dir} fuses no clinical data; drop --clinical")
    inputs = run.inputs
    results = []
    z_all = _clinical_rows(run, paths, clinical) if run.clinical is not None else None
    for n, p in enumerate(paths):
        z = None
        if z_all is not None:
            if z_all[n] is None:
                results.append({"path": str(p), "error": "no row in the clinical table for this file"})
                continue
            z = torch.from_numpy(z_all[n])[None].to(run.device)
        try:
            arr, _ = inputs.prepare(p)
        except DecodeError as e:
            results.append({"path": str(p), "error": str(e)})
            continue
        x = inputs.to_model(torch.from_numpy(arr)[None, None], run.device)
        probs = class_probabilities(forward_with(run.model, x, z))[0].tolist()
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


def _clinical_rows(run, paths: list[str | Path], file: str | Path | None) -> list[np.ndarray | None]:
    from xraylens.data.clinical import rows_for, table_for_run

    items = [(Path(p).name, str(Path(p).expanduser().resolve())) for p in paths]
    table = table_for_run(run.config.clinical, ".", [], file) if file or run.config.clinical.file else None
    if table is None:  # file-name pattern
        from xraylens.data.clinical import table_from_names

        table = table_from_names(items, run.config.clinical.from_name)
    rows = rows_for(table, items, strict=False)
    present = [r for r in rows if r is not None]
    z = iter(run.clinical.transform(present, what="predict") if present else [])
    return [next(z) if r is not None else None for r in rows]
