"""The training loop: data from the cache, augmentation on the device, best epoch by a named
validation metric, atomic checkpoints after every epoch, resumable.

A run killed mid-epoch resumes from `last.pt`: the interrupted epoch is redone from its start with
the same data order (shuffling is a function of seed and epoch), so no epoch is lost or doubled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import xraylens.distributed as distributed
from xraylens.config import RunConfig, flag_name, parse_elastic_params
from xraylens.data import clinical
from xraylens.data.augment import GpuAugment
from xraylens.data.loader import iterate_batches
from xraylens.data.sources import compile_group_pattern
from xraylens.data.splits import write_splits_csv
from xraylens.errors import XraylensError
from xraylens.io import LOCK_NAME, lock_dir, write_csv, write_json
from xraylens.metrics import checked_score, compute_metrics, metric_selector
from xraylens.models.fusion import clinical_batch, forward_with
from xraylens.ops import class_probabilities_np
from xraylens.progress import progress_bar
from xraylens.runs import (
    InputSettings,
    build_model,
    cached_split,
    ce_loss,
    config_source,
    find_checkpoint,
    predict_logits,
    read_checkpoint,
)
from xraylens.runtime import resolve_device, seed_everything
from xraylens.train.checkpoint import save_checkpoint
from xraylens.train.losses import build_loss, loss_key

log = logging.getLogger("xraylens.train")

HISTORY_KEYS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_f1",
    "val_qwk",
    "val_auc",
    "val_sensitivity",
    "val_specificity",
    "score",
    "lr",
    "seconds",
)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_score: float
    epochs_run: int
    val_metrics: dict[str, Any]


OPTIMIZERS = ("adam", "adamw", "sgd", "radam")
SCHEDULES = ("cosine", "step", "none")


def check_config(cfg: RunConfig) -> None:
    """Names, ranges and expressions that would otherwise fail only after the data is decoded (minutes
    on a real dataset): check them first."""
    from xraylens.models.registry import model_key

    cfg.check()
    if not Path(cfg.data.path).expanduser().exists():
        raise XraylensError(f"data path {cfg.data.path} does not exist; pass a folder, a .csv manifest or an .npz file")
    compile_group_pattern(cfg.data.group_pattern)
    clinical.check_settings(cfg.clinical)  # table, key, columns and pattern before any decoding
    if str(cfg.clinical.mode).lower() == "late" and cfg.train.batch_size < 2:
        # late fusion batch-normalises the clinical embedding over the batch (models/fusion.py)
        raise XraylensError("--fusion late needs --batch-size 2 or more (per process): it normalises over the batch")
    model_key(cfg.model.name)
    GpuAugment.from_names(cfg.data.augment)
    weights = cfg.model.weights
    if weights and weights != "hub" and not Path(weights).expanduser().is_file():
        raise XraylensError(f"--weights {weights}: no such file; pass a local .pth/.safetensors state dict or 'hub'")
    if cfg.model.init_from:
        find_checkpoint(Path(cfg.model.init_from).expanduser())  # a missing run is one line, before decoding
    loss_key(cfg.train.loss)
    _choose("optimizer", cfg.train.optimizer, OPTIMIZERS)
    _choose("schedule", cfg.train.schedule, SCHEDULES)
    metric_selector(cfg.train.select)
    device = resolve_device(cfg.train.device)
    from xraylens.data.loader import resolve_placement

    resolve_placement(cfg.data.placement, 0, None)  # a bad name fails before the data is decoded
    if cfg.train.compile and device.type != "cuda":
        # inductor on CPU compiles C++ for minutes per model and gains little over eager here
        raise XraylensError(f"train.compile needs a CUDA device, this run uses {device}; drop --set train.compile=true")


def _init_from(model: nn.Module, source: str) -> None:
    """Load another run's full weights (head included) into a fresh model; shapes must match exactly."""
    path = find_checkpoint(source)
    try:
        model.load_state_dict(read_checkpoint(path)["model"])
    except RuntimeError as e:
        raise XraylensError(f"model.init_from {path} does not fit this model: {str(e).splitlines()[0][:200]}") from None


