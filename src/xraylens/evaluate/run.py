"""`xraylens evaluate`: metrics of a trained run on any split, plus per-image predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xraylens.data.cache import load_split
from xraylens.data.sources import is_plain_image_folder, load_image_folder, load_source
from xraylens.errors import XraylensError
from xraylens.evaluate.predict import ce_loss, predict_logits, softmax_np
from xraylens.io import write_csv, write_json
from xraylens.metrics import compute_metrics
from xraylens.train.checkpoint import LoadedRun, load_run


def load_run_split(run: LoadedRun, data: str | Path | None, split: str, progress: bool = False):
    """A split of `data` (default: the run's training data) through the run's own preprocessing.

    A plain folder of images (no class folders) is one unlabelled split "all" (`source.kind == "images"`),
    whatever `split` says: explain and localize accept it, evaluate does not."""
    cfg = run.config
    data = data or cfg.data.path
    kw = dict(image_size=cfg.data.image_size, center_crop=cfg.data.center_crop, cache_dir=cfg.data.cache_dir,
              workers=cfg.data.workers, progress=progress)
    if is_plain_image_folder(data):
        source = load_image_folder(data)
        return source, load_split(source, "all", **kw)
    source = load_source(data, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
    if split not in source.splits:
        raise XraylensError(f"{data} has no {split!r} split (found: {', '.join(source.splits)}); pick one with --split")
    if list(source.classes) != list(cfg.classes):
        raise XraylensError(f"classes of {data} {source.classes} differ from the run's {cfg.classes}")
    return source, load_split(source, split, **kw)


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, split: str = "test", *,
                 which: str = "best", device: str = "auto", out: str | Path | None = None,
                 positive: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Write `metrics-<split>.json` and `predictions-<split>.csv` into `out` (default: the run dir)."""
    run = load_run(run_dir, which=which, device=device)
    cfg = run.config
    source, cached = load_run_split(run, data, split, progress=progress)
    if source.kind == "images":
        raise XraylensError(f"{data} is a folder of unlabelled images: evaluate needs class folders "
                            "(or a CSV manifest); use predict, explain or localize on it")
    logits = predict_logits(run.model, cached, cfg, run.device)
    probs = softmax_np(logits)
    metrics = compute_metrics(cached.labels, probs, cfg.classes, positive=positive,
                              loss=ce_loss(logits, cached.labels))
    metrics.update({
        "split": split,
        "data": str(data or cfg.data.path),
        "n_images": int(len(cached.labels)),
        "skipped": [{"id": i, "reason": r} for i, r in cached.skipped],
        "checkpoint": run.checkpoint,
        "epoch": run.epoch,
    })
    out = Path(out) if out else run.run_dir
    write_json(out / f"metrics-{split}.json", metrics)
    pred = probs.argmax(1)
    rows = ([i, cfg.classes[t], cfg.classes[p], f"{probs[n, p]:.6f}", *[f"{v:.6f}" for v in probs[n]]]
            for n, (i, t, p) in enumerate(zip(cached.ids, cached.labels, pred, strict=True)))
    write_csv(out / f"predictions-{split}.csv",
              ["id", "true", "pred", "prob", *[f"p_{c}" for c in cfg.classes]], rows)
    return metrics


def confusion_text(metrics: dict[str, Any], classes: list[str]) -> str:
    cm = np.asarray(metrics.get("confusion_matrix", []))
    if cm.size == 0:
        return ""
    w = max(6, *(len(c) for c in classes))
    lines = [" " * w + " " + " ".join(f"{c:>{w}}" for c in classes)]
    for c, row in zip(classes, cm, strict=True):
        lines.append(f"{c:>{w}} " + " ".join(f"{v:>{w}d}" for v in row))
    return "\n".join(lines)
