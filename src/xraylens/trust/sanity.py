"""`xraylens sanity`: the model-randomisation sanity check of Adebayo et al. (NeurIPS 2018).

A saliency method that explains the model must produce different maps when the model's weights are
destroyed. For each CAM method: the maps of the trained model on a set of images, then the maps of
(a) the *cascade* (the head re-initialised, then each unit below it too, down to the stem: the
fully randomised model) and (b) *independent* randomisation (one unit at a time, the rest trained),
each compared with the trained maps image by image (Spearman of |maps|, SSIM, HOG similarity; see
`similarity`), reported as mean, standard deviation and a 95 % bootstrap interval of the mean over
the images. Every model explains the same class per image: the trained model's prediction.

Verdict per method: PASS when the mean Spearman between the trained and the fully randomised
model's maps is below `threshold` (default 0.5); otherwise FAIL: the maps survive the destruction of
everything the model learned, so they show the architecture or the image, not the decision. With
`label_randomization`, a copy of the run is retrained on the same images with shuffled training
labels (the data-randomisation test of the same paper) and judged by the same threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xraylens.config import RunConfig
from xraylens.errors import XraylensError
from xraylens.explain.methods import resolve_methods
from xraylens.explain.run import check_cam_settings, check_positive, pick_indices
from xraylens.io import atomic_path, write_csv, write_json
from xraylens.runs import Run, RunLike, open_run
from xraylens.trust import randomize
from xraylens.trust.maps import MapSet, cam_maps
from xraylens.trust.similarity import MEASURES, bootstrap_mean_ci, map_similarity

DEFAULT_THRESHOLD = 0.5
COLUMNS = ["test", "step", "unit", "method"] + [
    f"{m}_{s}" for m in MEASURES for s in ("mean", "std", "ci_low", "ci_high")
] + ["n", "n_constant"]  # fmt: skip


@dataclass
class SanitySummary:
    out: Path
    n_images: int
    methods: list[str]
    units: list[str]  # forward order, input side first
    threshold: float
    rows: list[dict[str, Any]]
    verdicts: dict[str, dict[str, Any]]  # method -> {"verdict", "spearman", ... }
    csv_path: Path
    json_path: Path
    plots: list[Path] = field(default_factory=list)

    def table(self) -> str:
        return format_table(self.rows, self.verdicts, self.threshold)


def _stats(sim: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in MEASURES:
        v = sim[m]
        lo, hi = bootstrap_mean_ci(v, seed=seed)
        out.update({f"{m}_mean": float(np.mean(v)), f"{m}_std": float(np.std(v))})
        out.update({f"{m}_ci_low": lo, f"{m}_ci_high": hi})
    return out


def _compare(test: str, step: int, unit: str, ref: MapSet, other: MapSet, seed: int) -> list[dict[str, Any]]:
    rows = []
    for m, ref_maps in ref.maps.items():
        sim = map_similarity(ref_maps, other.maps[m], ref.constant[m], other.constant[m])
        rows.append(
            {
                "test": test,
                "step": step,
                "unit": unit,
                "method": m,
                **_stats(sim, seed),
                "n": len(ref_maps),
                "n_constant": int(other.constant[m].sum()),
            }  # fmt: skip
        )
    return rows


def sanity_run(
    run: RunLike,
    *,
    data: str | Path | None = None,
    split: str = "test",
    methods: str | Sequence[str] = ("gradcam",),
    layers: Sequence[str] | None = None,
    combine: str | None = None,
    limit: int | None = 64,
    independent: bool = True,
    label_randomization: bool = False,
    label_epochs: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
    which: str = "best",
    plots: bool = True,
    progress: bool = False,
) -> SanitySummary:
    """Run the randomisation tests on `limit` images of a split; writes sanity.csv, sanity.json and
    sanity_<method>.png to `out` (default RUN/sanity)."""
    method_list = resolve_methods(methods)
    check_positive(batch_size=batch_size, limit=limit, label_epochs=label_epochs)
    if not (math.isfinite(threshold) and -1.0 < threshold <= 1.0):
        raise XraylensError(f"--threshold must be in (-1, 1] (a Spearman correlation), got {threshold}")
    run = open_run(run, which=which, device=device)
    check_cam_settings(run, layers, combine, "logit", "pred", data)
    _, cached = run.load_split(data, split)
    picked = pick_indices(len(cached.images), limit)
    images = cached.images[picked]
    clinical = None if cached.clinical is None else cached.clinical[picked]
    if len(images) < 2:
        raise XraylensError(f"the {split!r} split has {len(images)} image(s); the sanity check needs at least 2")
    out = Path(out) if out else run.run_dir / "sanity"
    units = randomize.layer_units(run.model)

    def maps_of(model, targets) -> MapSet:
        return cam_maps(
            run, model, images, method_list, targets, layers=layers, combine=combine, batch_size=batch_size,
            clinical=clinical,
        )  # fmt: skip

    trained = maps_of(run.model, "pred")
    tgt = trained.targets  # every model below explains the trained model's predicted class
    rows = _compare("cascading", 0, "none (trained)", trained, trained, seed)
    for step, (unit, model) in enumerate(randomize.cascading(run.model, seed), start=1):
        rows += _compare("cascading", step, unit, trained, maps_of(model, tgt), seed)
        if progress:
            print(f"sanity: cascading {step}/{len(units)} ({unit})", flush=True)
    if independent:
        for step, (unit, model) in enumerate(randomize.independent(run.model, seed), start=1):
            rows += _compare("independent", step, unit, trained, maps_of(model, tgt), seed)
    label_info = None
    if label_randomization:
        label_run, label_info = _label_randomized_run(run, out / "label-random", label_epochs, seed, progress)
        rows += _compare("label", 1, "shuffled training labels", trained, maps_of(label_run.model, tgt), seed)

    verdicts = _verdicts(rows, method_list, threshold, len(units))
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "sanity.csv", out / "sanity.json"
    write_csv(csv_path, COLUMNS, ([_round(r.get(c)) for c in COLUMNS] for r in rows))
    plot_paths = [_plot(out / f"sanity_{_safe(m)}.png", rows, m, threshold) for m in method_list] if plots else []
    summary = {
        "run": str(run.run_dir),
        "data": str(data) if data else str(run.data_path),
        "split": split,
        "n_images": len(images),
        "methods": method_list,
        "layers": list(layers) if layers else getattr(run.model, "default_cam_layers", None),
        "units_forward_order": units,
        "seed": seed,
        "reinit": "each module's own reset_parameters, torch.manual_seed(seed + 1000 * unit index)",
        "target": "the trained model's predicted class, for every model",
        "threshold": threshold,
        "rule": f"PASS when the mean Spearman rank correlation (|maps|) between the trained and the fully "
        f"randomised model's maps is below {threshold:g}",
        "label_randomization": label_info,
        "verdicts": verdicts,
        "rows": [{k: _round(v) for k, v in r.items()} for r in rows],
    }
    write_json(json_path, summary)
    n = len(images)
    return SanitySummary(out, n, method_list, units, threshold, rows, verdicts, csv_path, json_path, plot_paths)


def _verdicts(
    rows: list[dict[str, Any]], methods: list[str], threshold: float, n_units: int
) -> dict[str, dict[str, Any]]:
    out = {}
    for m in methods:
        full = next(r for r in rows if r["test"] == "cascading" and r["step"] == n_units and r["method"] == m)
        v = {
            "verdict": "PASS" if full["spearman_mean"] < threshold else "FAIL",
            "spearman_full_randomization": full["spearman_mean"],
            "spearman_ci": [full["spearman_ci_low"], full["spearman_ci_high"]],
            "ssim_full_randomization": full["ssim_mean"],
            "hog_full_randomization": full["hog_mean"],
        }
        lab = next((r for r in rows if r["test"] == "label" and r["method"] == m), None)
        if lab is not None:
            v["label_verdict"] = "PASS" if lab["spearman_mean"] < threshold else "FAIL"
            v["spearman_label_randomization"] = lab["spearman_mean"]
        out[m] = v
    return out


def _label_randomized_run(
    run: Run, out: Path, epochs: int | None, seed: int, progress: bool
) -> tuple[Run, dict[str, Any]]:
    """Retrain the run's config on the same train/val images with the training labels shuffled
    (seeded; val keeps its true labels, so its accuracy shows what was learned). Reused when `out`
    already holds a finished run made the same way."""
    from xraylens.data.splits import read_splits_csv
    from xraylens.runs import read_checkpoint
    from xraylens.train.loop import absolute_paths, train

    splits = run.run_dir / "splits.csv"
    if not splits.is_file():
        raise XraylensError(f"{splits} not found: label randomisation retrains on the run's recorded splits")
    rows = read_splits_csv(splits)
    root = run.data_path
    items = [(root / img, r.label, r.split) for img, r in rows.items() if r.split in ("train", "val")]
    train_idx = [i for i, it in enumerate(items) if it[2] == "train"]
    labels = [it[1] for it in items]
    perm = np.random.default_rng(seed).permutation(len(train_idx))
    for i, j in zip(train_idx, np.asarray(train_idx)[perm], strict=True):
        labels[i] = items[j][1]
    agree = float(np.mean([labels[i] == items[i][1] for i in train_idx])) if train_idx else float("nan")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "shuffled_labels.csv"
    rows_out = ([str(p), lab, s] for (p, _, s), lab in zip(items, labels, strict=True))
    write_csv(manifest, ["path", "label", "split"], rows_out)
    cfg = RunConfig.from_dict(run.config.to_dict())  # a copy: the loaded run keeps its own config
    cfg.apply({"data.path": manifest, "train.epochs": epochs or run.config.train.epochs})
    run_dir = out / "run"
    last = run_dir / "checkpoints" / "last.pt"
    reuse = last.is_file() and not RunConfig.from_dict(read_checkpoint(last)["config"]).diff(absolute_paths(cfg))
    if not reuse:
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        train(cfg, run_dir, progress=progress)
    label_run = open_run(run_dir, device=str(run.device))
    info = {"run": str(run_dir), "manifest": str(manifest), "epochs": cfg.train.epochs,
            "train_label_agreement": agree, "reused": reuse}  # fmt: skip
    return label_run, info


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _plot(path: Path, rows: list[dict[str, Any]], method: str, threshold: float) -> Path:
    """The paper's figure: similarity to the trained maps vs the randomised layer (cascade, head first),
    mean with a +-1 std band; the independent test beside it when it was run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = [t for t in ("cascading", "independent") if any(r["test"] == t and r["method"] == method for r in rows)]
    fig, axes = plt.subplots(1, len(tests), figsize=(6.5 * len(tests), 4.2), squeeze=False)
    for ax, test in zip(axes[0], tests, strict=True):
        sel = [r for r in rows if r["test"] == test and r["method"] == method]
        x = np.arange(len(sel))
        for meas, colour in zip(MEASURES, ("tab:blue", "tab:orange", "tab:green"), strict=True):
            mean = np.array([r[f"{meas}_mean"] for r in sel])
            std = np.array([r[f"{meas}_std"] for r in sel])
            ax.plot(x, mean, "o-", color=colour, label=f"{meas} (mean ± std)", ms=4)
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15)
        ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"Spearman threshold {threshold:g}")
        ax.set_xticks(x, [r["unit"].split("+")[0] if r["step"] else "trained" for r in sel], rotation=60, ha="right")
        ax.set_ylim(-0.25, 1.05)
        ax.set_ylabel("similarity to the trained model's maps")
        ax.set_title(f"{method}: {test} randomisation" + (" (head first)" if test == "cascading" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def format_table(rows: list[dict[str, Any]], verdicts: dict[str, dict[str, Any]], threshold: float) -> str:
    """The table as text: one line per test, step and method, then the verdicts."""
    head = f"{'test':<12}{'step':>4}  {'unit':<26}{'method':<20}{'spearman':>16}{'ssim':>16}{'hog':>16}"
    lines = [head]
    for r in rows:
        cells = "".join(f"{r[f'{m}_mean']:>9.3f} ±{r[f'{m}_std']:.2f}" for m in MEASURES)
        lines.append(f"{r['test']:<12}{r['step']:>4}  {r['unit'][:25]:<26}{r['method']:<20}{cells}")
    lines.append(f"verdicts (PASS: mean Spearman of trained vs fully randomised maps < {threshold:g}):")
    for m, v in verdicts.items():
        extra = ""
        if "label_verdict" in v:
            extra = f"; label randomisation {v['label_verdict']} (Spearman {v['spearman_label_randomization']:.3f})"
        lo, hi = v["spearman_ci"]
        lines.append(
            f"  {m:<20} {v['verdict']}  Spearman {v['spearman_full_randomization']:.3f} [{lo:.3f}, {hi:.3f}], "
            f"SSIM {v['ssim_full_randomization']:.3f}, HOG {v['hog_full_randomization']:.3f}{extra}"
        )
    return "\n".join(lines)
