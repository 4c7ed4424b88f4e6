"""`xraylens segment predict`: a lung mask for every image of a folder, at the image's ORIGINAL size.

Each image goes through `prepare_image` (the data path every command uses); the mask predicted on
the model input is mapped back through its `Geometry`: every original pixel centre is carried onto
the input grid and the probability sampled there (bilinear), pixels outside the crop are background.
Masks are `<image stem>.png` (0/255) in one folder, so `read_mask_folder` + `match_keys` pair them
with the images (`xraylens localize --format masks`). Resumable: a mask newer than its image and the
checkpoint is kept. `masks_index.csv` lists image, mask, status, size and lung fraction.
`only=` (the CLI's `--run RUN --split NAME`, via `split_images`) restricts the folder to the images of
one split of a classifier run, so an audit of its val split needs masks for those images only.
"""

from __future__ import annotations

import csv
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xraylens.config import RunConfig
from xraylens.data.cache import prepare_image
from xraylens.data.loader import to_model_input
from xraylens.data.records import Geometry
from xraylens.data.sources import load_image_folder
from xraylens.errors import DecodeError, XraylensError
from xraylens.io import atomic_path, lock_dir, write_csv
from xraylens.progress import progress_bar
from xraylens.runtime import resolve_device
from xraylens.segment.model import build_unet
from xraylens.segment.train import MEAN, STD, read_config

INDEX = "masks_index.csv"


@dataclass
class PredictSummary:
    out: Path
    written: int
    kept: int  # up to date from an earlier call
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    index_path: Path | None = None


