"""`xraylens audit`: is the model right for the wrong reasons? A shortcut audit of a run on a split.

Two kinds of evidence per region where shortcuts live — the edge band (collimation, the void around
the body), each corner (burned-in letters, markers, text) — and the lungs when masks are given:

* **where the CAM puts its energy**: the share of positive CAM energy in the region, beside the
  region's share of the image's area (what a uniform map scores). Uses `localize.metrics`
  (`border_region`, `corner_region`, `region_energy`, `mask_energy_ratio`).
* **what the model does without it** (occlusion counterfactuals): the region is blanked — filled
  with its own per-image median, so the blank adds no edge of its own and a bright marker on a dark
  corner vanishes — and the prediction re-run: flip rate (arg-max changes) and mean change of the
  originally predicted class's probability. Each region has a **control**: a square of the same area
  at a seeded random position inside the image's central part (clear of the edge band), blanked
  the same way. Lungs are compared with the border band instead: a model that reads the lungs
  moves more when they go than when the edge goes.

Verdict, thresholds stated in the output: a region is **flagged** when blanking it flips at least
`flip_margin` (default 0.10) more of the predictions than blanking its control and the 95 % paired
bootstrap interval of that difference (`xraylens.metrics`) excludes 0 (a margin met on too few images
is a WARN: "audit more images"); its energy is
**high** when its mean share is at least `energy_factor` (default 2) times its area share. SHORTCUT
when a border or corner region is flagged; WARN when only the energy is high (or the lungs move the
model less than the border); OK otherwise. Everything runs batched on the run's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xraylens.data import annotations as ann
from xraylens.data.cache import resolve_size
from xraylens.errors import XraylensError
from xraylens.explain.engine import CamEngine
from xraylens.explain.methods import resolve_methods
from xraylens.explain.run import check_cam_settings, check_positive, pick_indices
from xraylens.io import finite_json, write_csv, write_json
from xraylens.localize import metrics as loc
from xraylens.metrics import bootstrap_means, percentile_interval
from xraylens.models.fusion import bind_clinical, clinical_batch
from xraylens.ops import class_probabilities
from xraylens.runs import RunLike, open_run

CORNERS = ("corner_tl", "corner_tr", "corner_bl", "corner_br")
DEFAULT_FLIP_MARGIN = 0.10
# Grad-CAM beside LayerCAM: on the planted marker, Grad-CAM's channel-averaged gradients can leave the
# marker dark while blanking it flips half the predictions; LayerCAM's per-position weights show it
DEFAULT_METHODS = ("gradcam", "layercam")
DEFAULT_ENERGY_FACTOR = 2.0
CSV_COLUMNS = [
    "class", "region", "area", "n", "flip_rate", "score_change", "control_flip_rate", "control_score_change",
    "flip_gap_ci_low", "flip_gap_ci_high", "accuracy_blanked",
]  # fmt: skip
# then per method: energy_<method> (all images) and energy_flipped_<method> (images the blank flips)


@dataclass
class AuditSummary:
    out: Path
    n_images: int
    verdict: str
    evidence: list[str]
    report: dict[str, Any]
    csv_path: Path
    json_path: Path

    def table(self) -> str:
        return format_table(self.report)


def _fill_median(x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """x [B,C,H,W] with `region` (bool [B,H,W] or [H,W]) set to each image's own per-channel median
    inside the region; an image whose region is empty is returned unchanged."""
    b, c, h, w = x.shape
    r = region.expand(b, h, w) if region.dim() == 2 else region
    r = r[:, None].expand(b, c, h, w)
    vals = torch.where(r, x, torch.full_like(x, math.nan)).flatten(2)
    med = torch.nanmedian(vals, dim=2).values  # [B, C]; NaN where the region is empty
    med = torch.nan_to_num(med, nan=0.0)[:, :, None, None].expand_as(x)
    return torch.where(r, med, x)


def _square(h: int, w: int, side_h: int, side_w: int, top: int, left: int, device) -> torch.Tensor:
    r = torch.zeros(h, w, dtype=torch.bool, device=device)
    r[top : top + side_h, left : left + side_w] = True
    return r


def _control(h: int, w: int, area: int, border: float, rng: np.random.Generator, device) -> torch.Tensor:
    """A square of `area` pixels (as near as whole pixels allow) at a random position inside the
    central part of the image (clear of the edge band where it fits)."""
    side = max(1, min(h, w, round(math.sqrt(area))))
    bh, bw = max(1, round(border * h)), max(1, round(border * w))
    lo_r, hi_r = (bh, h - bh - side) if h - 2 * bh >= side else (0, h - side)
    lo_c, hi_c = (bw, w - bw - side) if w - 2 * bw >= side else (0, w - side)
    return _square(h, w, side, side, int(rng.integers(lo_r, hi_r + 1)), int(rng.integers(lo_c, hi_c + 1)), device)


def _corner(h: int, w: int, size: float, which: str, device) -> torch.Tensor:
    loc.corner_region(2, 2, size)  # the range check of --corner
    ch, cw = max(1, round(size * h)), max(1, round(size * w))
    top = 0 if which in ("corner_tl", "corner_tr") else h - ch
    left = 0 if which in ("corner_tl", "corner_bl") else w - cw
    return _square(h, w, ch, cw, top, left, device)


@torch.no_grad()
def _predict(model, x: torch.Tensor) -> torch.Tensor:
    return class_probabilities(model(x)).float()


def audit_run(
    run: RunLike,
    *,
    data: str | Path | None = None,
    split: str = "test",
    methods: str | Sequence[str] = DEFAULT_METHODS,
    layers: Sequence[str] | None = None,
    combine: str | None = None,
    masks: str | Path | None = None,
    limit: int | None = None,
    border: float = 0.1,
    corner: float = 0.15,
    flip_margin: float = DEFAULT_FLIP_MARGIN,
    energy_factor: float = DEFAULT_ENERGY_FACTOR,
    seed: int = 0,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 32,
    which: str = "best",
) -> AuditSummary:
    """Audit a run on a split; writes audit.json and audit.csv to `out` (default RUN/audit)."""
    method_list = resolve_methods(methods)
    check_positive(batch_size=batch_size, limit=limit)
    loc.border_region(2, 2, border), loc.corner_region(2, 2, corner)  # ranges, before anything is read
    if not (math.isfinite(flip_margin) and 0 <= flip_margin <= 1):
        raise XraylensError(f"--flip-margin must be in [0, 1] (a difference of flip rates), got {flip_margin}")
    if not (math.isfinite(energy_factor) and energy_factor > 0):
        raise XraylensError(f"--energy-factor must be above 0 (a multiple of the area share), got {energy_factor}")
    lungs = ann.read_annotations(masks, "masks") if masks is not None else None
    run = open_run(run, which=which, device=device)
    check_cam_settings(run, layers, combine, "logit", "pred", data)
    source, cached = run.load_split(data, split)
    labelled = source.kind != "images"
    indices = pick_indices(len(cached.images), limit)
    keys = ann.match_keys(cached.ids, lungs) if lungs is not None else [None] * len(cached.ids)
    if lungs is not None and not any(keys[i] is not None for i in indices):
        raise XraylensError(f"none of the images (e.g. {cached.ids[0]!r}) has a mask in {masks}; check --masks")

    h, w = resolve_size(run.config.data.image_size)  # non-square inputs too
    dev = run.device
    regions = {"border": loc.border_region(h, w, border, dev)} | {c: _corner(h, w, corner, c, dev) for c in CORNERS}
    rng = np.random.default_rng(seed)
    names = [*regions, *(("lungs",) if lungs is not None else ())]
    # per image: flips / score changes per region and its control; energies per method and region
    rec: dict[str, list[np.ndarray]] = {k: [] for k in ("label", "pred", "has_lungs", "lung_area")}
    for r in names:
        for k in ("flip", "dscore", "cflip", "cdscore", "correct"):
            rec[f"{r}:{k}"] = []
    for m in method_list:
        for r in names:
            rec[f"{m}:{r}:energy"] = []
    with CamEngine(run.model, list(layers) if layers else None) as engine:
        for lo in range(0, len(indices), batch_size):
            idx = indices[lo : lo + batch_size]
            x = run.inputs.to_model(torch.from_numpy(cached.images[idx])[:, None], dev)
            # a fused run's clinical rows stay bound for the batch: its maps and blanked predictions alike
            z = clinical_batch(cached.clinical, idx, dev)
            with bind_clinical(run.model, z):
                b = x.shape[0]
                res = engine(x, method_list, targets="pred", combine=combine)
                p0 = class_probabilities(res.logits).float()
                pred = p0.argmax(1)
                labels = torch.from_numpy(cached.labels[idx]).to(dev) if labelled else pred
                batch_regions = dict(regions)
                has = torch.zeros(b, dtype=torch.bool, device=dev)
                if lungs is not None:
                    geoms = [cached.geometry[i] for i in idx]
                    shapes = ann.shapes_on_images([keys[i] for i in idx], lungs, geoms, None, None)
                    lm = torch.from_numpy(ann.rasterize_batch(shapes, geoms)).to(dev)[:, 0].bool()
                    has = lm.flatten(1).any(1)
                    batch_regions["lungs"] = lm
                    rec["lung_area"].append(lm.flatten(1).float().mean(1).cpu().numpy())
                for r, region in batch_regions.items():
                    p1 = _predict(run.model, _fill_median(x, region))
                    if r == "lungs":  # compared with the border band, see the module docstring
                        ctrl = regions["border"]
                    else:
                        ctrl = _control(h, w, int(region.sum()), border, rng, dev)
                    p2 = _predict(run.model, _fill_median(x, ctrl))
                    # the change of the originally predicted class's probability
                    s0, s1, s2 = (p.gather(1, pred[:, None])[:, 0] for p in (p0, p1, p2))
                    rec[f"{r}:flip"].append((p1.argmax(1) != pred).cpu().numpy())
                    rec[f"{r}:dscore"].append((s1 - s0).cpu().numpy())
                    rec[f"{r}:cflip"].append((p2.argmax(1) != pred).cpu().numpy())
                    rec[f"{r}:cdscore"].append((s2 - s0).cpu().numpy())
                    rec[f"{r}:correct"].append((p1.argmax(1) == labels).cpu().numpy())
                    for m in method_list:
                        if r == "lungs":
                            e = loc.mask_energy_ratio(res.maps[m], lm[:, None]).energy_fraction
                        else:
                            e = loc.region_energy(res.maps[m], region)
                        rec[f"{m}:{r}:energy"].append(e.cpu().numpy())
                rec["label"].append(labels.cpu().numpy())
                rec["pred"].append(pred.cpu().numpy())
                rec["has_lungs"].append(has.cpu().numpy())
    arr = {k: np.concatenate(v) if v else np.zeros(0) for k, v in rec.items()}
    areas = {r: float(t.float().mean()) for r, t in regions.items()}
    if lungs is not None:
        areas["lungs"] = float(np.mean(arr["lung_area"][arr["has_lungs"]])) if arr["has_lungs"].any() else math.nan
    report = _report(run, arr, names, method_list, areas, labelled, flip_margin, energy_factor)
    report.update(
        run=str(run.run_dir), data=str(data) if data else str(run.data_path), split=split if labelled else "all",
        masks=str(masks) if masks else None, border=border, corner=corner, seed=seed,
        fill="each region filled with its own per-image, per-channel median (model-input space)",
        control="same-area square at a seeded random position clear of the edge band; lungs: the border band",
    )  # fmt: skip
    out = Path(out) if out else run.run_dir / "audit"
    csv_path, json_path = out / "audit.csv", out / "audit.json"
    energy_cols = [f"energy_{m}" for m in method_list] + [f"energy_flipped_{m}" for m in method_list]
    write_csv(csv_path, CSV_COLUMNS + energy_cols, _csv_rows(report, method_list))
    write_json(json_path, finite_json(report))
    return AuditSummary(out, len(indices), report["verdict"], report["evidence"], report, csv_path, json_path)


def high_energy(area: float, factor: float) -> float:
    """The energy share called high for a region of `area` (share of the image): `factor` x area, but at
    most halfway between the area and 1, so a large region (the edge band) can still be called high."""
    return min(factor * area, (1.0 + area) / 2.0)


def _report(run, arr, names, methods, areas, labelled, flip_margin, energy_factor) -> dict[str, Any]:
    classes = run.classes
    groups: dict[str, np.ndarray] = {"all": np.ones(len(arr["pred"]), dtype=bool)}
    for k, c in enumerate(classes):
        groups[c] = arr["label"] == k
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for g, sel in groups.items():
        table[g] = {}
        for r in names:
            s = sel & arr["has_lungs"] if r == "lungs" else sel
            mean = lambda k, s=s, r=r: float(np.mean(arr[f"{r}:{k}"][s])) if s.any() else math.nan  # noqa: E731
            row = {
                "area": areas[r],
                "n": int(s.sum()),
                "flip_rate": mean("flip"),
                "score_change": mean("dscore"),
                "control_flip_rate": mean("cflip"),
                "control_score_change": mean("cdscore"),
                # 95 % paired bootstrap interval of flip_rate - control_flip_rate over the same images
                "flip_gap_ci": _gap_ci(arr[f"{r}:flip"][s], arr[f"{r}:cflip"][s]),
                "accuracy_blanked": mean("correct") if labelled else None,
                "energy": {m: (float(np.mean(arr[f"{m}:{r}:energy"][s])) if s.any() else math.nan) for m in methods},
                # the same, over the images whose prediction the blank flips: does the map show what mattered?
                "energy_flipped": {
                    m: (float(np.mean(arr[f"{m}:{r}:energy"][f])) if f.any() else math.nan)
                    for m in methods
                    for f in [s & arr[f"{r}:flip"].astype(bool)]
                },
            }
            table[g][r] = row
    accuracy = float(np.mean(arr["pred"] == arr["label"])) if labelled and len(arr["pred"]) else None
    evidence, flagged, warn = [], [], False
    for r, row in table["all"].items():
        gap = row["flip_rate"] - row["control_flip_rate"]
        if r == "lungs":
            if gap < 0:
                warn = True
                evidence.append(
                    f"lungs: blanking them flips {row['flip_rate']:.1%} of predictions, less than blanking the "
                    f"border band ({row['control_flip_rate']:.1%}): the model leans on the edge more than the lungs"
                )
            continue
        ci = row["flip_gap_ci"]
        if gap >= flip_margin and ci is not None and ci[0] > 0:
            flagged.append(r)
            evidence.append(
                f"{r}: blanking it flips {row['flip_rate']:.1%} of predictions (score change "
                f"{row['score_change']:+.3f}) vs {row['control_flip_rate']:.1%} for a same-area central control "
                f"(difference {gap:+.1%}, 95 % CI [{ci[0]:+.1%}, {ci[1]:+.1%}])"
            )
        elif gap >= flip_margin:
            warn = True
            evidence.append(
                f"{r}: blanking it flips {gap:+.1%} more predictions than its control, but on {row['n']} images "
                "the interval of the difference includes 0: audit more images"
            )
        high = high_energy(row["area"], energy_factor)
        for m, e in row["energy"].items():
            ef = row["energy_flipped"][m]
            if e >= high:
                warn = True
                evidence.append(f"{r}: {m} puts {e:.1%} of its energy there (area {row['area']:.1%})")
            elif r in flagged and math.isfinite(ef) and ef >= high:
                evidence.append(f"{r}: on the images it flips, {m} puts {ef:.1%} of its energy there")
            elif r in flagged and e < row["area"]:
                evidence.append(
                    f"{r}: {m} puts less energy there ({e:.1%}) than a uniform map would: the map hides this shortcut"
                )
    # a shortcut confined to one class (a marker on one grade's films only) is diluted in "all": a WARN
    for g, regions in table.items():
        for r, row in regions.items():
            if g == "all" or r == "lungs" or r in flagged:
                continue
            gap, ci = row["flip_rate"] - row["control_flip_rate"], row["flip_gap_ci"]
            if gap >= flip_margin and ci is not None and ci[0] > 0:
                warn = True
                evidence.append(
                    f"{r}, class {g} only ({row['n']} images): blanking it flips {row['flip_rate']:.1%} of their "
                    f"predictions vs {row['control_flip_rate']:.1%} for the control (difference {gap:+.1%}, "
                    f"95 % CI [{ci[0]:+.1%}, {ci[1]:+.1%}]): look at that class's images there"
                )
    verdict = "SHORTCUT" if flagged else ("WARN" if warn else "OK")
    if not evidence:
        evidence.append("no region moves the predictions more than its control, and no CAM energy piles up there")
    rule = (
        f"a region is flagged when blanking it flips >= {flip_margin:.2f} more of the predictions than blanking "
        "its control and the 95 % paired bootstrap interval of that difference excludes 0; energy is high "
        f"when its share >= {energy_factor:g} x the region's area share (at most "
        "halfway from the area share to 1, for large regions); "
        "SHORTCUT = a border/corner region flagged, WARN = only energy high, lungs move less than the border, "
        "or a region flagged within one class only"
    )
    return {
        "verdict": verdict,
        "flagged_regions": flagged,
        "evidence": evidence,
        "rule": rule,
        "flip_margin": flip_margin,
        "energy_factor": energy_factor,
        "n_images": int(len(arr["pred"])),
        "accuracy": accuracy,
        "methods": methods,
        "classes": table,
    }


def _gap_ci(flip: np.ndarray, control: np.ndarray) -> list[float] | None:
    """Paired bootstrap (xraylens.metrics, seeded) of mean(flip) - mean(control) over the same images."""
    if len(flip) == 0:
        return None
    return percentile_interval(bootstrap_means(flip.astype(np.float64) - control.astype(np.float64), seed=0))


def _csv_rows(report: dict[str, Any], methods: list[str]):
    for g, regions in report["classes"].items():
        for r, row in regions.items():
            energy = [_fmt(row["energy"][m]) for m in methods] + [_fmt(row["energy_flipped"][m]) for m in methods]
            ci = row["flip_gap_ci"] or [None, None]
            cells = {**row, "flip_gap_ci_low": ci[0], "flip_gap_ci_high": ci[1]}
            yield [g, r] + [_fmt(cells[c]) for c in CSV_COLUMNS[2:]] + energy


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else round(v, 6)
    return v


def format_table(report: dict[str, Any]) -> str:
    """One line per class and region, then the verdict with its evidence and rule."""
    methods = report["methods"]
    head = f"{'class':<12}{'region':<11}{'area':>6}{'n':>6}{'flips':>8}{'Δscore':>8}{'ctrl flips':>11}{'ctrl Δ':>8}"
    head += "".join(f"{('E ' + m)[:14]:>15}" for m in methods)
    lines = [head]
    for g, regions in report["classes"].items():
        for r, row in regions.items():
            f = lambda v, p=".3f": "n/a" if v is None or not math.isfinite(v) else format(v, p)  # noqa: E731
            line = (
                f"{g[:11]:<12}{r:<11}{f(row['area'], '.2f'):>6}{row['n']:>6}{f(row['flip_rate']):>8}"
                f"{f(row['score_change'], '+.3f'):>8}{f(row['control_flip_rate']):>11}"
                f"{f(row['control_score_change'], '+.3f'):>8}"
            )
            lines.append(line + "".join(f"{f(row['energy'][m]):>15}" for m in methods))
    acc = report.get("accuracy")
    if acc is not None:
        lines.append(f"accuracy on the audited images: {acc:.3f}")
    lines.append(f"verdict: {report['verdict']}")
    lines += [f"  - {e}" for e in report["evidence"]]
    lines.append(f"  rule: {report['rule']}")
    return "\n".join(lines)
