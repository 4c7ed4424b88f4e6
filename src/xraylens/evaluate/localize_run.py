"""`xraylens localize`: do a run's explanations point at the annotated anatomy?

For every annotated image of a split (or a plain image folder) and every CAM method, beside the
centre-point and uniform-random baselines: pointing game (any / all instances, tolerance in
original pixels), energy pointing game, IoU of the top-percentile map, the CAM-in-mask energy
ratio for mask annotations, and optionally deletion/insertion AUC. Writes a per-image CSV and
a summary (CSV + JSON) of mean accuracy per method and class, as seed 003's batch evaluation does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xraylens.data import annotations as ann
from xraylens.errors import XraylensError
from xraylens.evaluate import localization as loc
from xraylens.io import write_csv, write_json

FORMATS = ("object-cxr", "nih", "coco", "masks")
BASELINES = ("baseline:center", "baseline:random")
PER_IMAGE = ["image", "class", "method", "hit", "hit_all", "distance", "peak_x", "peak_y", "energy", "iou",
             "mask_ratio", "constant", "deletion_auc", "insertion_auc"]


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


def read_annotations(path: str | Path, fmt: str, skip_bad: bool = False) -> ann.AnnotationSet:
    readers = {"object-cxr": ann.read_object_cxr, "nih": ann.read_nih, "coco": ann.read_coco,
               "masks": ann.read_mask_folder}
    if fmt not in readers:
        raise XraylensError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not Path(path).exists():
        raise XraylensError(f"annotations not found: {path}")
    return readers[fmt](path, skip_bad=skip_bad)


def match_keys(ids: Sequence[str], annotations: dict[str, Any]) -> list[str | None]:
    """The annotation key of each image id: the id itself (relative path), else its file name, else its
    file name without extension (images re-encoded as PNG), each only when unique among the keys."""
    by_name: dict[str, list[str]] = {}
    by_stem: dict[str, list[str]] = {}
    for k in annotations:
        by_name.setdefault(Path(k).name, []).append(k)
        by_stem.setdefault(Path(k).stem.lower(), []).append(k)
    out: list[str | None] = []
    for i in ids:
        if i in annotations:
            out.append(i)
            continue
        cands = by_name.get(Path(i).name) or by_stem.get(Path(i).stem.lower(), [])
        out.append(cands[0] if len(cands) == 1 else None)
    return out


def shapes_for(keys: Sequence[str], annots: ann.AnnotationSet, geoms: Sequence[Any], label: str | None,
               ref_size: tuple[float, float] | None) -> list[list[Any]]:
    """Shapes per image, moved from the frame they were drawn in (`ref_size`, else the annotation's own
    declared size, else the file itself) onto the decoded image the geometry starts from."""
    out = []
    for key, shapes, g in zip(keys, ann.annotations_for(keys, annots, label=label), geoms, strict=True):
        frame = ref_size or annots[key].size
        out.append(ann.rescale_shapes(shapes, frame, (g.orig_w, g.orig_h)) if frame else shapes)
    return out


def localize_run(run_dir: str | Path, *, annotations: str | Path, fmt: str, data: str | Path | None = None,
                 split: str = "test", methods: str | Sequence[str] = ("gradcam",), layers: Sequence[str] | None = None,
                 combine: str | None = None, target: str | int = "pred", tolerance: float = 15.0,
                 smooth: float = 0.0, percentile: float = 90.0, label: str | None = None,
                 faithfulness: bool = False, steps: int = 20, skip_bad: bool = False, out: str | Path | None = None,
                 device: str = "auto", batch_size: int = 16, which: str = "best", seed: int = 0,
                 ref_size: tuple[float, float] | None = None) -> LocalizeSummary:
    """Localisation metrics of a run's CAMs on annotated images; writes localization*.csv/json to `out`.

    `ref_size` (width, height): the image size the annotation coordinates refer to, when the image
    files were resized after annotation (e.g. NIH boxes drawn at 1024 px on 256 px copies)."""
    from xraylens.evaluate.faithfulness import deletion_insertion
    from xraylens.evaluate.run import load_run_split
    from xraylens.explain.run import check_target, iter_cams, parse_methods
    from xraylens.train.checkpoint import load_run

    run = load_run(run_dir, which=which, device=device)
    method_list = parse_methods(methods)
    annots = read_annotations(annotations, fmt, skip_bad)
    source, cached = load_run_split(run, data, split)
    labelled = source.kind != "images"
    check_target(target, labelled)
    keys = match_keys(cached.ids, annots)
    indices = np.array([i for i, k in enumerate(keys) if k is not None], dtype=np.int64)
    if len(indices) == 0:
        raise XraylensError(f"none of the {len(keys)} images (e.g. {cached.ids[0]!r}) appear in {annotations} "
                            f"(keys like {next(iter(annots), '?')!r}); check --data/--split and the file")

    names = [*method_list, *BASELINES]
    rows: list[list[Any]] = []
    hits: dict[str, list[np.ndarray]] = {m: [] for m in names}
    classes_seen: list[str] = []
    n_annotated = 0
    for idx, x, res in iter_cams(run, cached, indices, method_list, layers=list(layers) if layers else None,
                                 combine=combine, target=target, batch_size=batch_size):
        dev = x.device
        geoms = [cached.geometry[i] for i in idx]
        shapes = shapes_for([keys[i] for i in idx], annots, geoms, label, ref_size)
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
        for m in names:
            maps = batch_maps[m]
            pg = loc.pointing_game(maps, instance_masks=inst, tolerance=tolerance, scale=scale, smooth_sigma=smooth)
            energy = loc.energy_pointing_game(maps, masks=union)
            iou = loc.iou_at_percentile(maps, union, percentile)
            ratio = loc.mask_energy_ratio(maps, union).area_normalised if fmt == "masks" else None
            dele = ins = None
            if faithfulness and not m.startswith("baseline"):
                dele = deletion_insertion(run.model, x, maps, res.targets, steps=steps, mode="deletion").auc
                ins = deletion_insertion(run.model, x, maps, res.targets, steps=steps, mode="insertion").auc
            hits[m].append(pg.hit.cpu().numpy())
            peaks = pg.peak.cpu().numpy()
            for j, i in enumerate(idx):
                # peak pixel centre (col + .5, row + .5) back to original-image (x, y)
                px, py = geoms[j].to_original(np.array([peaks[j, 1] + 0.5, peaks[j, 0] + 0.5]))
                rows.append([cached.ids[i], cls[j], m, _v(pg.hit[j]), _v(pg.hit_all[j]), _v(pg.distance[j]),
                             round(float(px), 2), round(float(py), 2), _v(energy[j]), _v(iou[j]),
                             _v(ratio[j]) if ratio is not None else "", int(pg.constant[j]),
                             _v(dele[j]) if dele is not None else "", _v(ins[j]) if ins is not None else ""])

    out = Path(out) if out else run.run_dir
    csv_path = out / "localization.csv"
    write_csv(csv_path, PER_IMAGE, rows)
    per_image = {m: np.concatenate(v) for m, v in hits.items()}
    agg = loc.aggregate(per_image, classes_seen)
    summary_rows = [[r.method, r.cls, _v(r.mean), r.n, r.n_skipped] for r in agg]
    write_csv(out / "localization_summary.csv", ["method", "class", "pointing_game", "n", "n_skipped"], summary_rows)
    means = _means(rows)
    overall = {r.method: r.mean for r in agg if r.cls == "all"}
    summary = {
        "run": str(run.run_dir), "annotations": str(annotations), "format": fmt, "split": split if labelled else "all",
        "tolerance": tolerance, "smooth": smooth, "percentile": percentile, "target": str(target),
        "annotation_size": list(ref_size) if ref_size else None,
        "n_images": int(len(indices)), "n_annotated": n_annotated,
        "skipped_annotation_rows": [{"row": r, "reason": why} for r, why in annots.skipped],
        "pointing_game": {m: {r.cls: {"accuracy": r.mean, "n": r.n, "n_skipped": r.n_skipped}
                              for r in agg if r.method == m} for m in names},
        "means": means,
    }
    summary_path = out / "localization_summary.json"
    write_json(summary_path, _finite(summary))
    return LocalizeSummary(out, int(len(indices)), n_annotated, tolerance, overall, csv_path, summary_path,
                           list(annots.skipped))


def _class_of(run, cached, i: int, labelled: bool, a) -> str:
    if labelled:
        return run.classes[int(cached.labels[i])]
    return a.labels[0] if a is not None and a.labels else "normal"


def _v(t) -> float | str:
    v = float(t)
    return "" if math.isnan(v) else round(v, 6)


def _means(rows: list[list[Any]]) -> dict[str, dict[str, float | None]]:
    """Mean of every numeric per-image column, per method (blank = not applicable / skipped)."""
    cols = ["hit", "hit_all", "distance", "energy", "iou", "mask_ratio", "deletion_auc", "insertion_auc"]
    out: dict[str, dict[str, float | None]] = {}
    for r in rows:
        d = out.setdefault(r[2], {c: [] for c in cols})
        for c in cols:
            v = r[PER_IMAGE.index(c)]
            if v != "" and math.isfinite(float(v)):
                d[c].append(float(v))
    return {m: {c: (float(np.mean(v)) if v else None) for c, v in d.items()} for m, d in out.items()}


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def localize_image(run_dir: str | Path, image: str | Path, *, annotations: str | Path, fmt: str,
                   methods: str | Sequence[str] = ("gradcam",), layers: Sequence[str] | None = None,
                   combine: str | None = None, target: str | int = "pred", tolerance: float = 15.0,
                   smooth: float = 0.0, label: str | None = None, out: str | Path | None = None,
                   device: str = "auto", which: str = "best",
                   ref_size: tuple[float, float] | None = None) -> list[dict[str, Any]]:
    """One image: pointing game per method, and an overlay PNG with the annotation (green), the peak
    (red cross) and the tolerance disc (red ellipse on the input grid) for each method."""
    from xraylens.data.cache import prepare_image
    from xraylens.data.loader import to_model_input
    from xraylens.evaluate.predict import input_kwargs
    from xraylens.explain.engine import CamEngine
    from xraylens.explain.run import _safe, parse_methods, parse_target
    from xraylens.train.checkpoint import load_run

    run = load_run(run_dir, which=which, device=device)
    method_list = parse_methods(methods)
    annots = read_annotations(annotations, fmt)
    image = Path(image)
    key = match_keys([image.name], annots)[0]
    if key is None:
        raise XraylensError(f"{image.name} is not listed in {annotations}")
    cfg = run.config
    arr, geom = prepare_image(image, cfg.data.image_size, cfg.data.center_crop)
    x = to_model_input(torch.from_numpy(arr)[None, None], device=run.device, **input_kwargs(cfg))
    tgt = parse_target(target, run.classes)
    if tgt == "true":
        raise XraylensError("--target true needs a label; a single image has none: use pred or a class")
    with CamEngine(run.model, list(layers) if layers else None) as engine:
        res = engine(x, method_list, targets=tgt, combine=combine)
    shapes = shapes_for([key], annots, [geom], label, ref_size)
    inst = torch.from_numpy(ann.rasterize_batch(shapes, [geom], instances=True)).to(x.device)
    scale = (geom.scale_x, geom.scale_y)
    out = Path(out) if out else run.run_dir / "localize"
    results = []
    prob = torch.softmax(res.logits.float(), 1)[0]
    for m in method_list:
        pg = loc.pointing_game(res.maps[m], instance_masks=inst, tolerance=tolerance, scale=scale,
                               smooth_sigma=smooth)
        r, c = (int(v) for v in pg.peak[0].tolist())
        px, py = geom.to_original(np.array([c + 0.5, r + 0.5]))
        png = out / f"{_safe(image.stem)}_{_safe(m)}.png"
        _save_marked(png, arr, res.maps[m][0, 0].float().cpu().numpy(), inst.any(1)[0].cpu().numpy(), (r, c),
                     (tolerance * geom.scale_x, tolerance * geom.scale_y))
        hit = float(pg.hit[0])
        results.append({"image": str(image), "method": m, "target": run.classes[int(res.targets[0])],
                        "probability": float(prob[int(res.targets[0])]),
                        "hit": None if math.isnan(hit) else bool(hit), "skipped": bool(pg.skipped[0]),
                        "distance": float(pg.distance[0]), "peak_xy": [round(float(px), 2), round(float(py), 2)],
                        "constant": bool(pg.constant[0]), "overlay": str(png)})
    return results


def _save_marked(path: Path, grey: np.ndarray, cam: np.ndarray, mask: np.ndarray, peak: tuple[int, int],
                 radius_xy: tuple[float, float], min_side: int = 320) -> None:
    from PIL import Image, ImageDraw

    from xraylens.explain.render import overlay, save_png

    rgb = overlay(grey, cam)
    edge = mask & ~_erode(mask)
    rgb[edge] = (0, 255, 0)
    zoom = max(1, int(math.ceil(min_side / max(rgb.shape[:2]))))
    img = Image.fromarray(rgb).resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.NEAREST)
    d = ImageDraw.Draw(img)
    cy, cx = (peak[0] + 0.5) * zoom, (peak[1] + 0.5) * zoom
    k = 3 * zoom
    d.line([(cx - k, cy), (cx + k, cy)], fill=(255, 0, 0), width=2)
    d.line([(cx, cy - k), (cx, cy + k)], fill=(255, 0, 0), width=2)
    rx, ry = radius_xy[0] * zoom, radius_xy[1] * zoom
    if rx > 0 and ry > 0:
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=(255, 0, 0), width=1)
    save_png(path, np.asarray(img))


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, constant_values=False)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def parse_size(text: str) -> tuple[float, float]:
    """'1024' or '1024,768' (width, height) -> (w, h)."""
    try:
        parts = [float(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise XraylensError(f"--annotation-size {text!r}: give W,H or one number, e.g. 1024 or 1024,768")
    return (parts[0], parts[-1])