@torch.no_grad()
def mask_to_original(prob: torch.Tensor | np.ndarray, geometry: Geometry, threshold: float = 0.5) -> np.ndarray:
    """A probability (or 0/1) map [H, W] on the model-input grid -> bool mask [orig_h, orig_w].

    The inverse of crop + resize: each original pixel centre (x + .5, y + .5) goes to the input grid
    by `geometry.to_input` and reads the map there bilinearly; centres outside the crop are False."""
    p = torch.as_tensor(prob, dtype=torch.float32).cpu()  # the sampling grid is built on the CPU
    if p.shape != (geometry.out_h, geometry.out_w):
        raise ValueError(f"map {tuple(p.shape)} is not the input size {(geometry.out_h, geometry.out_w)}")
    xs = np.arange(geometry.orig_w) + 0.5
    ys = np.arange(geometry.orig_h) + 0.5
    xi = (xs - geometry.crop[0]) * geometry.scale_x  # input-grid x of each original column centre
    yi = (ys - geometry.crop[1]) * geometry.scale_y
    gx = torch.from_numpy(2 * xi / geometry.out_w - 1).float()  # grid_sample, align_corners=False
    gy = torch.from_numpy(2 * yi / geometry.out_h - 1).float()
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), -1)[None]
    v = F.grid_sample(p[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    inside = torch.from_numpy(((yi >= 0) & (yi < geometry.out_h))[:, None] & ((xi >= 0) & (xi < geometry.out_w))[None])
    return ((v >= threshold) & inside).numpy()


def _load(run_dir: Path, device: torch.device):
    cfg = read_config(run_dir)
    ckpt = run_dir / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        raise XraylensError(f"{ckpt} not found; finish `xraylens segment train` first")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = build_unet(cfg.encoder)
    model.load_state_dict(state["state_dict"])
    return cfg, model.to(device).eval(), ckpt


def predict_masks(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    threshold: float = 0.5,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
    only: Collection[str | Path] | None = None,
) -> PredictSummary:
    """Write `<stem>.png` lung masks (0/255, original size) for every image under `data` into `out`;
    with `only` (image paths), for those of them that are under `data`."""
    if not 0 < threshold < 1:
        raise XraylensError(f"--threshold must be in (0, 1), got {threshold}")
    if batch_size < 1:
        raise XraylensError(f"--batch-size must be 1 or more, got {batch_size}")
    run_dir = Path(run_dir)
    read_config(run_dir)  # a wrong SEGRUN is reported before the folder is scanned
    out = Path(out)
    # masks written inside --data must not come back as images on the next (resuming) call
    masks_dir = out.resolve()
    records = [r for r in load_image_folder(data).records if not Path(r.path).resolve().is_relative_to(masks_dir)]
    if only is not None:
        # compared as resolved paths: the run may name its data folder relatively or by another route
        wanted = {Path(p).resolve() for p in only}
        records = [r for r in records if Path(r.path).resolve() in wanted]
        if not records:
            raise XraylensError(f"none of the {len(wanted)} selected images is under {data}; check --data and --split")
    if not records:
        raise XraylensError(f"no images under {data} outside {out}; pass a folder of images as --data")
    names: dict[str, str] = {}
    for r in records:
        stem = Path(r.id).stem
        if stem.lower() in names:
            raise XraylensError(
                f"{names[stem.lower()]} and {r.id} would share the mask {stem}.png; predict each folder on its own"
            )
        names[stem.lower()] = r.id
    dev = resolve_device(device)
    cfg, model, ckpt = _load(run_dir, dev)
    newest_input = ckpt.stat().st_mtime_ns
    rows: list[list] = []
    failed: list[tuple[str, str]] = []
    written = kept = 0
    with lock_dir(out, "segment predict"):
        todo = []
        for r in records:
            target = out / f"{Path(r.id).stem}.png"
            if target.is_file() and target.stat().st_mtime_ns > max(newest_input, Path(r.path).stat().st_mtime_ns):
                rows.append(_kept_row(r.id, target))
                kept += 1
            else:
                todo.append(r)
        with progress_bar(progress, "segment predict", len(todo), unit="img") as advance:
            for s in range(0, len(todo), batch_size):
                batch, arrays, geoms = [], [], []
                for r in todo[s : s + batch_size]:
                    try:
                        arr, geom = prepare_image(r.path, cfg.image_size)
                    except DecodeError as exc:
                        failed.append((r.id, str(exc)))
                        rows.append([r.id, "", f"unreadable: {exc}", "", "", ""])
                        continue
                    batch.append(r)
                    arrays.append(arr)
                    geoms.append(geom)
                if batch:
                    x = to_model_input(torch.from_numpy(np.stack(arrays))[:, None], mean=MEAN, std=STD, device=dev)
                    prob = torch.sigmoid(model(x))[:, 0].float().cpu()
                    for r, g, p in zip(batch, geoms, prob, strict=True):
                        mask = mask_to_original(p, g, threshold)
                        target = out / f"{Path(r.id).stem}.png"
                        with atomic_path(target, suffix=".png") as tmp:
                            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
                        rows.append([r.id, target.name, "written", g.orig_w, g.orig_h, round(float(mask.mean()), 6)])
                        written += 1
                advance(n=len(todo[s : s + batch_size]))
        index = out / INDEX
        order = {r.id: i for i, r in enumerate(records)}
        rows.sort(key=lambda row: order[row[0]])
        write_csv(index, ["image", "mask", "status", "width", "height", "lung_fraction"], rows)
    return PredictSummary(out, written, kept, failed, index)


def split_images(run: str | Path, split: str) -> list[Path]:
    """The image paths of one split of a classifier run (its splits.csv, relative to its data folder)."""
    run = Path(run)
    splits = run / "splits.csv"
    if not splits.is_file():
        raise XraylensError(f"{run} is not a classifier run (no splits.csv); pass the run whose split to mask")
    if not (run / "config.yaml").is_file():
        raise XraylensError(f"{run} is not a classifier run (no config.yaml)")
    root = Path(RunConfig.load(run / "config.yaml").data.path)
    with open(splits, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    paths = [root / r["image"] for r in rows if r.get("split") == split]
    if not paths:
        names = sorted({r.get("split", "") for r in rows})
        raise XraylensError(f"{run} has no images in split {split!r} (it has: {', '.join(names)})")
    return paths


def _kept_row(image_id: str, target: Path) -> list:
    with Image.open(target) as im:
        m = np.asarray(im) > 0
    return [image_id, target.name, "kept", m.shape[1], m.shape[0], round(float(m.mean()), 6)]


def read_index(out: str | Path) -> list[dict[str, str]]:
    """The rows of `masks_index.csv` in `out`."""
    with open(Path(out) / INDEX, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
