"""`xraylens localize`: do a run's explanations point at the annotated anatomy?

For every annotated image of a split (or a plain image folder) and every CAM method, beside the
centre-point and uniform-random baselines: pointing game (any / all instances, tolerance in
original pixels), energy pointing game, IoU of the top-percentile map, the CAM-in-mask energy
ratio for mask annotations (e.g. lung masks from `xraylens segment predict`), the share of energy
in an edge band and in the corners (where shortcuts live), and optionally deletion/insertion AUC.
Writes a per-image CSV and a summary (CSV + JSON) of mean accuracy per method and class, as seed
003's batch evaluation does.

Distances are measured in the ORIGINAL image (the peak's sub-pixel position taken back through the
run's crop + resize, to the continuous shapes: `metrics.pointing_game_original`); the model-grid
distance of earlier versions stays in the `distance_grid` column. CheXlocalize's evaluation (Saporta
et al. 2022) runs beside it: hit rate (peak inside a shape, no tolerance) and mIoU of the maps
upsampled to the original image and binarised by Otsu's threshold or per-class thresholds tuned on
another split, with an optional probability cutoff and their two ways of counting images; a second
reader's annotations are scored the same way, with the model's percentage decrease from the reader.
Every figure gets a 95 % percentile bootstrap interval over images (seeded, 1,000 replicates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

import xraylens.distributed as distributed
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
from xraylens.io import finite_json, write_csv, write_json
from xraylens.localize import metrics as loc
from xraylens.localize.faithfulness import deletion_insertion
from xraylens.metrics import BOOTSTRAP_REPS, bootstrap_means, percentile_interval
from xraylens.ops import class_probabilities
from xraylens.runs import RunLike, open_run

BASELINES = ("baseline:center", "baseline:random")
READER2 = "reader2"  # the method name of the second reader's rows
THRESHOLDS = ("otsu", "tuned", "none")


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
    # CheXlocalize: peak inside a shape (no tolerance); IoU of the binarised map on the original image
    hit_rate: float | None = None
    seg_iou: float | None = None
    # the model's probability of the explained class (the probability cutoff reads it)
    probability: float | None = None
    # the distance as measured before on the model-input grid (pixel centre to pixel centre, scaled)
    distance_grid: float | None = None


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
    "hit_rate",
    "seg_iou",
    "distance_grid",
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
    # method -> figure (pointing_game, hit_rate, miou) -> {"value", "ci", "n", "n_skipped"} over all images
    figures: dict[str, dict[str, dict[str, Any] | None]] = field(default_factory=dict)
    # with a second reader: method -> figure -> class -> {"value", "ci"} (percent)
    percentage_decrease: dict[str, Any] | None = None


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
    threshold: str = "otsu",
    tune_on: str = "val",
    prob_cutoff: float = 0.0,
    iou_count: str = "both-nonempty",
    reader2: str | Path | None = None,
    reader2_format: str | None = None,
    bootstrap: int = BOOTSTRAP_REPS,
    randomized_baseline: bool = False,
) -> LocalizeSummary:
    """Localisation metrics of a run's CAMs on annotated images; writes localization*.csv/json to `out`.

    `ref_size` (width, height): the image size the annotation coordinates refer to, when the image
    files were resized after annotation (e.g. NIH boxes drawn at 1024 px on 256 px copies).
    `border` / `corner`: the edge band's width and the corner squares' side, as fractions of the image
    side, for the `border_energy` and `corner_energy` columns.

    CheXlocalize options: `threshold` "otsu" (per map), "tuned" (per method and class, the grid value
    with the best mIoU on split `tune_on` of the same data) or "none" (no segmentation IoU);
    `prob_cutoff`: below this probability of the explained class the predicted mask is empty;
    `iou_count` "both-nonempty" (CheXlocalize's default) or "all"; `reader2`: a second reader's
    annotations (format `reader2_format`, default `fmt`), scored as a method named "reader2";
    `bootstrap`: replicates for the 95 % intervals (0 = none), seeded by `seed`.

    `randomized_baseline`: each method also on a copy of the model with every weight re-initialised
    (`trust.randomize`, seeded by `seed`), explaining the same class, as "randomized:<method>": a lead
    that survives it comes from the architecture (padding, receptive field), not from training."""
    from xraylens.explain.methods import resolve_methods

    method_list = resolve_methods(methods)
    check_positive(batch_size=batch_size, steps=steps)
    check_metric_args(tolerance=tolerance, smooth=smooth, percentile=percentile)
    check_chexlocalize_args(
        threshold=threshold,
        tune_on=tune_on,
        split=split,
        prob_cutoff=prob_cutoff,
        iou_count=iou_count,
        bootstrap=bootstrap,
        reader2=reader2,
        reader2_format=reader2_format,
    )
    loc.border_region(2, 2, border), loc.corner_region(2, 2, corner)  # ranges, before anything is read
    annots = ann.read_annotations(annotations, fmt, skip_bad)
    annots2 = ann.read_annotations(reader2, reader2_format or fmt, skip_bad) if reader2 else None
    run = open_run(run, which=which, device=distributed.setup(device))  # torchrun: this rank's device
    if faithfulness and run.clinical is not None:
        # deletion/insertion batches mix images' perturbed copies; the clinical rows would not follow
        raise XraylensError("--faithfulness is not available for clinically fused runs yet; drop it")
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
    seg = threshold != "none"
    tuned: dict[str, dict[str, float]] | None = None
    if threshold == "tuned":
        if not labelled:
            raise XraylensError(
                f"--threshold tuned needs a dataset with a {tune_on!r} split; {data} is a plain folder "
                "(tuning on the evaluated images would leak): use --threshold otsu"
            )
        tuned = _tune_thresholds(
            run,
            data,
            tune_on,
            annots,
            method_list,
            names,
            layers=layers,
            combine=combine,
            target=target,
            batch_size=batch_size,
            label=label,
            ref_size=ref_size,
            seed=seed,
        )
    rand_model = None
    if randomized_baseline:
        from xraylens.explain.engine import CamEngine
        from xraylens.trust.randomize import randomized_copy

        rand_model = randomized_copy(run.model, seed=seed)
        names += [f"randomized:{m}" for m in method_list]
        if tuned is not None:  # a randomised copy is segmented with its method's tuned thresholds
            tuned.update({f"randomized:{m}": tuned[m] for m in method_list})
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
        shape_kw = _shape_args(shapes, dev)
        offset = torch.tensor([g.crop[:2] for g in geoms], device=dev, dtype=torch.float64)
        prob = class_probabilities(res.logits.float())
        prob = prob[torch.arange(len(idx), device=prob.device), res.targets.clamp(min=0)].cpu().numpy()
        gt = [_original_mask(sh, g) for sh, g in zip(shapes, geoms, strict=True)] if seg or annots2 else []
        b, _, h, w = x.shape
        batch_maps = dict(res.maps)
        batch_maps["baseline:center"] = loc.center_map(b, h, w, device=dev)
        batch_maps["baseline:random"] = loc.random_map(b, h, w, seed=seed + int(idx[0]), device=dev)
        if rand_model is not None:
            with CamEngine(rand_model, list(layers) if layers else None) as rand_engine:
                rres = rand_engine(x, method_list, targets=res.targets, combine=combine)
            batch_maps.update({f"randomized:{m}": rres.maps[m] for m in method_list})
        cls = [_class_of(run, cached, i, labelled, annots.get(keys[i])) for i in idx]
        classes_seen += cls
        n_annotated += int(union.flatten(1).any(1).sum())
        band, corners = loc.border_region(h, w, border, dev), loc.corner_region(h, w, corner, dev)
        for m in names:
            maps = batch_maps[m]
            pg = loc.pointing_game_original(
                maps, **shape_kw, scale=scale, offset=offset, tolerance=tolerance, smooth_sigma=smooth
            )
            pg_grid = loc.pointing_game(
                maps, instance_masks=inst, tolerance=tolerance, scale=scale, smooth_sigma=smooth
            )
            seg_iou = (
                _seg_ious(maps, geoms, gt, prob, cls, prob_cutoff, iou_count, tuned[m] if tuned else None)
                if seg
                else [None] * len(idx)
            )
            energy = loc.energy_pointing_game(maps, masks=union)
            iou = loc.iou_at_percentile(maps, union, percentile)
            ratio = loc.mask_energy_ratio(maps, union).area_normalised if fmt == "masks" else None
            e_band, e_corner = loc.region_energy(maps, band), loc.region_energy(maps, corners)
            dele = ins = None
            if faithfulness and not m.startswith("baseline"):
                dele = deletion_insertion(run.model, x, maps, res.targets, steps=steps, mode="deletion").auc
                ins = deletion_insertion(run.model, x, maps, res.targets, steps=steps, mode="insertion").auc
            hits[m].append(pg.hit.cpu().numpy())
            points = pg.point.cpu().numpy()
            for j, i in enumerate(idx):
                px, py = points[j]  # the sub-pixel peak in original-image (x, y)
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
                        hit_rate=_v(pg.hit_rate[j]),
                        seg_iou=seg_iou[j],
                        probability=round(float(prob[j]), 6),
                        distance_grid=_v(pg_grid.distance[j]),
                    )
                )
        if annots2 is not None:
            keys2 = ann.match_keys([cached.ids[i] for i in idx], annots2)
            shapes2 = ann.shapes_on_images(keys2, annots2, geoms, label, ref_size)
            rows += _reader_rows([cached.ids[i] for i in idx], cls, shapes, shapes2, geoms, gt, tolerance, iou_count)

    # torchrun: rank 0 gathers every rank's rows, in order, and writes; the others return its summary
    rows, hits, classes_seen, n_annotated = distributed.gather_parts((rows, hits, classes_seen, n_annotated))
    if not distributed.is_main():
        return distributed.share_from_main(None)
    out = Path(out) if out else run.run_dir
    csv_path = out / "localization.csv"
    write_csv(csv_path, PER_IMAGE, (_csv_row(r) for r in rows))
    all_names = [*names, READER2] if annots2 is not None else names
    per_method = {m: [r for r in rows if r.method == m] for m in all_names}
    per_image = {m: _column(per_method[m], "hit") for m in all_names}
    agg = loc.aggregate(per_image, classes_seen)
    figures = {
        m: {f: _figure(_column(per_method[m], col), classes_seen, bootstrap, seed) for f, col in FIGURES.items()}
        for m in all_names
    }
    summary_rows = []
    for r in agg:
        cells = [r.method, r.cls, _v(r.mean), r.n, r.n_skipped]
        for f in FIGURES:
            d = figures[r.method][f].get(r.cls) or {}
            ci = d.get("ci") or [None, None]
            cells += ([] if f == "pointing_game" else [_r(d.get("value"))]) + [_r(ci[0]), _r(ci[1])]
            cells += [] if f == "pointing_game" else [d.get("n", 0)]
        summary_rows.append(["" if c is None else c for c in cells])
    write_csv(out / "localization_summary.csv", SUMMARY_COLUMNS, summary_rows)
    means = _means(rows)
    means_ci = {m: _means_ci(per_method[m], bootstrap, seed) for m in all_names}
    overall = {r.method: r.mean for r in agg if r.cls == "all"}
    decrease = (
        {
            m: {
                f: _pct_decrease(
                    _column(per_method[READER2], col), _column(per_method[m], col), classes_seen, bootstrap, seed
                )
                for f, col in FIGURES.items()
            }
            for m in names
        }
        if annots2 is not None
        else None
    )
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
            m: {
                r.cls: {
                    "accuracy": r.mean,
                    "n": r.n,
                    "n_skipped": r.n_skipped,
                    "ci": (figures[m]["pointing_game"].get(r.cls) or {}).get("ci"),
                }
                for r in agg
                if r.method == m
            }
            for m in all_names
        },
        "means": means,
        "means_ci": means_ci,
        "distance_frame": "original image pixels (sub-pixel peak, continuous shapes); distance_grid: model-input grid",
        "chexlocalize": {
            "threshold": threshold,
            "tune_on": tune_on if threshold == "tuned" else None,
            "tuned_thresholds": tuned,
            "prob_cutoff": prob_cutoff,
            "iou_count": iou_count,
            "hit_rate": {m: figures[m]["hit_rate"] for m in all_names},
            "miou": {m: figures[m]["miou"] for m in all_names} if seg else None,
        },
        "reader2": None
        if annots2 is None
        else {"annotations": str(reader2), "format": reader2_format or fmt, "percentage_decrease": decrease},
        "bootstrap": {"method": "percentile, over images", "level": 0.95, "replicates": bootstrap, "seed": seed},
    }
    summary_path = out / "localization_summary.json"
    write_json(summary_path, finite_json(summary))
    summary_ = LocalizeSummary(
        out,
        int(len(indices)),
        n_annotated,
        tolerance,
        overall,
        csv_path,
        summary_path,
        list(annots.skipped),
        {m: {f: figures[m][f].get("all") for f in FIGURES} for m in all_names},
        decrease,
    )
    return distributed.share_from_main(summary_)


# summary figures -> the per-image column they average
FIGURES = {"pointing_game": "hit", "hit_rate": "hit_rate", "miou": "seg_iou"}
SUMMARY_COLUMNS = [
    "method",
    "class",
    "pointing_game",
    "n",
    "n_skipped",
    "pointing_game_ci_low",
    "pointing_game_ci_high",
    "hit_rate",
    "hit_rate_ci_low",
    "hit_rate_ci_high",
    "hit_rate_n",
    "miou",
    "miou_ci_low",
    "miou_ci_high",
    "miou_n",
]


def check_chexlocalize_args(
    *,
    threshold: str,
    tune_on: str,
    split: str,
    prob_cutoff: float,
    iou_count: str,
    bootstrap: int,
    reader2: str | Path | None = None,
    reader2_format: str | None = None,
) -> None:
    """CheXlocalize and bootstrap settings, checked before any model or data is loaded."""
    if threshold not in THRESHOLDS:
        raise XraylensError(f"--threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
    if threshold == "tuned" and tune_on == split:
        raise XraylensError(
            f"--tune-on {tune_on} is the evaluated split: tune the thresholds on another split (e.g. val)"
        )
    if not math.isfinite(prob_cutoff) or not 0.0 <= prob_cutoff <= 1.0:
        raise XraylensError(f"--prob-cutoff must be a probability in [0, 1], got {prob_cutoff}")
    if iou_count not in loc.IOU_COUNTS:
        raise XraylensError(f"--iou-count must be one of {', '.join(loc.IOU_COUNTS)}, got {iou_count!r}")
    if bootstrap < 0:
        raise XraylensError(f"--bootstrap must be 0 (no intervals) or more replicates, got {bootstrap}")
    if reader2_format is not None and reader2_format not in ann.FORMATS:
        raise XraylensError(f"--reader2-format {reader2_format!r}: use one of {', '.join(ann.FORMATS)}")
    if reader2_format is not None and reader2 is None:
        raise XraylensError("--reader2-format needs --reader2 FILE (the second reader's annotations)")
    if reader2 is not None and not Path(reader2).exists():
        raise XraylensError(f"--reader2 annotations not found: {reader2}")


def _shape_args(shapes: list[list[ann.Shape]], dev: torch.device) -> dict[str, Any]:
    """Rectangles only: the batched box path of `pointing_game_original`; other shapes one by one."""
    if all(isinstance(s, ann.Rectangle) for per in shapes for s in per):
        k = max([len(p) for p in shapes] + [1])
        boxes = np.full((len(shapes), k, 4), np.nan)
        for i, per in enumerate(shapes):
            for j, s in enumerate(per):
                boxes[i, j] = s.bbox
        return {"boxes": torch.from_numpy(boxes).to(dev)}
    return {"shapes": shapes}


def _original_mask(shapes: list[ann.Shape], g) -> np.ndarray:
    """Union of the shapes as a bool mask on the original image (pixel-centre rule at full size)."""
    from xraylens.data.records import Geometry

    ident = Geometry(g.orig_h, g.orig_w, (0.0, 0.0, float(g.orig_w), float(g.orig_h)), g.orig_h, g.orig_w)
    return ann.rasterize(shapes, ident)


def _seg_ious(
    maps: torch.Tensor,
    geoms: list,
    gt: list[np.ndarray],
    prob: np.ndarray,
    cls: list[str],
    prob_cutoff: float,
    iou_count: str,
    thresholds: dict[str, float] | None,
) -> list[float | None]:
    """CheXlocalize IoU per image: map -> original image -> normalised -> Otsu or the class's tuned
    threshold; empty below the probability cutoff."""
    out: list[float | None] = []
    for j, g in enumerate(geoms):
        if prob[j] < prob_cutoff:
            pred = np.zeros_like(gt[j])
        else:
            t = None if thresholds is None else thresholds.get(cls[j], thresholds.get("all", 0.5))
            pred = loc.segment_map(loc.normalise01(loc.map_to_original(maps[j], g).cpu().numpy()), t)
        v = loc.mask_iou(pred, gt[j], iou_count)
        out.append(None if math.isnan(v) else round(v, 6))
    return out


def _tune_thresholds(
    run,
    data,
    tune_on: str,
    annots: ann.AnnotationSet,
    method_list: list[str],
    names: list[str],
    *,
    layers,
    combine,
    target,
    batch_size: int,
    label: str | None,
    ref_size,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Per method and class, CheXlocalize's tuned threshold: the value of `loc.TUNE_GRID` with the best
    mIoU (both masks non-empty, as their tuning script) on split `tune_on`; "all" for unseen classes."""
    source, cached = run.load_split(data, tune_on)
    keys = ann.match_keys(cached.ids, annots)
    indices = np.array([i for i, k in enumerate(keys) if k is not None], dtype=np.int64)
    if len(indices) == 0:
        raise XraylensError(f"--tune-on {tune_on}: none of its {len(keys)} images appear in the annotations")
    ious: dict[str, list[np.ndarray]] = {m: [] for m in names}
    classes: list[str] = []
    for idx, x, res in iter_cams(
        run,
        cached,
        indices,
        method_list,
        layers=list(layers) if layers else None,
        combine=combine,
        target=target,
        batch_size=batch_size,
    ):
        geoms = [cached.geometry[i] for i in idx]
        shapes = ann.shapes_on_images([keys[i] for i in idx], annots, geoms, label, ref_size)
        gt = [_original_mask(sh, g) for sh, g in zip(shapes, geoms, strict=True)]
        b, _, h, w = x.shape
        batch_maps = dict(res.maps)
        batch_maps["baseline:center"] = loc.center_map(b, h, w, device=x.device)
        batch_maps["baseline:random"] = loc.random_map(b, h, w, seed=seed + 7919 + int(idx[0]), device=x.device)
        classes += [_class_of(run, cached, i, True, annots.get(keys[i])) for i in idx]
        for m in names:
            for j, g in enumerate(geoms):
                norm = loc.normalise01(loc.map_to_original(batch_maps[m][j], g).cpu().numpy())
                ious[m].append(loc.ious_at_thresholds(norm, gt[j]))
    return {m: {**loc.tune_thresholds(v, classes), **loc.tune_thresholds(v, ["all"] * len(v))} for m, v in ious.items()}


def _reader_rows(
    ids: list[str],
    cls: list[str],
    shapes: list[list[ann.Shape]],
    shapes2: list[list[ann.Shape]],
    geoms: list,
    gt: list[np.ndarray],
    tolerance: float,
    iou_count: str,
) -> list[ImageResult]:
    """The second reader scored like a method: its most representative point (deepest inside its mask)
    for the pointing game and hit rate, its mask for the IoU. No shape from the reader on an annotated
    image is a miss (CheXlocalize's human benchmark without a point)."""
    out = []
    for j, g in enumerate(geoms):
        mask2 = _original_mask(shapes2[j], g)
        pt = loc.representative_point(mask2)
        has = bool(shapes[j])
        d = min((loc.shape_distance(s, *pt) for s in shapes[j]), default=math.inf) if pt and has else math.inf
        hit = (1.0 if d <= tolerance + 1e-9 else 0.0) if has else None
        rate = (1.0 if d == 0 else 0.0) if has else None
        iou = loc.mask_iou(mask2, gt[j], iou_count)
        out.append(
            ImageResult(
                image=ids[j],
                cls=cls[j],
                method=READER2,
                hit=hit,
                hit_all=None,
                distance=round(d, 6) if has and math.isfinite(d) else None,
                peak_x=round(pt[0], 2) if pt else math.nan,
                peak_y=round(pt[1], 2) if pt else math.nan,
                energy=None,
                iou=None,
                mask_ratio=None,
                constant=pt is None,
                hit_rate=rate,
                seg_iou=None if math.isnan(iou) else round(iou, 6),
            )
        )
    return out


def _column(rows: list[ImageResult], name: str) -> np.ndarray:
    """One score per image (NaN = does not count) in row order."""
    return np.array([math.nan if getattr(r, name) is None else float(getattr(r, name)) for r in rows])


def _r(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def _figure(vals: np.ndarray, classes: list[str], reps: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per class and "all": NaN-skipping mean, its bootstrap interval (None when reps is 0 or nothing
    counts), images counted and not counted."""
    labels = np.asarray(classes, dtype=object)
    out = {}
    for c in [*sorted(set(classes)), "all"]:
        v = vals if c == "all" else vals[labels == c]
        ok = np.isfinite(v)
        ci = percentile_interval(bootstrap_means(v, reps=reps, seed=seed)) if reps and ok.any() else None
        out[c] = {
            "value": float(v[ok].mean()) if ok.any() else None,
            "ci": ci,
            "n": int(ok.sum()),
            "n_skipped": int((~ok).sum()),
        }
    return out


def _means_ci(rows: list[ImageResult], reps: int, seed: int) -> dict[str, list[float] | None]:
    """Bootstrap interval of every score's mean for one method (one resampling for all its scores)."""
    if not reps or not rows:
        return dict.fromkeys(SCORES)
    table = np.stack([_column(rows, c) for c in SCORES])
    stats = bootstrap_means(table, reps=reps, seed=seed)
    return {c: percentile_interval(stats[i]) for i, c in enumerate(SCORES)}


def _pct_decrease(
    reader: np.ndarray, model: np.ndarray, classes: list[str], reps: int, seed: int
) -> dict[str, dict[str, Any]]:
    """The model's percentage decrease from the reader, 100 (reader - model) / reader, per class and
    "all", with a paired bootstrap interval (the same resampled images for both; CheXlocalize's
    calculate_percentage_decrease)."""
    labels = np.asarray(classes, dtype=object)
    out = {}
    for c in [*sorted(set(classes)), "all"]:
        sel = slice(None) if c == "all" else labels == c
        r, m = reader[sel], model[sel]
        rm, mm = (float(np.nanmean(a)) if np.isfinite(a).any() else math.nan for a in (r, m))
        value = 100.0 * (rm - mm) / rm if rm and math.isfinite(rm) and math.isfinite(mm) else None
        ci = None
        if reps and value is not None:
            st = bootstrap_means(np.stack([r, m]), reps=reps, seed=seed)
            with np.errstate(divide="ignore", invalid="ignore"):
                ci = percentile_interval(100.0 * (st[0] - st[1]) / st[0])
        out[c] = {
            "value": value,
            "ci": ci,
            "reader": None if math.isnan(rm) else rm,
            "model": None if math.isnan(mm) else mm,
        }
    return out


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
        pg = loc.pointing_game_original(
            res.maps[m],
            **_shape_args(shapes, x.device),
            scale=scale,
            offset=geom.crop[:2],
            tolerance=tolerance,
            smooth_sigma=smooth,
        )  # measured in the original image, like localize_run
        r, c = (int(v) for v in pg.peak[0].tolist())
        px, py = (float(v) for v in pg.point[0].tolist())
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
                "hit_rate": None if math.isnan(float(pg.hit_rate[0])) else bool(pg.hit_rate[0]),
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
