"""`xraylens localize`: do a run's explanations point at the annotated anatomy?

For every annotated image of a split (or a plain image folder) and every CAM method, beside the
centre-point and uniform-random baselines: pointing game (any / all instances, tolerance in
original pixels), energy pointing game, IoU of the top-percentile map, the CAM-in-mask energy
ratio for mask annotations (e.g. lung masks from `xraylens segment predict`), the share of energy
in an edge band and in the corners (where shortcuts live), and optionally deletion/insertion AUC.
Writes a per-image CSV and a summary (CSV + JSON) of mean accuracy per method and class, as seed
003's batch evaluation does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xraylens import distributed
from xraylens.data import annotations as ann
from xraylens.errors import XraylensError
from xraylens.explain import render
from xraylens.explain.run import (
    check_cam_settings,
    check_positive,
    iter_cams,
    parse_target,
    safe_name,
)
from xraylens.io import write_csv, write_json
from xraylens.localize import metrics as loc
from xraylens.localize.faithfulness import deletion_insertion
from xraylens.ops import class_probabilities
from xraylens.runs import RunLike, open_run

BASELINES = ("baseline:center", "baseline:random")


@dataclass
class ImageResult:
    """One image under one method (or baseline): a row of localization.csv.

    Scores are None where they do not apply (no annotation, not a mask format, no faithfulness run)."""

    image: str
    cls: str
    method: str
    hit: float | None
    hit_all: float | None
    distance: float | None
    peak_x: float
    peak_y: float
    energy: float | None
    iou: float | None
    mask_ratio: float | None
    constant: bool
    deletion_auc: float | None = None
    insertion_auc: float | None = None
    # shares of positive CAM energy in the edge band and in the corners (annotation-free shortcut checks)
    border_energy: float | None = None
    corner_energy: float | None = None


# columns of localization.csv, in order ("cls" is written as "class")
PER_IMAGE = [f.name if f.name != "cls" else "class" for f in fields(ImageResult)]
SCORES = (
    "hit",
    "hit_all",
    "distance",
    "energy",
    "iou",
    "mask_ratio",
    "deletion_auc",
    "insertion_auc",
    "border_energy",
    "corner_energy",
)


@dataclass
class LocalizeSummary:
    out: Path
    n_images: int  # images of the split that the annotation file lists
    n_annotated: int  # ... with at least one shape (the rest are skipped by the pointing game)
    tolerance: float
    overall: dict[str, float]  # method -> pointing-game accuracy over annotated images
    csv_path: Path
    summary_path: Path
    skipped_rows: list[tuple[Any, str]] = field(default_factory=list)


def localize_run(
    run: RunLike,
    *,
    annotations: str | Path,
    fmt: str,
    data: str | Path | None = None,
    split: str = "test",
    methods: str | Sequence[str] = ("gradcam",),
    layers: Sequence[str] | None = None,
    combine: str | None = None,
    target: str | int = "pred",
    tolerance: float = 15.0,
    smooth: float = 0.0,
    percentile: float = 90.0,
    label: str | None = None,
    faithfulness: bool = False,
    steps: int = 20,
    skip_bad: bool = False,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
    which: str = "best",
    seed: int = 0,
    ref_size: tuple[float, float] | None = None,
    border: float = 0.1,
    corner: float = 0.15,
) -> LocalizeSummary:
    """Localisation metrics of a run's CAMs on annotated images; writes localization*.csv/json to `out`.

    `ref_size` (width, height): the image size the annotation coordinates refer to, when the image
    files were resized after annotation (e.g. NIH boxes drawn at 1024 px on 256 px copies).
    `border` / `corner`: the edge band's width and the corner squares' side, as fractions of the image
    side, for the `border_energy` and `corner_energy` columns."""
    from xraylens.explain.methods import resolve_methods

    method_list = resolve_methods(methods)
    check_positive(batch_size=batch_size, steps=steps)
    check_metric_args(tolerance=tolerance, smooth=smooth, percentile=percentile)
    loc.border_region(2, 2, border), loc.corner_region(2, 2, corner)  # ranges, before anything is read
    annots = ann.read_annotations(annotations, fmt, skip_bad)
    run = open_run(run, which=which, device=distributed.setup(device))  # torchrun: this rank's device
    check_cam_settings(run, layers, combine, "logit", target, data)
    with distributed.main_first():  # one process per node decodes, the others read the cache
        source, cached = run.load_split(data, split)
    labelled = source.kind != "images"
    keys = ann.match_keys(cached.ids, annots)
    indices = np.array([i for i, k in enumerate(keys) if k is not None], dtype=np.int64)
    if len(indices) == 0:
        raise XraylensError(
            f"none of the {len(keys)} images (e.g. {cached.ids[0]!r}) appear in {annotations} "
            f"(keys like {next(iter(annots), '?')!r}); check --data/--split and the file"
        )

    names = [*method_list, *BASELINES]
    rows: list[ImageResult] = []
    hits: dict[str, list[np.ndarray]] = {m: [] for m in names}
    classes_seen: list[str] = []
    n_annotated = 0
    for idx, x, res in iter_cams(
        run,
        cached,
        distributed.shard_batches(indices, batch_size),  # torchrun: this rank's whole batches
        method_list,
        layers=list(layers) if layers else None,
        combine=combine,
        target=target,
        batch_size=batch_size,
    ):
        dev = x.device
        geoms = [cached.geometry[i] for i in idx]
        shapes = ann.shapes_on_images([keys[i] for i in idx], annots, geoms, label, ref_size)
        inst = torch.from_numpy(ann.rasterize_batch(shapes, geoms, instances=True)).to(dev)
        union = inst.any(1, keepdim=True)
        scale = torch.tensor([[g.scale_x, g.scale_y] for g in geoms], device=dev, dtype=torch.float32)
        b, _, h, w = x.shape
        batch_maps = dict(res.maps)
        batch_maps["baseline:center"] = loc.center_map(b, h, w, device=dev)
        batch_maps["baseline:random"] = loc.random_map(b, h, w, seed=seed + int(idx[0]), device=dev)
        cls = [_class_of(run, cached, i, labelled, annots.get(keys[i])) for i in idx]
        classes_seen += cls
        n_annotated += int(union.flatten(1).any(1).sum())
        band, corners = loc.border_region(h, w, border, dev), loc.corner_region(h, w, corner, dev)
        for m in names:
            maps = batch_maps[m]
            pg = loc.pointing_game(maps, instance_masks=inst, tolerance=tolerance, scale=scale, smooth_sigma=smooth)
            energy = loc.energy_pointing_game(maps, masks=union)
            iou = loc.iou_at_percentile(maps, union, percentile)
            ratio = loc.mask_energy_ratio(maps, union).area_normalised if fmt == "masks" else None
            e_band, e_corner = loc.region_energy(maps, band), loc.region_energy(maps, corners)
            dele = ins = None
            if faithfulness and not m.startswith("baseline"):
                dele = deletion_insertion(run.model, x, maps, res.targets, steps=steps, mode="deletion").auc
                ins = deletion_insertion(run.model, x, maps, res.targets, steps=steps, mode="insertion").auc
            hits[m].append(pg.hit.cpu().numpy())
            peaks = pg.peak.cpu().numpy()
            for j, i in enumerate(idx):
                # peak pixel centre (col + .5, row + .5) back to original-image (x, y)
                px, py = geoms[j].to_original(np.array([peaks[j, 1] + 0.5, peaks[j, 0] + 0.5]))
                rows.append(
                    ImageResult(
                        image=cached.ids[i],
                        cls=cls[j],
                        method=m,
                        hit=_v(pg.hit[j]),
                        hit_all=_v(pg.hit_all[j]),
                        distance=_v(pg.distance[j]),
                        peak_x=round(float(px), 2),
                        peak_y=round(float(py), 2),
                        energy=_v(energy[j]),
                        iou=_v(iou[j]),
                        mask_ratio=_v(ratio[j]) if ratio is not None else None,
                        constant=bool(pg.constant[j]),
                        deletion_auc=_v(dele[j]) if dele is not None else None,
                        insertion_auc=_v(ins[j]) if ins is not None else None,
                        border_energy=_v(e_band[j]),
                        corner_energy=_v(e_corner[j]),
                    )
                )

    # torchrun: rank 0 gathers every rank's rows, in order, and writes; the others return its summary
    rows, hits, classes_seen, n_annotated = distributed.gather_parts((rows, hits, classes_seen, n_annotated))
    if not distributed.is_main():
        return distributed.share_from_main(None)
    out = Path(out) if out else run.run_dir
    csv_path = out / "localization.csv"
    write_csv(csv_path, PER_IMAGE, (_csv_row(r) for r in rows))
    per_image = {m: np.concatenate(v) for m, v in hits.items()}
    agg = loc.aggregate(per_image, classes_seen)
    summary_rows = [[r.method, r.cls, _v(r.mean), r.n, r.n_skipped] for r in agg]
    write_csv(out / "localization_summary.csv", ["method", "class", "pointing_game", "n", "n_skipped"], summary_rows)
    means = _means(rows)
    overall = {r.method: r.mean for r in agg if r.cls == "all"}
    summary = {
        "run": str(run.run_dir),
        "annotations": str(annotations),
        "format": fmt,
        "split": split if labelled else "all",
        "tolerance": tolerance,
        "smooth": smooth,
        "percentile": percentile,
        "border": border,
        "corner": corner,
        "target": str(target),
        "annotation_size": list(ref_size) if ref_size else None,
        "n_images": int(len(indices)),
        "n_annotated": n_annotated,
        "skipped_annotation_rows": [{"row": r, "reason": why} for r, why in annots.skipped],
        "dropped_shapes": [{"image": k, "count": n, "reason": why} for k, (n, why) in annots.dropped.items()],
        "pointing_game": {
            m: {r.cls: {"accuracy": r.mean, "n": r.n, "n_skipped": r.n_skipped} for r in agg if r.method == m}
            for m in names
        },
        "means": means,
    }
    summary_path = out / "localization_summary.json"
    write_json(summary_path, _finite(summary))
    summary_ = LocalizeSummary(
        out, int(len(indices)), n_annotated, tolerance, overall, csv_path, summary_path, list(annots.skipped)
    )
    return distributed.share_from_main(summary_)


def _class_of(run, cached, i: int, labelled: bool, a) -> str:
    if labelled:
        return run.classes[int(cached.labels[i])]
    return a.labels[0] if a is not None and a.labels else "normal"


def _v(t) -> float | None:
    v = float(t)
    return None if math.isnan(v) else round(v, 6)


def _csv_row(r: ImageResult) -> list[Any]:
    # blank = not applicable / skipped; booleans as 0/1 like the hit columns
    return ["" if v is None else int(v) if isinstance(v, bool) else v for v in asdict(r).values()]


def _means(rows: list[ImageResult]) -> dict[str, dict[str, float | None]]:
    """Mean of every score per method, over the images where it applies."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        d = out.setdefault(r.method, {c: [] for c in SCORES})
        for c in SCORES:
            v = getattr(r, c)
            if v is not None and math.isfinite(v):
                d[c].append(float(v))
    return {m: {c: (float(np.mean(v)) if v else None) for c, v in d.items()} for m, d in out.items()}


