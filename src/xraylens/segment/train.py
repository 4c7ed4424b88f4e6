"""`xraylens segment train`: a lung U-Net trained with Dice + BCE and augmentation on image/mask
pairs, scored by Dice and IoU on a held-out split grouped by patient.

A small loop of its own (the classifier loop in `train/` stays as it is). Writes to the run folder:
config.yaml, splits.csv (image, split, group), history.csv (per epoch), metrics.json (held-out Dice
and IoU of the best epoch), checkpoints/{best,last}.pt (tensors and plain values only).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from xraylens.data.augment import GpuAugment
from xraylens.data.loader import to_model_input
from xraylens.errors import XraylensError
from xraylens.io import lock_dir, torch_save, write_csv, write_json, write_text
from xraylens.progress import progress_bar
from xraylens.runtime import resolve_device, seed_everything
from xraylens.segment.data import load_pairs, read_pairs, split_groups
from xraylens.segment.metrics import dice_iou
from xraylens.segment.model import build_unet, check_encoder

# grey images normalised exactly as the classifiers' inputs (data.loader.to_model_input defaults)
MEAN, STD = (0.5,), (0.25,)


@dataclass
class SegmentConfig:
    data: str = ""
    image_size: int = 256
    encoder: str = "resnet18"
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    val_fraction: float = 0.2
    augment: str = "flip,affine,jitter"
    seed: int = 0

    def check(self) -> None:
        """Ranges, before anything is decoded."""
        check_encoder(self.encoder)
        sizes = (("--image-size", self.image_size), ("--epochs", self.epochs), ("--batch-size", self.batch_size))
        for name, v in sizes:
            if v < 1:
                raise XraylensError(f"{name} must be 1 or more, got {v}")
        if self.image_size % 32:
            raise XraylensError(f"--image-size {self.image_size}: the U-Net needs a multiple of 32, e.g. 128 or 256")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise XraylensError(f"--lr must be a positive number, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise XraylensError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        GpuAugment.from_names(self.augment)


@dataclass
class SegmentSummary:
    out: Path
    dice: float  # mean per-image Dice on the held-out split, best epoch
    iou: float
    best_epoch: int
    n_train: int
    n_val: int
    grouping: str
    notes: list[str] = field(default_factory=list)


def read_config(run_dir: str | Path) -> SegmentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise XraylensError(f"{run_dir} is not a segmentation run (no config.yaml); pass the --out of `segment train`")
    raw = yaml.safe_load(path.read_text()) or {}
    if raw.get("kind") != "segmentation":
        raise XraylensError(f"{run_dir} is not a segmentation run; pass the --out of `xraylens segment train`")
    names = {f for f in SegmentConfig.__dataclass_fields__}
    return SegmentConfig(**{k: v for k, v in raw.items() if k in names})


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (per image, smoothed by 1 so an empty mask is not a 0/0)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + (1 - dice).mean()


def _augmenters(names: str, seed: int) -> tuple[GpuAugment, GpuAugment]:
    """(geometric, photometric): the geometric part moves image and mask together (stacked channels),
    jitter touches the image only."""
    parts = GpuAugment.from_names(names)
    geo = GpuAugment(flip=parts.flip, affine=parts.affine, elastic=parts.elastic, seed=seed)
    photo = GpuAugment(jitter=parts.jitter, seed=seed + 1)
    return geo.train(), photo.train()


@torch.no_grad()
def _evaluate(model, images: torch.Tensor, masks: torch.Tensor, batch_size: int, device) -> tuple[float, ...]:
    model.eval()
    dices, ious, losses = [], [], []
    for s in range(0, len(images), batch_size):
        x = to_model_input(images[s : s + batch_size, None], mean=MEAN, std=STD, device=device)
        t = masks[s : s + batch_size, None].to(device).float()
        logits = model(x)
        losses.append(float(_loss(logits, t)) * len(x))
        d, i = dice_iou(logits > 0, t > 0.5)
        dices.append(d.cpu())
        ious.append(i.cpu())
    n = max(1, len(images))
    return sum(losses) / n, float(torch.cat(dices).mean()), float(torch.cat(ious).mean())


def train_segmentation(
    data: str | Path,
    out: str | Path,
    config: SegmentConfig | None = None,
    *,
    device: str = "auto",
    progress: bool = True,
) -> SegmentSummary:
    """Train a lung U-Net on the pairs under `data`; write the run to `out` (see the module docstring)."""
    cfg = config or SegmentConfig()
    cfg.data = str(Path(data).expanduser().resolve())
    cfg.check()
    out = Path(out)
    if (out / "config.yaml").exists():
        raise XraylensError(f"{out} already holds a run; pass a new --out")
    dev = resolve_device(device)
    pairs, grouping = read_pairs(cfg.data)
    split = split_groups(pairs, cfg.val_fraction, cfg.seed)
    with lock_dir(out, "segment train"):
        seed_everything(cfg.seed)
        images, masks, kept, notes = load_pairs(pairs, cfg.image_size)
        split_kept = np.array([split[i] for i in kept])
        tr, va = np.flatnonzero(split_kept == "train"), np.flatnonzero(split_kept == "val")
        if len(va) == 0 or len(tr) == 0:
            raise XraylensError("the held-out split is empty after unreadable pairs were dropped; add pairs")
        write_text(out / "config.yaml", yaml.safe_dump({"kind": "segmentation", **asdict(cfg)}, sort_keys=False))
        kept_set = set(kept)
        write_csv(
            out / "splits.csv",
            ["image", "split", "group"],
            [[p.id, split[i] if i in kept_set else "unreadable", p.group] for i, p in enumerate(pairs)],
        )
        x_all = torch.from_numpy(images)
        m_all = torch.from_numpy(masks)
        x_tr, m_tr, x_va, m_va = x_all[tr], m_all[tr], x_all[va], m_all[va]
        model = build_unet(cfg.encoder).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
        geo, photo = _augmenters(cfg.augment, cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        history, best = [], (-1.0, 0.0, 0)
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(len(x_tr), generator=g)
            total = 0.0
            with progress_bar(progress, f"segment epoch {epoch}/{cfg.epochs}", len(order), True, unit="img") as adv:
                for s in range(0, len(order), cfg.batch_size):
                    idx = order[s : s + cfg.batch_size]
                    x = to_model_input(x_tr[idx, None], mean=MEAN, std=STD, device=dev)
                    t = m_tr[idx, None].to(dev).float()
                    both = geo(torch.cat([x, t], 1))
                    x, t = photo(both[:, :1]), (both[:, 1:] > 0.5).float()
                    loss = _loss(model(x), t)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                    adv(float(loss.detach()), len(idx))
            sched.step()
            val_loss, dice, iou = _evaluate(model, x_va, m_va, cfg.batch_size, dev)
            row = [epoch, total / len(order), val_loss, dice, iou, time.perf_counter() - t0]
            history.append([round(v, 6) if isinstance(v, float) else v for v in row])
            state = {
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "config": asdict(cfg),
                "epoch": epoch,
                "val_dice": dice,
            }
            torch_save(state, out / "checkpoints" / "last.pt")
            if dice > best[0]:
                best = (dice, iou, epoch)
                torch_save(state, out / "checkpoints" / "best.pt")
            write_csv(
                out / "history.csv", ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "seconds"], history
            )
        summary = SegmentSummary(out, best[0], best[1], best[2], len(tr), len(va), grouping, notes)
        write_json(
            out / "metrics.json",
            {
                "split": "val",
                "dice": best[0],
                "iou": best[1],
                "best_epoch": best[2],
                "n_train": len(tr),
                "n_val": len(va),
                "n_groups_val": len({pairs[kept[i]].group for i in va}),
                "grouping": grouping,
                "skipped_pairs": notes,
            },
        )
    return summary
