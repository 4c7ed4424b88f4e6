"""`xraylens explain`: CAMs for a split of a trained run, with renders, maps and an index.

The images come through the run's own data path (cache -> to_model_input), so the explained
input is exactly what the model saw in training and evaluation. One engine pass per batch gives
every requested gradient method and the predictions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

import xraylens.distributed as distributed
from xraylens.data.sources import is_plain_image_folder
from xraylens.errors import XraylensError
from xraylens.explain.engine import CamEngine, CamResult, check_options, check_precision
from xraylens.explain.methods import resolve_methods
from xraylens.models.fusion import bind_clinical, clinical_batch
from xraylens.ops import class_probabilities
from xraylens.runs import Run, RunLike, open_run


@dataclass
class ExplainSummary:
    out: Path
    n_images: int
    methods: list[str]
    grid_paths: list[Path]
    maps_path: Path
    index_path: Path
    constant: dict[str, int]  # per method: images whose map was constant (returned as zeros)


def parse_target(target: str | int, classes: Sequence[str]) -> str | int:
    """'pred', 'true', a class name or a class index -> what the engine takes."""
    if isinstance(target, int):
        t = target
    elif target in ("pred", "true"):
        return target
    elif target in classes:
        return list(classes).index(target)
    elif str(target).isdigit():
        t = int(target)
    else:
        raise XraylensError(f"--target {target!r}: use pred, true, a class name ({', '.join(classes)}) or its index")
    if not 0 <= t < len(classes):
        raise XraylensError(f"--target {t} is out of range for {len(classes)} classes")
    return t


def check_target(target: str | int, labelled: bool) -> None:
    if target == "true" and not labelled:
        raise XraylensError(
            "--target true needs labelled data (class folders); these images have no labels: use pred or a class"
        )


def check_positive(**values: int | None) -> None:
    """Counts a user gives (--batch-size, --limit...): None means 'not given'; 0 or less is a mistake."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise XraylensError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


def check_cam_settings(
    run: Run,
    layers: Sequence[str] | None,
    combine: str | None,
    score: str,
    target: str | int,
    data: str | Path | None = None,
) -> None:
    """Layer names, --combine, --score and --target checked against the model and the data before any
    image is decoded (a typo should not cost minutes of decoding)."""
    check_options(combine, score)
    parse_target(target, run.classes)
    check_target(target, labelled=data is None or not is_plain_image_folder(data))
    CamEngine(run.model, list(layers) if layers else None)  # resolves the layer names; no hooks yet


def pick_indices(n: int, limit: int | None) -> np.ndarray:
    """All images, or `limit` of them spread evenly over the split (cache order is by class)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def iter_cams(
    run: Run,
    cached,
    indices: np.ndarray,
    methods: list[str],
    *,
    layers: list[str] | None = None,
    combine: str | None = None,
    target: str | int = "pred",
    score: str = "logit",
    batch_size: int = 16,
    precision: str = "fp32",
) -> Iterator[tuple[np.ndarray, torch.Tensor, CamResult]]:
    """Yield (cache indices, model input, CamResult) per batch; maps stay on the run's device."""
    targets = parse_target(target, run.classes)
    inputs = run.inputs
    with CamEngine(run.model, layers) as engine:
        for lo in range(0, len(indices), batch_size):
            idx = indices[lo : lo + batch_size]
            x = inputs.to_model(torch.from_numpy(cached.images[idx])[:, None], run.device)
            labels = torch.from_numpy(cached.labels[idx]).to(run.device)
            # a fused model's clinical rows are bound for this batch: the engine explains the image branch
            z = clinical_batch(cached.clinical, idx, run.device)
            with bind_clinical(run.model, z):
                res = engine(
                    x, methods, targets=targets, labels=labels, combine=combine, score=score, precision=precision
                )
                yield idx, x, res


