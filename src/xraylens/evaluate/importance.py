"""Permutation importance of the clinical columns of a fused run: what each column adds.

Per column, its features (standardised value or one-hot block, and its missing indicator) are shuffled
together across the images of the split (the image and the other columns stay in place); the drop in
accuracy and in AUC against the unshuffled predictions, over `repeats` seeded shuffles, is reported as
mean and sd. A drop near 0 means the model does not use the column on this split; a negative drop
means shuffling it happened to help. Run it on validation (`evaluate RUN --split val`), the split the
best epoch was chosen on, or on test for the final report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from xraylens.errors import XraylensError
from xraylens.io import write_csv, write_json
from xraylens.metrics import compute_metrics
from xraylens.ops import class_probabilities_np
from xraylens.runs import Run, RunLike, open_run

COLUMNS = (
    "column",
    "features",
    "accuracy",
    "accuracy_drop_mean",
    "accuracy_drop_sd",
    "auc",
    "auc_drop_mean",
    "auc_drop_sd",
    "repeats",
    "n_images",
)


def _scores(run: Run, cached, positive: int | None) -> tuple[float, float]:
    probs = class_probabilities_np(run.predict_logits(cached))
    m = compute_metrics(cached.labels, probs, run.classes, positive=positive)
    auc = m.get("auc")
    return float(m["accuracy"]), float(auc) if auc is not None else float("nan")


def clinical_importance(
    run: RunLike,
    data: str | Path | None = None,
    split: str = "val",
    *,
    repeats: int = 5,
    seed: int = 0,
    out: str | Path | None = None,
    which: str = "best",
    device: str = "auto",
    positive: int | None = None,
    cached: Any = None,
) -> list[dict[str, Any]]:
    """Rows (one per clinical column, `COLUMNS`); writes `clinical_importance-<split>.csv` and `.json`
    into `out` (default: the run dir). `cached`: an already loaded split of this run (evaluate passes
    its own, so nothing is decoded twice)."""
    if repeats < 1:
        raise XraylensError(f"--importance-repeats must be at least 1, got {repeats}")
    run = open_run(run, which=which, device=device)
    if run.clinical is None:
        raise XraylensError(f"{run.run_dir} fuses no clinical data; permutation importance needs --fusion early|late")
    if cached is None:
        _, cached = run.load_split(data, split)
    if cached.clinical is None or len(cached.labels) < 2:
        raise XraylensError(f"split {split!r} has fewer than 2 images with clinical values; nothing to permute")
    base_acc, base_auc = _scores(run, cached, positive)
    rng = np.random.default_rng(seed)
    rows = []
    for name, cols in run.clinical.groups().items():
        acc_d, auc_d = [], []
        for _ in range(repeats):
            z = cached.clinical.copy()
            z[:, cols] = z[rng.permutation(len(z))][:, cols]
            acc, auc = _scores(run, dataclasses.replace(cached, clinical=z), positive)
            acc_d.append(base_acc - acc)
            auc_d.append(base_auc - auc)
        rows.append(
            {
                "column": name,
                "features": len(cols),
                "accuracy": round(base_acc, 6),
                "accuracy_drop_mean": round(float(np.mean(acc_d)), 6),
                "accuracy_drop_sd": round(float(np.std(acc_d, ddof=1)) if repeats > 1 else 0.0, 6),
                "auc": _r(base_auc),
                "auc_drop_mean": _r(float(np.mean(auc_d))),
                "auc_drop_sd": _r(float(np.std(auc_d, ddof=1)) if repeats > 1 else 0.0),
                "repeats": repeats,
                "n_images": int(len(cached.labels)),
            }
        )
    out = Path(out) if out else run.run_dir
    write_csv(out / f"clinical_importance-{split}.csv", COLUMNS, ([r[c] for c in COLUMNS] for r in rows))
    write_json(out / f"clinical_importance-{split}.json", {"split": split, "seed": seed, "columns": rows})
    return rows


def _r(v: float) -> float | None:
    return round(v, 6) if np.isfinite(v) else None  # AUC undefined (one class present): None, not NaN


def importance_text(rows: list[dict[str, Any]]) -> str:
    """The table as the CLI prints it."""
    lines = [f"{'column':<20} {'acc drop':>18} {'AUC drop':>18}"]
    for r in rows:
        auc = (
            f"{r['auc_drop_mean']:+.4f} ± {r['auc_drop_sd']:.4f}" if r["auc_drop_mean"] is not None else "n/a".rjust(18)
        )
        lines.append(f"{r['column']:<20} {r['accuracy_drop_mean']:+.4f} ± {r['accuracy_drop_sd']:.4f} {auc:>18}")
    return "\n".join(lines)