def check_metric_args(*, tolerance: float, smooth: float, percentile: float) -> None:
    """Settings of the localisation metrics, checked before any model or data is loaded."""
    for name, v in (("tolerance", tolerance), ("smooth", smooth)):
        if not math.isfinite(v) or v < 0:
            raise XraylensError(f"--{name} must be 0 or more (original pixels), got {v}")
    if not 0 <= percentile < 100:
        raise XraylensError(f"--percentile must be in [0, 100), got {percentile}")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def localize_image(
    run: RunLike,
    image: str | Path,
    *,
    annotations: str | Path,
    fmt: str,
    methods: str | Sequence[str] = ("gradcam",),
    layers: Sequence[str] | None = None,
    combine: str | None = None,
    target: str | int = "pred",
    tolerance: float = 15.0,
    smooth: float = 0.0,
    label: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    which: str = "best",
    ref_size: tuple[float, float] | None = None,
) -> list[dict[str, Any]]:
    """One image: pointing game per method, and an overlay PNG with the annotation (green), the peak
    (red cross) and the tolerance disc (red ellipse on the input grid) for each method."""
    from xraylens.explain.engine import CamEngine
    from xraylens.explain.methods import resolve_methods

    method_list = resolve_methods(methods)
    check_metric_args(tolerance=tolerance, smooth=smooth, percentile=50.0)
    annots = ann.read_annotations(annotations, fmt)
    run = open_run(run, which=which, device=device)
    image = Path(image)
    key = ann.match_keys([image.name], annots)[0]
    if key is None:
        raise XraylensError(f"{image.name} is not listed in {annotations}")
    if not image.is_file():
        raise XraylensError(f"image not found: {image}")
    arr, geom = run.inputs.prepare(image)
    x = run.inputs.to_model(torch.from_numpy(arr)[None, None], run.device)
    tgt = parse_target(target, run.classes)
    if tgt == "true":
        raise XraylensError("--target true needs a label; a single image has none: use pred or a class")
    with CamEngine(run.model, list(layers) if layers else None) as engine:
        res = engine(x, method_list, targets=tgt, combine=combine)
    shapes = ann.shapes_on_images([key], annots, [geom], label, ref_size)
    inst = torch.from_numpy(ann.rasterize_batch(shapes, [geom], instances=True)).to(x.device)
    scale = (geom.scale_x, geom.scale_y)
    out = Path(out) if out else run.run_dir / "localize"
    results = []
    prob = class_probabilities(res.logits)[0]
    for m in method_list:
        pg = loc.pointing_game(res.maps[m], instance_masks=inst, tolerance=tolerance, scale=scale, smooth_sigma=smooth)
        r, c = (int(v) for v in pg.peak[0].tolist())
        px, py = geom.to_original(np.array([c + 0.5, r + 0.5]))
        png = out / f"{safe_name(image.stem)}_{safe_name(m)}.png"
        render.save_marked(
            png,
            arr,
            res.maps[m][0, 0].float().cpu().numpy(),
            inst.any(1)[0].cpu().numpy(),
            (r, c),
            (tolerance * geom.scale_x, tolerance * geom.scale_y),
        )
        hit = float(pg.hit[0])
        results.append(
            {
                "image": str(image),
                "method": m,
                "target": run.classes[int(res.targets[0])],
                "probability": float(prob[int(res.targets[0])]),
                "hit": None if math.isnan(hit) else bool(hit),
                "skipped": bool(pg.skipped[0]),
                "distance": float(pg.distance[0]),
                "peak_xy": [round(float(px), 2), round(float(py), 2)],
                "constant": bool(pg.constant[0]),
                "overlay": str(png),
            }
        )
    return results


def parse_size(text: str) -> tuple[float, float]:
    """'1024' or '1024,768' (width, height) -> (w, h)."""
    try:
        parts = [float(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise XraylensError(f"--annotation-size {text!r}: give W,H or one number, e.g. 1024 or 1024,768")
    return (parts[0], parts[-1])
