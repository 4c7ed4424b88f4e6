"""The CAM-guided enhancement cycle: explain, enhance, fine-tune, evaluate; repeat.

Layout of OUT:
  original/{split}/{class}/<file>   links to the data's images, one folder per split of the STARTING run
                                   (its own val split, patient groups included), so every model is
                                   evaluated on the same unmodified images
  cycle.json                       the settings (a rerun must match them; only --cycles may grow)
  masks/<stem>.png                 lung masks of every image under --data (`segment predict`, resumable)
  cycle-0/metrics.json             the starting model's rows
  cycle-k/enhanced/train/{class}/<stem>.png, cycle-k/enhanced/{val,test} -> original/{val,test}
  cycle-k/run                      the fine-tuned run; cycle-k/metrics.json its rows
  cycles.csv                       one row per cycle and evaluated split

Recipe of cycle k (k >= 1), with the model M of cycle k-1:
  1. CAM c of every TRAINING image with M (one method, default gradcam, target = the true label), on the
     model-input grid, scaled to [0, 1] by its own maximum (negative values clipped).
  2. weight w: `cam` -> w = c; `cam` with restrict_to_lungs -> w = c * L; `mask` -> w = L, where L is the
     0/1 lung mask rasterised on the same grid.
  3. enhanced image = x * ((1 - s) + s * w) with s = strength in [0, 1], rounded to uint8, where x is the
     ORIGINAL image at its original size and w is mapped back onto it bilinearly (0 outside the crop the
     model sees). s = 0 leaves the image unchanged; s = 1 keeps only the emphasised region. Original
     size keeps the run's crop/resize settings valid for the enhanced set.
  4. fine-tune: a new run initialised from M's full weights (`model.init_from`), training only the last
     `train_last` stages (+ head) for `epochs` epochs on the enhanced train split and the ORIGINAL val.
  5. evaluate on val (and test when the data has one), original images: accuracy, sensitivity,
     specificity (binary: of the positive class; more classes: macro recall and macro specificity), and
     with the lung masks: CAM energy inside the lungs, pointing game vs the lungs, border and corner energy.

Enhanced images are cached (kept when newer than M's checkpoint); a cycle whose metrics.json exists is
skipped on a rerun, and a killed fine-tune resumes from its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xraylens.data import annotations as ann
from xraylens.data.decode import decode_image
from xraylens.data.records import Geometry
from xraylens.errors import XraylensError
from xraylens.evaluate.run import evaluate_run
from xraylens.explain.methods import resolve_methods
from xraylens.explain.run import iter_cams
from xraylens.io import atomic_path, lock_dir, write_csv, write_json
from xraylens.localize.run import localize_run
from xraylens.runs import cached_split, config_source, find_checkpoint, open_run, read_checkpoint
from xraylens.segment.predict import predict_masks
from xraylens.segment.train import read_config
from xraylens.train.loop import train

log = logging.getLogger("xraylens.cycle")

EMPHASES = ("cam", "mask")
CYCLE_COLUMNS = [
    "cycle", "split", "n", "accuracy", "sensitivity", "specificity",
    "lung_energy", "lung_pointing", "border_energy", "corner_energy",
]  # fmt: skip


def enhance(image: np.ndarray, weight: np.ndarray, strength: float) -> np.ndarray:
    """uint8 image [H, W] -> round(x * ((1 - s) + s * w)) as uint8; w in [0, 1], same shape."""
    x = image.astype(np.float32)
    w = np.clip(weight.astype(np.float32), 0.0, 1.0)
    return np.clip(np.rint(x * ((1.0 - strength) + strength * w)), 0, 255).astype(np.uint8)


def emphasis_weights(cam: torch.Tensor, lungs: torch.Tensor | None, emphasis: str, restrict: bool) -> torch.Tensor:
    """[B, 1, H, W] weights in [0, 1] from CAMs (each scaled by its own maximum) and 0/1 lung masks."""
    if emphasis == "mask":
        return lungs.float()
    c = cam.float().clamp_min(0)
    peak = c.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
    c = c / peak
    return c * lungs.float() if restrict else c


def to_original(weight: torch.Tensor, g: Geometry) -> np.ndarray:
    """A map [H, W] on the model-input grid -> [orig_h, orig_w], bilinear; 0 outside the crop."""
    xi = (np.arange(g.orig_w) + 0.5 - g.crop[0]) * g.scale_x
    yi = (np.arange(g.orig_h) + 0.5 - g.crop[1]) * g.scale_y
    gx = torch.from_numpy(2 * xi / g.out_w - 1).float()
    gy = torch.from_numpy(2 * yi / g.out_h - 1).float()
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), -1)[None]
    p = weight.detach().float().cpu()[None, None]
    v = F.grid_sample(p, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()
    inside = ((yi >= 0) & (yi < g.out_h))[:, None] & ((xi >= 0) & (xi < g.out_w))[None]
    return np.where(inside, v, 0.0)


def check_cycle_args(
    *,
    cycles: int,
    strength: float,
    emphasis: str,
    epochs: int,
    train_last: int | None,
    batch_size: int = 16,
    lr: float | None = None,
) -> None:
    """Settings, checked before any model or image is read."""
    if cycles < 1:
        raise XraylensError(f"--cycles must be 1 or more, got {cycles}")
    if not 0.0 <= strength <= 1.0:
        raise XraylensError(f"--strength must be in [0, 1], got {strength}")
    if emphasis not in EMPHASES:
        raise XraylensError(f"--emphasis {emphasis!r}: use {' or '.join(EMPHASES)}")
    if epochs < 1:
        raise XraylensError(f"--epochs must be 1 or more, got {epochs}")
    if batch_size < 1:
        raise XraylensError(f"--batch-size must be 1 or more, got {batch_size}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise XraylensError(f"--lr must be a positive number, got {lr}")
    if train_last is not None and train_last < 0:
        raise XraylensError(f"--train-last must be 0 or more, got {train_last}")


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def _original_view(run, data: Path, out: Path) -> list[str]:
    """Link the data's images into out/{split}/{class}/ by the STARTING run's splits; returns the splits."""
    source = config_source(run.config, data, grouped=True)
    splits = [s for s in (run.config.data.train_split, run.config.data.val_split, "test") if s in source.splits]
    names = {"train": run.config.data.train_split, "val": run.config.data.val_split}
    for split in splits:
        tag = next((k for k, v in names.items() if v == split), split)
        for r in source.split(split):
            if r.path is None:
                raise XraylensError(f"{data} is not a folder of image files; cycle needs class folders of images")
            _link(Path(r.path), out / tag / source.classes[r.label] / Path(r.path).name)
    return [next((k for k, v in names.items() if v == s), s) for s in splits]


def _fmt(v: Any) -> Any:
    return "" if v is None else round(float(v), 6)


def _evaluate(run, view: Path, masks: Path, split: str, out: Path, method: str, cycle: int) -> dict[str, Any]:
    """One table row: classification metrics and lung measures of the CAMs, on the original images."""
    m = evaluate_run(run, view, split, out=out)  # binary: of the positive class; more classes: macro
    loc = localize_run(run, annotations=masks, fmt="masks", data=view, split=split, methods=method, out=out / split)
    means = json.loads(loc.summary_path.read_text())["means"][method]
    return {
        "cycle": cycle,
        "split": split,
        "n": m["n_images"],
        "accuracy": _fmt(m.get("accuracy")),
        "sensitivity": _fmt(m.get("sensitivity")),
        "specificity": _fmt(m.get("specificity")),
        "lung_energy": _fmt(means.get("energy")),
        "lung_pointing": _fmt(means.get("hit")),
        "border_energy": _fmt(means.get("border_energy")),
        "corner_energy": _fmt(means.get("corner_energy")),
    }


def _enhance_train(run, view: Path, masks: Path, dest: Path, *, method: str, emphasis: str, restrict: bool,
                   strength: float, batch_size: int) -> int:  # fmt: skip
    """Write the enhanced training images under dest/{class}/<stem>.png; returns how many were (re)written."""
    newer_than = run.checkpoint.stat().st_mtime_ns
    source = config_source(run.config, view, grouped=False)
    by_id = {r.id: r for r in source.split("train")}
    cached = cached_split(run.config, source, "train")
    targets = [
        dest / source.classes[int(cached.labels[i])] / (Path(cached.ids[i]).stem + ".png") for i in range(len(cached))
    ]
    todo = np.array(
        [i for i, t in enumerate(targets) if not (t.is_file() and t.stat().st_mtime_ns > newer_than)], dtype=np.int64
    )
    if len(todo) == 0:
        return 0
    annots = ann.read_annotations(masks, "masks")
    keys = ann.match_keys(cached.ids, annots)
    missing = [cached.ids[i] for i in todo if keys[i] is None]
    if missing:
        raise XraylensError(f"no lung mask for {missing[0]} in {masks} ({len(missing)} image(s) without one)")
    for idx, _x, res in iter_cams(run, cached, todo, [method], target="true", batch_size=batch_size):
        geoms = [cached.geometry[i] for i in idx]
        shapes = ann.shapes_on_images([keys[i] for i in idx], annots, geoms)
        lungs = torch.from_numpy(ann.rasterize_batch(shapes, geoms)).to(res.maps[method].device)
        w = emphasis_weights(res.maps[method], lungs, emphasis, restrict)
        for j, i in enumerate(idx):
            original = decode_image(by_id[cached.ids[i]].path)
            out = enhance(original, to_original(w[j, 0], geoms[j]), strength)
            targets[i].parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(targets[i], ".png") as tmp:
                Image.fromarray(out).save(tmp, format="PNG")
    return len(todo)


def _same_settings(path: Path, settings: dict[str, Any]) -> None:
    """Finished cycles are reused on a rerun, so a rerun must use the settings that made them (only
    --cycles may grow); a new OUT starts the record."""
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            k = changed[0]
            raise XraylensError(
                f"{path.parent} was made with {k}={old.get(k)!r}, not {settings[k]!r}; use another --out to change it"
            )
        return
    write_json(path, settings)


def _finished(run_dir: Path) -> bool:
    """A fine-tune that ran all its epochs (metrics.json is written every epoch, so it does not tell)."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return False
    ckpt = read_checkpoint(last)
    return int(ckpt["epoch"]) >= int(ckpt["config"]["train"]["epochs"])