def _choose(kind: str, value: str, options: tuple[str, ...]) -> str:
    v = value.lower()
    if v not in options:
        raise XraylensError(f"unknown {kind} {value!r}; use {', '.join(options)}")
    return v


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise XraylensError("no trainable parameters: raise model.train_last or leave it unset")
    name = _choose("optimizer", t.optimizer, OPTIMIZERS)
    if name == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if name == "radam":
        return torch.optim.RAdam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)


def build_scheduler(opt: torch.optim.Optimizer, cfg: RunConfig):
    t = cfg.train
    name = _choose("schedule", t.schedule, SCHEDULES)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, t.epochs))
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, t.step_size), gamma=t.step_gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # "none"


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def prepare_run_dir(out: Path, resume: bool) -> Path | None:
    """Return the checkpoint to resume from, refusing to overwrite a finished or started run."""
    last = out / "checkpoints" / "last.pt"
    if out.exists() and not out.is_dir():
        raise XraylensError(f"--out {out} is a file; choose a folder for the run")
    if resume:
        if not last.is_file():
            raise XraylensError(f"--resume given but {last} does not exist; start without --resume")
        return last
    if last.is_file():
        raise XraylensError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    _check_writable(out)
    return None


def _check_writable(out: Path) -> None:
    """Fail before decoding anything when the run folder cannot be created or written."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise XraylensError(f"cannot write the run to {out}: {probe} is not a writable folder; choose another --out")


# Settings a resumed run may change: only its length (to extend it). Everything else is the run's own.
RESUMABLE = frozenset({"train.epochs"})


def resume_config(out: str | Path, changes: dict[str, Any] | None = None) -> RunConfig:
    """The saved config of the run in `out`, with `changes` (section.key -> value; None = not given)
    applied where a resumed run allows it. Any other change is a one-line error naming it."""
    out = Path(out)
    ckpt = read_checkpoint(prepare_run_dir(out, resume=True))
    cfg = RunConfig.from_dict(ckpt["config"])
    given = {k: v for k, v in (changes or {}).items() if v is not None}
    refused = [k for k in given if k not in RESUMABLE]
    if refused:
        drop = ", ".join(map(flag_name, sorted(refused)))
        raise XraylensError(
            f"--resume continues {out} with its saved config; drop {drop} (only the epoch count may change)"
        )
    cfg.apply(given)
    if cfg.train.epochs < int(ckpt["epoch"]):
        raise XraylensError(f"--epochs {cfg.train.epochs} is below the {ckpt['epoch']} epochs already done")
    return cfg


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Store the data, cache and weights paths absolute, so the run works from any working directory."""
    d, m = cfg.data, cfg.model
    if d.path:
        d.path = str(Path(d.path).expanduser().resolve())
    if d.cache_dir:
        d.cache_dir = str(Path(d.cache_dir).expanduser().resolve())
    if m.weights and m.weights != "hub":
        m.weights = str(Path(m.weights).expanduser().resolve())
    if m.init_from:
        m.init_from = str(Path(m.init_from).expanduser().resolve())
    return cfg


def load_data(cfg: RunConfig, progress: bool = False):
    """Source, cached train/val splits and the data report, through the one data path."""
    d = cfg.data
    source = config_source(cfg)
    train = cached_split(cfg, source, d.train_split, progress=progress)
    val = cached_split(cfg, source, d.val_split, progress=progress)
    for name, c in ((d.train_split, train), (d.val_split, val)):
        if c.skipped:
            first_id, why = c.skipped[0]
            log.warning(
                "%s: %d unreadable file(s) skipped (first: %s: %s); all listed in data_report.json",
                name,
                len(c.skipped),
                first_id,
                why,
            )
    report = {
        "source": str(d.path),
        "kind": source.kind,
        "classes": list(source.classes),
        "split_info": source.split_info,
        "splits": {
            name: {
                "n": int(len(c.labels)),
                "per_class": np.bincount(c.labels, minlength=len(source.classes)).tolist(),
                "skipped": [{"id": i, "reason": r} for i, r in c.skipped],
            }
            for name, c in ((d.train_split, train), (d.val_split, val))
        },
    }
    if "groups" in source.split_info:
        # patient grouping: how many groups, which images had none, and any group in two splits
        report["groups"] = source.split_info["groups"]
        report["leaked_groups"] = source.split_info.get("leaked_groups")
        for name in (d.train_split, d.val_split):
            report["splits"][name]["n_groups"] = len({r.group or f"\0{r.id}" for r in source.split(name)})
    return source, train, val, report


