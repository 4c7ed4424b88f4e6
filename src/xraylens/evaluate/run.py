"""`xraylens evaluate`: metrics of a trained run on any split, plus per-image predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xraylens.errors import XraylensError
from xraylens.io import write_csv, write_json
from xraylens.metrics import BOOTSTRAP_REPS, CI_METRICS, bootstrap_classification, compute_metrics
from xraylens.ops import class_probabilities_np
from xraylens.runs import RunLike, ce_loss, open_run


def evaluate_run(
    run: RunLike,
    data: str | Path | None = None,
    split: str = "test",
    *,
    which: str = "best",
    device: str = "auto",
    out: str | Path | None = None,
    positive: int | None = None,
    progress: bool = False,
    bootstrap: int = BOOTSTRAP_REPS,
    seed: int = 0,
    importance_repeats: int = 5,
    clinical: str | Path | None = None,
) -> dict[str, Any]:
    """Write `metrics-<split>.json`, `metrics-<split>.csv` and `predictions-<split>.csv` into `out`
    (default: the run dir). With `bootstrap` > 0 replicates, accuracy, sensitivity, specificity, F1, QWK
    and AUC get 95 % percentile bootstrap intervals over images (`<metric>_ci` = [low, high], seeded)."""
    if importance_repeats < 0:
        raise XraylensError(f"--importance-repeats must be 0 (off) or more, got {importance_repeats}")
    if bootstrap < 0:
        raise XraylensError(f"--bootstrap must be 0 (no intervals) or more replicates, got {bootstrap}")
    run = open_run(run, which=which, device=device)
    if clinical is not None:  # other data's clinical values: a CSV with the run's key and columns
        if run.clinical is None:
            raise XraylensError(f"--clinical {clinical}: {run.run_dir} fuses no clinical data; drop --clinical")
        run.clinical_file = clinical
    classes = run.classes
    source, cached = run.load_split(data, split, progress=progress)
    if source.kind == "images":
        raise XraylensError(
            f"{data} is a folder of unlabelled images: evaluate needs class folders "
            "(or a CSV manifest); use predict, explain or localize on it"
        )
    logits = run.predict_logits(cached)
    probs = class_probabilities_np(logits)
    metrics = compute_metrics(cached.labels, probs, classes, positive=positive, loss=ce_loss(logits, cached.labels))
    if bootstrap:
        metrics.update(bootstrap_classification(cached.labels, probs, positive=positive, reps=bootstrap, seed=seed))
    metrics.update(
        {
            "split": split,
            "data": str(data if data is not None else run.data_path),
            "n_images": int(len(cached.labels)),
            "skipped": [{"id": i, "reason": r} for i, r in cached.skipped],
            "checkpoint": str(run.checkpoint),
            "epoch": run.epoch,
        }
    )
    out = Path(out) if out else run.run_dir
    if run.clinical is not None and importance_repeats:  # a fused run: what each clinical column adds
        from xraylens.evaluate.importance import clinical_importance

        metrics["clinical_importance"] = clinical_importance(
            run, split=split, repeats=importance_repeats, seed=seed, out=out, positive=positive, cached=cached
        )
    write_json(out / f"metrics-{split}.json", metrics)
    write_csv(out / f"metrics-{split}.csv", ["metric", "value", "ci_low", "ci_high"], _metric_rows(metrics))
    pred = probs.argmax(1)
    rows = (
        [i, classes[t], classes[p], f"{probs[n, p]:.6f}", *[f"{v:.6f}" for v in probs[n]]]
        for n, (i, t, p) in enumerate(zip(cached.ids, cached.labels, pred, strict=True))
    )
    write_csv(out / f"predictions-{split}.csv", ["id", "true", "pred", "prob", *[f"p_{c}" for c in classes]], rows)
    return metrics


# the scalar figures of metrics-<split>.csv, in the order the CLI prints them
TABLE_KEYS = (
    "accuracy",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "f1_macro",
    "f05",
    "f2",
    "qwk",
    "auc",
    "sensitivity",
    "specificity",
    "loss",
)


def _metric_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for k in TABLE_KEYS:
        v = metrics.get(k)
        ci = metrics.get(f"{k}_ci") if k in CI_METRICS else None
        rows.append([k, "" if v is None else f"{v:.6f}", *(["", ""] if not ci else [f"{c:.6f}" for c in ci])])
    return rows


def confusion_text(metrics: dict[str, Any], classes: list[str]) -> str:
    cm = np.asarray(metrics.get("confusion_matrix", []))
    if cm.size == 0:
        return ""
    w = max(6, *(len(c) for c in classes))
    lines = [" " * w + " " + " ".join(f"{c:>{w}}" for c in classes)]
    for c, row in zip(classes, cm, strict=True):
        lines.append(f"{c:>{w}} " + " ".join(f"{v:>{w}d}" for v in row))
    return "\n".join(lines)