def cycle_run(
    run: str | Path,
    data: str | Path,
    lung_model: str | Path,
    out: str | Path,
    *,
    cycles: int = 1,
    method: str = "gradcam",
    emphasis: str = "cam",
    restrict_to_lungs: bool = False,
    strength: float = 0.5,
    epochs: int = 1,
    train_last: int | None = 1,
    lr: float | None = None,
    device: str = "auto",
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run `cycles` enhancement cycles from `run`; writes OUT/cycles.csv and returns its rows."""
    check_cycle_args(
        cycles=cycles,
        strength=strength,
        emphasis=emphasis,
        epochs=epochs,
        train_last=train_last,
        batch_size=batch_size,
        lr=lr,
    )
    method = resolve_methods(method)[0]
    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise XraylensError(f"--data {data} is not a folder; pass the class-folder dataset the run was trained on")
    find_checkpoint(run)
    read_config(lung_model)  # a wrong --lung-model is one line before anything is decoded
    if not (Path(lung_model) / "checkpoints" / "best.pt").is_file():
        raise XraylensError(f"--lung-model {lung_model}: no checkpoints/best.pt; finish `segment train` first")
    settings = {
        "run": str(Path(run).resolve()),
        "data": str(data.resolve()),
        "lung_model": str(Path(lung_model).resolve()),
        "method": method,
        "emphasis": emphasis,
        "restrict_to_lungs": restrict_to_lungs,
        "strength": strength,
        "epochs": epochs,
        "train_last": train_last,
        "lr": lr,
    }
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with lock_dir(out, "cycle"):
        _same_settings(out / "cycle.json", settings)
        current = open_run(run, device=device)
        view = out / "original"
        splits = _original_view(current, data, view)
        masks = out / "masks"
        predict_masks(lung_model, data, masks, device=device, progress=progress)
        eval_splits = [s for s in splits if s != "train"]
        prev_dir = Path(run)
        for k in range(cycles + 1):
            cdir = out / f"cycle-{k}"
            done = cdir / "metrics.json"
            if k > 0:
                run_dir = cdir / "run"
                if not done.is_file():
                    n = _enhance_train(current, view, masks, cdir / "enhanced" / "train", method=method,
                                       emphasis=emphasis, restrict=restrict_to_lungs, strength=strength,
                                       batch_size=batch_size)  # fmt: skip
                    log.info("cycle %d: %d enhanced training images written", k, n)
                    for s in eval_splits:
                        _link((view / s).resolve(), cdir / "enhanced" / s)
                    if not _finished(run_dir):
                        _fine_tune(current, prev_dir, cdir / "enhanced", run_dir, epochs, train_last, lr, device,
                                   progress)  # fmt: skip
                current = open_run(run_dir, device=device)
                prev_dir = run_dir
            if done.is_file():
                rows += json.loads(done.read_text())["rows"]
                continue
            cdir.mkdir(parents=True, exist_ok=True)
            new = [_evaluate(current, view, masks, s, cdir, method, k) for s in eval_splits]
            write_json(done, {"rows": new})
            rows += new
        write_csv(out / "cycles.csv", CYCLE_COLUMNS, ([r[c] for c in CYCLE_COLUMNS] for r in rows))
    return rows


def _fine_tune(current, prev_dir: Path, data: Path, run_dir: Path, epochs: int, train_last: int | None,
               lr: float | None, device: str, progress: bool) -> None:  # fmt: skip
    if (run_dir / "checkpoints" / "last.pt").is_file():
        train(None, run_dir, resume=True, progress=progress)  # a killed fine-tune goes on
        return
    cfg = copy.deepcopy(current.config)
    cfg.data.path = str(data)
    cfg.data.train_split, cfg.data.val_split = "train", "val"
    cfg.model.weights = None
    cfg.model.init_from = str(prev_dir)
    cfg.model.train_last = train_last
    cfg.train.epochs = epochs
    cfg.train.early_stopping = None
    if lr is not None:
        cfg.train.lr = lr
    if device != "auto":
        cfg.train.device = device
    train(cfg, run_dir, progress=progress)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The cycles table as aligned text."""
    cells = [CYCLE_COLUMNS] + [[str(r[c]) for c in CYCLE_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(CYCLE_COLUMNS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells)