def explain_run(
    run: RunLike,
    data: str | Path | None = None,
    split: str = "test",
    *,
    methods: str | Sequence[str] = ("gradcam",),
    layers: Sequence[str] | None = None,
    combine: str | None = None,
    target: str | int = "pred",
    score: str = "logit",
    out: str | Path | None = None,
    device: str = "auto",
    limit: int | None = None,
    batch_size: int = 16,
    overlays: int = 16,
    grid: int = 36,
    blank_wrong: bool = False,
    cmap: str = "jet",
    alpha: float = 0.4,
    which: str = "best",
    precision: str = "fp32",
) -> ExplainSummary:
    """Explain a split: maps.npz, index.csv, grid_<method>.png and overlays/<method>/*.png in `out`.

    Images without a label (a plain folder) have no true class: `true` is left empty in index.csv and
    their grid tiles mark nothing right or wrong."""
    from xraylens.explain import render

    method_list = resolve_methods(methods)
    check_precision(precision)  # before the run is opened or the data decoded
    check_positive(batch_size=batch_size, limit=limit)
    if overlays < 0 or grid < 0:
        raise XraylensError(f"--overlays and --grid must be 0 or more, got {overlays} and {grid}")
    run = open_run(run, which=which, device=distributed.setup(device))  # torchrun: this rank's device
    check_cam_settings(run, layers, combine, score, target, data)
    with distributed.main_first():  # one process per node decodes, the others read the cache
        source, cached = run.load_split(data, split)
    labelled = source.kind != "images"
    indices = pick_indices(len(cached.labels), limit)
    out = Path(out) if out else run.run_dir / "cams"

    maps: dict[str, list[np.ndarray]] = {m: [] for m in method_list}
    raw: dict[str, list[np.ndarray]] = {}
    constant: dict[str, list[np.ndarray]] = {m: [] for m in method_list}
    targets, preds, probs = [], [], []
    for _, _, res in iter_cams(
        run,
        cached,
        distributed.shard_batches(indices, batch_size),  # torchrun: this rank's whole batches
        method_list,
        layers=list(layers) if layers else None,
        combine=combine,
        target=target,
        score=score,
        batch_size=batch_size,
        precision=precision,
    ):
        for m in method_list:
            maps[m].append(res.maps[m][:, 0].half().cpu().numpy())
            constant[m].append(res.constant[m].cpu().numpy())
            for layer, r in res.raw[m].items():
                raw.setdefault(f"raw/{m}/{layer}", []).append(r[:, 0].float().cpu().numpy())
        p = class_probabilities(res.logits)
        targets.append(res.targets.cpu().numpy())
        preds.append(p.argmax(1).cpu().numpy())
        probs.append(p.max(1).values.cpu().numpy())
    # torchrun: rank 0 gathers every rank's batches, in order, and writes; the others return its summary
    maps, raw, constant, targets, preds, probs = distributed.gather_parts((maps, raw, constant, targets, preds, probs))
    if not distributed.is_main():
        return distributed.share_from_main(None)

    ids = [cached.ids[i] for i in indices]
    stacked = {m: np.concatenate(v) for m, v in maps.items()}
    flags = {m: np.concatenate(v) for m, v in constant.items()}
    true, pred, prob = cached.labels[indices], np.concatenate(preds), np.concatenate(probs)
    maps_path = out / "maps.npz"
    render.save_maps_npz(maps_path, ids, {**stacked, **{k: np.concatenate(v) for k, v in raw.items()}})

    columns: dict[str, object] = {
        "true": [run.classes[t] if labelled else "" for t in true],
        "pred": [run.classes[p] for p in pred],
        "prob": np.round(prob, 6),
        "target": [run.classes[t] for t in np.concatenate(targets)],
    }
    columns.update({f"constant_{m}": flags[m].astype(int) for m in method_list})
    grey = cached.images[indices]
    files: dict[str, list[str]] = {m: [""] * len(ids) for m in method_list}
    names = overlay_names(ids)
    # spread over the split (cache order is by class), so every class shows, lesions included
    shown = pick_indices(len(ids), overlays) if overlays else []
    for m in method_list:
        for j in shown:
            rel = Path("overlays") / safe_name(m) / names[j]
            render.save_png(out / rel, render.side_by_side(grey[j], stacked[m][j].astype(np.float32), cmap, alpha))
            files[m][j] = rel.as_posix()
        columns[f"overlay_{m}"] = files[m]
    index_path = out / "index.csv"
    render.write_index_csv(index_path, ids, columns)

    grids = []
    n_grid = min(grid, len(ids))
    if n_grid:
        g_idx = pick_indices(len(ids), n_grid)
        for m in method_list:
            path = out / f"grid_{safe_name(m)}.png"
            render.cam_grid(
                grey[g_idx],
                stacked[m][g_idx].astype(np.float32),
                true=true[g_idx] if labelled else None,
                pred=pred[g_idx],
                probs=prob[g_idx],
                class_names=run.classes,
                blank_wrong=blank_wrong,
                cmap=cmap,
                alpha=alpha,
                path=path,
            )
            grids.append(path)
    summary = ExplainSummary(
        out, len(ids), method_list, grids, maps_path, index_path, {m: int(flags[m].sum()) for m in method_list}
    )
    return distributed.share_from_main(summary)


def safe_name(name: str) -> str:
    """A file-name-safe version of an image id or method name ('+' kept: gradcam++)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "x"


def overlay_names(ids: Sequence[str]) -> list[str]:
    """`<id without its extension>.png` per image (no `.png.png`); a clash gets a numeric suffix."""
    seen: set[str] = set()
    out = []
    for i in ids:
        base = safe_name(str(PurePosixPath(i).with_suffix(""))) if PurePosixPath(i).suffix else safe_name(i)
        name, n = f"{base}.png", 1
        while name in seen:
            n += 1
            name = f"{base}-{n}.png"
        seen.add(name)
        out.append(name)
    return out