def train(
    cfg: RunConfig | None,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after_batches: int | None = None,
    on_epoch: Callable[[int, float, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a model as `cfg` says, writing the run directory `out`.

    With `resume`, the run continues with the config saved in its checkpoint; `cfg` may be None, and
    if given only its `train.epochs` is used, as the new total (to extend a finished run; see
    `resume_config` for the rules). The run directory is locked while training: a second `train`
    into the same `out` fails at once instead of mixing its files with this one's.
    `stop_after_batches` simulates a crash after that many optimiser steps (tests of resume).
    `on_epoch(epoch, score, val_metrics)` runs after each epoch's checkpoints are written (1-based
    epoch); an exception it raises ends the run there (a tuner's pruning), the run staying resumable.
    Under `torchrun` (see `xraylens.distributed`) every process calls this: DistributedDataParallel,
    `train.batch_size` per process, each rank its share of every global batch; rank 0 alone locks and
    writes the run; all ranks get the same (gathered) validation metrics and call `on_epoch`.
    """
    out = Path(out)
    if resume:
        cfg = resume_config(out, {"train.epochs": cfg.train.epochs if cfg is not None else None})
    elif cfg is None:
        raise XraylensError("no config given for a new run")
    else:
        prepare_run_dir(out, resume=False)
    if not cfg.data.path:
        raise XraylensError("no data given: pass --data DIR (folder splits, a CSV manifest or an .npz)")
    check_config(cfg)
    created = not out.exists()
    main = distributed.is_main()  # under torchrun rank 0 alone locks and writes the run
    try:
        with lock_dir(out, "train") if main else contextlib.nullcontext(out):
            return _train_locked(absolute_paths(cfg), out, resume, progress and main, stop_after_batches, on_epoch)
    except BaseException:
        # a run that failed before writing anything (bad data, say) leaves no empty folder behind
        if main and created and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_NAME}:
            (out / LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()
        raise


def _train_locked(
    cfg: RunConfig,
    out: Path,
    resume: bool,
    progress: bool,
    stop_after_batches: int | None,
    on_epoch: Callable[[int, float, dict[str, Any]], None] | None,
) -> TrainResult:
    # re-read under the lock: another process may have started or finished a run here meanwhile
    resume_from = prepare_run_dir(out, resume)
    ckpt = read_checkpoint(resume_from) if resume_from is not None else None
    seed_everything(cfg.train.seed)
    device = resolve_device(distributed.setup(cfg.train.device))  # torchrun: join the group, cuda:LOCAL_RANK
    main = distributed.is_main()
    with distributed.main_first():  # one process per node decodes the cache, the others then read it
        source, train_c, val_c, report = load_data(cfg, progress=progress)
    # clinical table: leakage guard and fit on train (a resumed run reuses its saved fit); features
    # ride along with the cached splits (`cached.clinical`, indexed like the images);
    # before anything is written, so a refused column leaves no run folder
    clin, train_c, val_c = clinical.prepare_training(
        cfg.clinical, source.root, train_c, val_c, (ckpt or {}).get("state", {}).get("clinical"), seed=cfg.train.seed
    )
    if main:
        write_splits_csv(out / "splits.csv", source)  # which image went where, and its patient group
    if cfg.classes and list(cfg.classes) != list(source.classes):
        raise XraylensError(f"classes changed since the run started: {cfg.classes} -> {source.classes}")
    cfg.classes = list(source.classes)
    k = len(cfg.classes)
    if k < 2:
        raise XraylensError(f"need at least 2 classes, found {cfg.classes} in {cfg.data.path}")

    counts = np.bincount(train_c.labels, minlength=k)
    log.info(
        "%s: %d classes %s; train %d images (%s), %s %d; model %s on %s",
        cfg.data.path,
        k,
        cfg.classes,
        len(train_c.labels),
        ", ".join(f"{c}={n}" for c, n in zip(cfg.classes, counts, strict=True)),
        cfg.data.val_split,
        len(val_c.labels),
        cfg.model.name,
        device,
    )
    model = build_model(cfg, weights=ckpt is None, clinical_features=clin.width if clin else 0)
    if ckpt is None and cfg.model.init_from:
        _init_from(model, cfg.model.init_from)
    model = model.to(device)
    use_cl = cfg.train.channels_last and device.type == "cuda"
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    class_counts = counts.tolist()
    loss_fn = build_loss(
        cfg.train.loss, k, class_counts=class_counts, gamma=cfg.train.focal_gamma, alpha=cfg.train.focal_alpha
    ).to(device)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    augment = GpuAugment.from_names(
        cfg.data.augment,
        p=cfg.data.augment_p,
        elastic_p=cfg.data.elastic_p,
        elastic_params=parse_elastic_params(cfg.data.elastic_params),
    ).to(device)
    select = metric_selector(cfg.train.select)

    state: dict[str, Any] = {
        "history": [],
        "best_score": -math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "class_counts": class_counts,
    }
    if clin is not None:
        state["clinical"] = clin.to_dict()  # in every checkpoint: a .pt alone rebuilds the inputs
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer"):
            opt.load_state_dict(ckpt["optimizer"])
        state.update(ckpt.get("state") or {})
        start_epoch = int(ckpt["epoch"])
        if ckpt.get("scheduler"):
            sched.load_state_dict(ckpt["scheduler"])
            _stretch_cosine(sched, opt, cfg.train.epochs, start_epoch)
        if start_epoch >= cfg.train.epochs:
            log.info(
                "%s already finished %d/%d epochs; pass --epochs N to extend it", out, start_epoch, cfg.train.epochs
            )
        else:
            log.info("resuming %s at epoch %d/%d", out, start_epoch + 1, cfg.train.epochs)

    net = _ddp(model, device, cfg.train.seed)  # torchrun: DistributedDataParallel; else the model itself
    if cfg.train.compile:
        net = torch.compile(net)  # the training forward only: checkpoints and validation use `model`
    tb = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        cfg.save(out / "config.yaml")
        write_json(out / "data_report.json", report)
        if clin is not None:
            write_json(out / "clinical.json", clin.to_dict())
        _write_history(out, state["history"])
        tb = _tensorboard(out, purge_step=start_epoch + 1)

    scaler = torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and cfg.train.amp and not torch.cuda.is_bf16_supported()
    )
    inputs = InputSettings.from_config(cfg)
    steps_done = 0
    val_metrics: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            model.train()
            # each rank augments its share with its own stream (rank 0: the single-process one)
            gen = torch.Generator(device=device).manual_seed(
                cfg.train.seed * 1_000_003 + epoch + 7_919 * distributed.rank()
            )
            total, n_seen = 0.0, 0
            # train.batch_size is per process: a step sees batch_size x world_size images (torchrun)
            world = distributed.world_size()
            global_bs = cfg.train.batch_size * world
            # drop a ragged last batch (a batch of 1 breaks BatchNorm) unless the split is that small
            drop_last = len(train_c.labels) > global_bs
            batches = iterate_batches(
                train_c,
                cfg.train.batch_size,
                shuffle=True,
                balanced=cfg.data.balanced,
                seed=cfg.train.seed,
                epoch=epoch,
                drop_last=drop_last,
                device=device,
                placement=cfg.data.placement,  # GPU-resident or pinned when it fits (auto)
                # this rank's contiguous share of each global batch (the same permutation on every rank)
                shard=None if world == 1 else (distributed.rank(), world),
            )
            n_images = _n_batches(len(train_c.labels), global_bs) * global_bs if drop_last else len(train_c.labels)
            with progress_bar(
                progress, f"epoch {epoch + 1}/{cfg.train.epochs}", n_images, show_loss=True, unit="img"
            ) as advance:
                for x, y, idx in batches:
                    z = clinical_batch(train_c.clinical, idx, device)
                    xin = inputs.to_model(x, device, channels_last=use_cl)
                    y = y.to(device, non_blocking=True)
                    xin = augment(xin, generator=gen)
                    with _autocast(device, cfg.train.amp):
                        logits = forward_with(net, xin, z)
                    loss = loss_fn(logits.float(), y)
                    if not torch.isfinite(loss):
                        raise XraylensError(f"loss became {loss.item()} at epoch {epoch + 1}; lower train.lr")
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    total += loss.item() * len(y)
                    n_seen += len(y)
                    steps_done += 1
                    advance(loss.item(), n=len(y) * world)
                    if stop_after_batches is not None and steps_done >= stop_after_batches:
                        raise _SimulatedCrash()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            total, n_seen = distributed.all_reduce_sum((total, n_seen))  # the mean loss over every rank

            logits = _val_logits(model, val_c, inputs, device, cfg.train.eval_batch_size)
            val_metrics = compute_metrics(
                val_c.labels, class_probabilities_np(logits), cfg.classes, loss=ce_loss(logits, val_c.labels)
            )
            # NaN / +inf is an error naming the expression; -inf (undefined metric) is "never preferred"
            score = checked_score(select, val_metrics, epoch=epoch + 1)
            row = {
                "epoch": epoch + 1,
                "train_loss": total / max(1, n_seen),
                "val_loss": val_metrics.get("loss"),
                "val_accuracy": val_metrics.get("accuracy"),
                "val_f1": val_metrics.get("f1_weighted"),
                "val_qwk": val_metrics.get("qwk"),
                "val_auc": val_metrics.get("auc"),
                "val_sensitivity": val_metrics.get("sensitivity"),
                "val_specificity": val_metrics.get("specificity"),
                "score": score,
                "lr": lr,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            state["history"].append(row)
            # the first epoch always becomes best.pt, even at -inf: a finished run always has one
            improved = score > state["best_score"] or state["best_epoch"] == 0
            if improved:
                state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0, best_val_metrics=val_metrics)
                if main:
                    save_checkpoint(
                        out / "checkpoints" / "best.pt", model=model, config=cfg, epoch=epoch + 1, state=state
                    )
            else:
                state["bad_epochs"] += 1
            if main:
                save_checkpoint(
                    out / "checkpoints" / "last.pt",
                    model=model,
                    config=cfg,
                    epoch=epoch + 1,
                    optimizer=opt,
                    scheduler=sched,
                    state=state,
                )
                _write_history(out, state["history"])
            _log_tb(tb, row)
            log.info(
                "epoch %d/%d train_loss %.4f val_loss %.4f val_acc %.4f score %.4f%s",
                epoch + 1,
                cfg.train.epochs,
                row["train_loss"],
                row["val_loss"],
                row["val_accuracy"],
                score,
                " *" if improved else "",
            )
            if main:
                _write_metrics(out, cfg, state)  # every epoch: a run stopped early still has its summary
            distributed.barrier()  # rank 0's checkpoint is on disk before any rank goes on (resume point)
            distributed.kill_point(f"epoch{epoch + 1}")  # tests: XRAYLENS_KILL_AT=epoch1@1 kills a rank here
            # every rank has the same (gathered) metrics, so every rank stops at the same epoch
            if on_epoch is not None:
                on_epoch(epoch + 1, score, val_metrics)
            if cfg.train.early_stopping and state["bad_epochs"] >= cfg.train.early_stopping:
                log.info("early stopping: no improvement of %s for %d epochs", cfg.train.select, state["bad_epochs"])
                break
    finally:
        if tb is not None:
            tb.close()

    best = _write_metrics(out, cfg, state) if main else state.get("best_val_metrics", {})
    return TrainResult(out, state["best_epoch"], state["best_score"], len(state["history"]), best)


def _write_metrics(out: Path, cfg: RunConfig, state: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the best epoch, its score and validation metrics; returns those metrics."""
    best = state.get("best_val_metrics", {})
    write_json(
        out / "metrics.json",
        {
            "best_epoch": state["best_epoch"],
            "select": cfg.train.select,
            "best_score": state["best_score"],
            "epochs_run": len(state["history"]),
            "val": best,
        },
    )
    return best


class _SimulatedCrash(RuntimeError):
    pass


def _stretch_cosine(sched, opt: torch.optim.Optimizer, epochs: int, done: int) -> None:
    """A run extended with more epochs continues its cosine schedule over the new length (the saved
    state would otherwise restart the cosine at lr 0): set T_max and the closed-form lr for `done`."""
    if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) or sched.T_max == max(1, epochs):
        return
    sched.T_max = max(1, epochs)
    lrs = [
        sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * done / sched.T_max)) / 2
        for base in sched.base_lrs
    ]
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs  # what get_last_lr() reports; step() continues from the groups' lr


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm of `model` as SyncBatchNorm, in place (same parameters and buffers, so the same
    state-dict keys). timm's converter: torch's turns timm's BatchNormAct2d (BatchNorm + activation,
    EfficientNet) into a plain SyncBatchNorm and drops the activation."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def _ddp(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Under torchrun: the model in DistributedDataParallel (gradients averaged over ranks), with
    SyncBatchNorm on CUDA so BatchNorm sees the global batch as a single process would (gloo on the CPU
    has no SyncBatchNorm: each rank normalises its own share). A single process: the model itself."""
    if not distributed.is_distributed():
        return model
    if device.type == "cuda":
        model = sync_batchnorm(model)  # same parameters: the optimiser keeps them
    # DDP copies rank 0's weights to every rank; dropout masks then differ between ranks
    torch.manual_seed(seed + 1_000_003 * distributed.rank())
    log.info(
        "DistributedDataParallel over %d processes (%s): a step sees train.batch_size x %d images",
        distributed.world_size(),
        torch.distributed.get_backend(),
        distributed.world_size(),
    )
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _val_logits(model: nn.Module, val_c, inputs: InputSettings, device: torch.device, batch_size: int) -> np.ndarray:
    """Validation logits of every image: each rank predicts its contiguous share, all ranks get them all
    (in cache order), so every rank computes the same metrics. A single process: `predict_logits`."""
    n = len(val_c.labels)
    if not distributed.is_distributed() or n < distributed.world_size():
        return predict_logits(model, val_c, inputs, device, batch_size)
    lo, hi = distributed.shard_range(n)
    share = dataclasses.replace(
        val_c,
        images=val_c.images[lo:hi],
        labels=val_c.labels[lo:hi],
        ids=val_c.ids[lo:hi],
        geometry=val_c.geometry[lo:hi],
        clinical=None if val_c.clinical is None else val_c.clinical[lo:hi],
    )
    return distributed.all_gather_array(predict_logits(model, share, inputs, device, batch_size))


def _n_batches(n: int, bs: int) -> int:
    return max(1, n // bs) if n > bs else 1


def _write_history(out: Path, history: list[dict]) -> None:
    write_csv(out / "history.csv", HISTORY_KEYS, ([r.get(k) for k in HISTORY_KEYS] for r in history))


def _tensorboard(out: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        log.warning("tensorboard not installed: no TensorBoard events written")
        return None
    return SummaryWriter(str(out / "tb"), purge_step=purge_step)


def _log_tb(tb, row: dict) -> None:
    if tb is None:
        return
    for k, v in row.items():
        if k != "epoch" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
            tb.add_scalar(k.replace("_", "/", 1) if k.startswith(("train_", "val_")) else k, v, row["epoch"])
    tb.flush()
