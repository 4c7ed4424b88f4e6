"""The `xraylens` command. Subcommands only parse arguments and call the API."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from xraylens.config import RunConfig
from xraylens.errors import XraylensError

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, evaluate and explain radiograph classifiers, and measure whether the explanations "
    "point at the right anatomy.",
)

RunArg = Annotated[Path, typer.Argument(help="Run directory written by `xraylens train` (or a .pt checkpoint).")]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data", help="Dataset: folder splits, CSV manifest or .npz. Default: the data the run was trained on."
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
# the list of names is filled in from the methods table when --help is asked for (see main)
MethodsOpt = Annotated[str, typer.Option("--methods", help="Comma list of CAM methods.")]
LayersOpt = Annotated[
    str | None, typer.Option("--layers", help="Comma list of module names (default: the model's CAM layers).")
]
CombineOpt = Annotated[
    str | None,
    typer.Option("--combine", help="mean, max or product over layers (default: product for NormGrad, mean otherwise)."),
]
TargetOpt = Annotated[str, typer.Option("--target", help="pred, true, or a class name/index.")]


def _names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


_D = RunConfig()  # defaults shown in --help come from the config itself, so they cannot drift


@app.command()
def train(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Dataset: folder splits, class folders, CSV "
            "manifest (path,label[,split]) or MedMNIST .npz (default: the --config's data.path).",
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help=f"Model name, see `xraylens models` (default {_D.model.name}).")
    ] = None,
    loss: Annotated[
        str | None, typer.Option("--loss", help=f"ce, ce-weighted, focal, focal-seed or bce (default {_D.train.loss}).")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", help=f"Training epochs; with --resume, the new total (default {_D.train.epochs})."),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            help=f"Model input in pixels: one side (a square) or HxW, e.g. 704x407 (default {_D.data.image_size}).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")] = Path("runs/run"),
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML config (sections data, model, train); "
            "options given here override it (default: built-in defaults).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help=f"Images per optimiser step, per process under torchrun (default {_D.train.batch_size}).",
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help=f"Learning rate (default {_D.train.lr:g}).")] = None,
    optimizer: Annotated[
        str | None, typer.Option("--optimizer", help=f"adam, adamw, sgd or radam (default {_D.train.optimizer}).")
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option("--schedule", help=f"Learning-rate schedule: cosine, step or none (default {_D.train.schedule})."),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            "--select",
            help="Best-epoch metric or expression on the "
            "validation metrics, e.g. qwk or '1.5*f2+accuracy' "
            f"(default {_D.train.select}).",
        ),
    ] = None,
    early_stopping: Annotated[
        int | None,
        typer.Option("--early-stopping", help="Stop after this many epochs without improvement (default: off)."),
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            "--augment",
            help="Comma list of flip, affine, jitter, elastic, cat_elastic (input [original, CLAHE+Sobel] plus "
            f"elastic, in_chans 2), or none (default {_D.data.augment}).",
        ),
    ] = None,
    balanced: Annotated[
        bool | None, typer.Option("--balanced/--no-balanced", help="Class-balanced sampling (default: off).")
    ] = None,
    center_crop: Annotated[
        float | None,
        typer.Option(
            "--center-crop",
            help=f"Keep this central fraction of each side before resizing (default {_D.data.center_crop:g}).",
        ),
    ] = None,
    in_chans: Annotated[
        int | None, typer.Option("--in-chans", help=f"Input channels: 1 (grey) or 3 (default {_D.model.in_chans}).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="Local pretrained state dict (.pth/.safetensors); "
            "'hub' downloads (needs internet). Default: random init.",
        ),
    ] = None,
    head_hidden: Annotated[
        str | None, typer.Option("--head-hidden", help="Extra FC head sizes, e.g. 256,64 (default: none).")
    ] = None,
    train_last: Annotated[
        int | None,
        typer.Option("--train-last", help="Train only the last N backbone stages and the head (default: all)."),
    ] = None,
    group_pattern: Annotated[
        str | None,
        typer.Option(
            "--group-pattern",
            help="Regex on the file name giving the "
            "patient, e.g. 'person(\\d+)': the automatic val split keeps "
            "each patient's images together (default: per image).",
        ),
    ] = None,
    group_column: Annotated[
        str | None,
        typer.Option(
            "--group-column", help="Manifest column naming the patient, used like --group-pattern (default: none)."
        ),
    ] = None,
    merge_classes: Annotated[
        str | None,
        typer.Option(
            "--merge-classes",
            help="Merge classes, e.g. 'abnormal=osteopenia,osteoporosis' (several joined by ';'; default: none).",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help=f"auto, cpu, cuda or cuda:N (default {_D.train.device}).")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help=f"Seed of weights, data order and augmentation (default {_D.train.seed})."),
    ] = None,
    clinical: Annotated[
        Path | None,
        typer.Option("--clinical", help="Clinical CSV, one row per image or patient (default: none)."),
    ] = None,
    clinical_cols: Annotated[
        str | None,
        typer.Option(
            "--clinical-cols",
            help="Comma list of clinical columns; name:num or name:cat forces a type (default: none; with "
            "--clinical-from-name every named group but label).",
        ),
    ] = None,
    clinical_key: Annotated[
        str | None,
        typer.Option("--clinical-key", help="CSV column matching an image's path, file name or stem (default: none)."),
    ] = None,
    clinical_from_name: Annotated[
        str | None,
        typer.Option(
            "--clinical-from-name",
            help="Regex with named groups over file names, e.g. '_age(?P<age>\\d+)' (default: none).",
        ),
    ] = None,
    fusion: Annotated[
        str | None,
        typer.Option("--fusion", help=f"Clinical fusion: none, early or late (default {_D.clinical.mode})."),
    ] = None,
    clinical_mlp: Annotated[
        str | None,
        typer.Option(
            "--clinical-mlp", help="Late fusion: hidden sizes for the clinical vector, e.g. 16 (default: none)."
        ),
    ] = None,
    allow_leaky_column: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-leaky-column",
            help="Let this clinical column past the leakage guard; recorded in clinical.json "
            "(repeatable; default: none).",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any setting, e.g. --set train.weight_decay=0 (repeatable; default: none)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from checkpoints/last.pt.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress output.")] = False,
) -> None:
    """Train a classifier and write a run directory (config.yaml, checkpoints/, history.csv, metrics.json,
    splits.csv, tb/)."""
    from xraylens.train.loop import resume_config
    from xraylens.train.loop import train as run_train

    flags = {
        "data.path": data,
        "model.name": model,
        "train.loss": loss,
        "train.epochs": epochs,
        "data.image_size": image_size,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "train.optimizer": optimizer,
        "train.schedule": schedule,
        "train.select": select,
        "train.early_stopping": early_stopping,
        "data.augment": augment,
        "data.balanced": balanced,
        "data.center_crop": center_crop,
        "model.in_chans": in_chans,
        "model.weights": weights,
        "model.head_hidden": head_hidden,
        "model.train_last": train_last,
        "data.group_pattern": group_pattern,
        "data.group_column": group_column,
        "data.merge_classes": merge_classes,
        "train.device": device,
        "train.seed": seed,
        "clinical.file": clinical,
        "clinical.cols": clinical_cols,
        "clinical.key": clinical_key,
        "clinical.from_name": clinical_from_name,
        "clinical.mode": fusion,
        "clinical.mlp_hidden": clinical_mlp,
        "clinical.allow_leaky": allow_leaky_column,
    }
    if resume:
        if config or set_:
            raise XraylensError(
                f"--resume continues {out} with its saved config; drop "
                f"{' and '.join(n for n, v in (('--config', config), ('--set', set_)) if v)}"
            )
        cfg = resume_config(out, flags)
    else:
        cfg = (RunConfig.load(config) if config else RunConfig()).apply(flags).override(list(set_ or []))
    result = run_train(cfg, out, resume=resume, progress=not quiet)
    typer.echo(f"best epoch {result.best_epoch} ({cfg.train.select} {result.best_score:.4f}); run in {out}")


@app.command()
def evaluate(
    run: RunArg,
    data: DataOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split to evaluate.")] = "test",
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last.")] = "best",
    device: DeviceOpt = "auto",
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the outputs (default: the run).")] = None,
    bootstrap: Annotated[
        int,
        typer.Option(
            "--bootstrap",
            help="Bootstrap replicates for the 95 % intervals of accuracy, sensitivity, specificity, F1, "
            "QWK and AUC; 0 = no intervals (default 1000).",
        ),
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap resampling (default 0).")] = 0,
    importance_repeats: Annotated[
        int,
        typer.Option(
            "--importance-repeats",
            help="Clinically fused runs: shuffles per column for the permutation importance written to "
            "clinical_importance-<split>.csv/.json; 0 = off (default 5).",
        ),
    ] = 5,
    clinical: Annotated[
        Path | None,
        typer.Option(
            "--clinical",
            help="Clinically fused runs: CSV with the run's key and columns for --data "
            "(default: the run's own table or file-name pattern).",
        ),
    ] = None,
) -> None:
    """Write metrics-<split>.json/.csv and predictions-<split>.csv for a split."""
    from xraylens.evaluate.run import TABLE_KEYS, confusion_text, evaluate_run
    from xraylens.metrics import format_ci

    m = evaluate_run(
        run,
        data,
        split,
        which=checkpoint,
        device=device,
        out=out,
        bootstrap=bootstrap,
        seed=seed,
        importance_repeats=importance_repeats,
        clinical=clinical,
    )
    typer.echo(f"{split}: {m['n_images']} images" + (f", {len(m['skipped'])} skipped" if m["skipped"] else ""))
    if m.get("ci"):
        typer.echo(f"  (95 % bootstrap intervals, {m['ci']['replicates']} replicates, seed {m['ci']['seed']})")
    for k in TABLE_KEYS:
        if m.get(k) is not None:
            typer.echo(f"  {k:<20} {format_ci(m[k], m.get(f'{k}_ci'), 4)}")
    typer.echo(confusion_text(m, m.get("classes") or []))
    typer.echo(f"wrote {(out or run)}/metrics-{split}.json, metrics-{split}.csv and predictions-{split}.csv")
    if m.get("clinical_importance"):
        from xraylens.evaluate.importance import importance_text

        typer.echo(f"clinical permutation importance ({split}, mean ± sd over {importance_repeats} shuffles):")
        typer.echo(importance_text(m["clinical_importance"]))
        typer.echo(f"wrote {(out or run)}/clinical_importance-{split}.csv and .json")


@app.command()
def predict(
    run: RunArg,
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, DICOM...).")],
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    clinical: Annotated[
        Path | None,
        typer.Option(
            "--clinical",
            help="Clinically fused runs: CSV with the run's key and columns for these files "
            "(default: the run's own table or file-name pattern).",
        ),
    ] = None,
) -> None:
    """Print the predicted class and probabilities for single image files."""
    from xraylens.evaluate.predict import predict_files

    failed = 0
    for r in predict_files(run, images, device=device, clinical=clinical):
        if as_json:
            typer.echo(json.dumps(r))
        elif "error" in r:
            typer.echo(f"{r['path']}: skipped ({r['error']})", err=True)
        else:
            probs = " ".join(f"{c}={p:.3f}" for c, p in r["probabilities"].items())
            typer.echo(f"{r['path']}: {r['class']} ({r['probability']:.3f})  {probs}")
        failed += "error" in r
    if failed:
        typer.echo(f"{failed} of {len(images)} file(s) could not be read", err=True)
        raise typer.Exit(1)


@app.command()
def explain(
    run: RunArg,
    data: DataOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split to explain.")] = "test",
    methods: MethodsOpt = "gradcam",
    layers: LayersOpt = None,
    combine: CombineOpt = None,
    target: TargetOpt = "pred",
    score: Annotated[str, typer.Option("--score", help="Back-propagate the target's logit or prob.")] = "logit",
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: RUN/cams).")] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Explain N images spread over the split (default: all).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per engine pass.")] = 16,
    overlays: Annotated[int, typer.Option("--overlays", help="Write side-by-side PNGs for the first N images.")] = 16,
    grid: Annotated[int, typer.Option("--grid", help="Tiles in each grid_<method>.png.")] = 36,
    blank_wrong: Annotated[bool, typer.Option("--blank-wrong", help="Wrong predictions as blank grid tiles.")] = False,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="fp32, or bf16: the model's passes under bfloat16 autocast, maps within 0.01 mean of fp32 "
            "(default fp32).",
        ),
    ] = "fp32",
) -> None:
    """Write CAMs of a split: maps.npz, index.csv, grid_<method>.png and overlays/."""
    from xraylens.explain.run import explain_run

    s = explain_run(
        run,
        data,
        split,
        methods=methods,
        layers=_names(layers) if layers else None,
        combine=combine,
        target=target,
        score=score,
        out=out,
        device=device,
        limit=limit,
        batch_size=batch_size,
        overlays=overlays,
        grid=grid,
        blank_wrong=blank_wrong,
        precision=precision,
    )
    typer.echo(f"explained {s.n_images} images with {', '.join(s.methods)} -> {s.out}")
    for m, n in s.constant.items():
        if n:
            typer.echo(f"  {m}: {n} constant map(s) returned as zeros (flagged in index.csv)")


@app.command()
def localize(
    run: RunArg,
    annotations: Annotated[
        Path,
        typer.Option(
            "--annotations",
            help="object-CXR dev.csv, NIH BBox_List csv, COCO json (polygons, boxes or RLE), a folder of "
            "binary masks, or a CheXlocalize RLE json.",
        ),
    ],
    fmt: Annotated[str, typer.Option("--format", help="object-cxr, nih, coco, masks or rle.")],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset (class folders) or a plain folder of images. Default: the run's data."),
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option(
            "--image",
            help="Single-image mode: print the result and "
            "write an overlay with the annotation and peak marked (default: the "
            "whole split).",
        ),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split of --data (ignored for a plain folder).")] = "test",
    methods: MethodsOpt = "gradcam",
    layers: LayersOpt = None,
    combine: CombineOpt = None,
    target: TargetOpt = "pred",
    tolerance: Annotated[float, typer.Option("--tolerance", help="Pointing-game tolerance, original pixels.")] = 15.0,
    smooth: Annotated[float, typer.Option("--smooth", help="Gaussian sigma (input pixels) before the peak.")] = 0.0,
    percentile: Annotated[float, typer.Option("--percentile", help="IoU of the map above this percentile.")] = 90.0,
    label: Annotated[
        str | None, typer.Option("--label", help="Only shapes of this finding label (default: all).")
    ] = None,
    faithfulness: Annotated[bool, typer.Option("--faithfulness", help="Also deletion/insertion AUC.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed annotation rows (counted).")] = False,
    border: Annotated[
        float,
        typer.Option("--border", help="Edge band width for border_energy, a fraction of the side (default 0.1)."),
    ] = 0.1,
    corner: Annotated[
        float,
        typer.Option("--corner", help="Corner square side for corner_energy, a fraction of the side (default 0.15)."),
    ] = 0.15,
    annotation_size: Annotated[
        str | None,
        typer.Option(
            "--annotation-size",
            help="W,H (or one number) of the "
            "images the coordinates were drawn on, when the files "
            "were resized since. COCO sizes are read from the "
            "file. Default: the files' own size.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: the run).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per engine pass.")] = 16,
    device: DeviceOpt = "auto",
    threshold: Annotated[
        str,
        typer.Option(
            "--threshold",
            help="CheXlocalize mIoU: binarise each map (upsampled to the original image) by otsu, by per-class "
            "thresholds tuned on --tune-on (tuned), or skip the mIoU (none). Default otsu.",
        ),
    ] = "otsu",
    tune_on: Annotated[
        str, typer.Option("--tune-on", help="Split to tune the thresholds on with --threshold tuned (default val).")
    ] = "val",
    prob_cutoff: Annotated[
        float,
        typer.Option(
            "--prob-cutoff",
            help="Predicted mask empty when the explained class's probability is below this (default 0: off).",
        ),
    ] = 0.0,
    iou_count: Annotated[
        str,
        typer.Option(
            "--iou-count",
            help="mIoU over images where both masks are non-empty (both-nonempty, CheXlocalize's default) "
            "or every image where either is (all). Default both-nonempty.",
        ),
    ] = "both-nonempty",
    reader2: Annotated[
        Path | None,
        typer.Option(
            "--reader2",
            help="A second reader's annotations: scored beside the model, with the model's percentage "
            "decrease from it (default: none).",
        ),
    ] = None,
    reader2_format: Annotated[
        str | None, typer.Option("--reader2-format", help="Format of --reader2 (default: --format).")
    ] = None,
    bootstrap: Annotated[
        int,
        typer.Option("--bootstrap", help="Bootstrap replicates for the 95 % intervals; 0 = none (default 1000)."),
    ] = 1000,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the bootstrap and of the random baseline (default 0).")
    ] = 0,
    randomized_baseline: Annotated[
        bool,
        typer.Option(
            "--randomized-baseline",
            help="Also score each method on a weight-randomised copy of the model, as randomized:<method> "
            "(default: off).",
        ),
    ] = False,
) -> None:
    """Pointing game, hit rate, mIoU, energy and IoU of CAMs against annotations, with 95 % intervals,
    beside centre and random baselines (and a second reader)."""
    from xraylens.localize.run import localize_image, localize_run, parse_size

    lay = _names(layers) if layers else None
    ref = parse_size(annotation_size) if annotation_size else None
    if image is not None:
        for r in localize_image(
            run,
            image,
            annotations=annotations,
            fmt=fmt,
            methods=methods,
            layers=lay,
            combine=combine,
            target=target,
            tolerance=tolerance,
            smooth=smooth,
            label=label,
            out=out,
            device=device,
            ref_size=ref,
        ):
            verdict = "skipped (no annotation)" if r["skipped"] else ("HIT" if r["hit"] else "miss")
            verdict += " (constant map: no peak)" if r["constant"] else ""
            typer.echo(
                f"{r['method']:<20} {verdict:<8} peak (x, y) = {tuple(r['peak_xy'])}, "
                f"distance {r['distance']:.1f} px, target {r['target']} ({r['probability']:.3f}) "
                f"-> {r['overlay']}"
            )
        return
    s = localize_run(
        run,
        annotations=annotations,
        fmt=fmt,
        data=data,
        split=split,
        methods=methods,
        layers=lay,
        combine=combine,
        target=target,
        tolerance=tolerance,
        smooth=smooth,
        percentile=percentile,
        label=label,
        faithfulness=faithfulness,
        skip_bad=skip_bad,
        border=border,
        corner=corner,
        out=out,
        device=device,
        batch_size=batch_size,
        ref_size=ref,
        threshold=threshold,
        tune_on=tune_on,
        prob_cutoff=prob_cutoff,
        iou_count=iou_count,
        reader2=reader2,
        reader2_format=reader2_format,
        bootstrap=bootstrap,
        seed=seed,
        randomized_baseline=randomized_baseline,
    )
    from xraylens.metrics import format_ci

    typer.echo(
        f"{s.n_images} annotated-file images, {s.n_annotated} with shapes; pointing game (tolerance "
        f"{s.tolerance:g} original px), hit rate and mIoU ({threshold}), 95 % bootstrap intervals:"
    )
    w = max([20, *map(len, s.figures)])  # randomized:<method> rows are long
    typer.echo(f"  {'method':<{w}} {'pointing game':<24} {'hit rate':<24} mIoU")
    for m, f in s.figures.items():
        cells = [format_ci((f.get(k) or {}).get("value"), (f.get(k) or {}).get("ci")) for k in f]
        typer.echo(f"  {m:<{w}} " + " ".join(f"{c:<24}" for c in cells[:-1]) + f" {cells[-1]}")
    if s.percentage_decrease:
        typer.echo("  percentage decrease from reader2 (all images):")
        for m, f in s.percentage_decrease.items():
            cells = [format_ci((f[k].get("all") or {}).get("value"), (f[k].get("all") or {}).get("ci"), 1) for k in f]
            typer.echo(f"  {m:<{w}} " + " ".join(f"{c:<24}" for c in cells[:-1]) + f" {cells[-1]}")
    if s.skipped_rows:
        typer.echo(f"  {len(s.skipped_rows)} malformed annotation row(s) skipped (listed in the summary)")
    typer.echo(f"wrote {s.csv_path}, {s.summary_path} and localization_summary.csv")


@app.command()
def models() -> None:
    """List the model names `--model` accepts, with a one-line description each."""
    # The static catalog, not the registry: listing must not import torch and every family (~4 s).
    from xraylens.models.catalog import CATALOG

    width = max(map(len, CATALOG))
    for name in sorted(CATALOG):
        typer.echo(f"{name:<{width}}  {CATALOG[name].description}")


@app.command()
def demo(
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Run the same job on a real folder of class folders instead (default: phantoms)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Where the phantom data and the run go.")] = Path("runs/demo"),
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Training epochs (default 20 on phantoms, 5 on --data).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Train anew when --out holds a demo run made with other "
            "data or settings (default: stop and say what changed).",
        ),
    ] = False,
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress output.")] = False,
) -> None:
    """Generate a phantom dataset (lesions with known boxes), train, evaluate, explain and localise.

    A rerun with the same data and settings reuses the trained run and takes seconds."""
    from xraylens.demo import run_demo

    summary = run_demo(out=out, data=data, epochs=epochs, progress=not quiet, device=device, force=force)
    typer.echo(summary)


@app.command()
def report(
    run: Annotated[
        Path, typer.Argument(help="Run directory written by `xraylens train`, or the --out of `crossval` or `tune`.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="HTML file, or a folder for report.html (default: RUN/report.html).")
    ] = None,
) -> None:
    """Write one self-contained HTML page of a run (settings, data, clinical inputs, training curves, metrics
    with ROC, precision-recall and calibration plots, CAM grids, localisation, sanity check, shortcut
    audit), or the study page of a crossval or tune folder, and print its path."""
    from xraylens.report import build_report

    typer.echo(build_report(run, out))


@app.command()
def serve(
    run: RunArg,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="Address to listen on (default 127.0.0.1: this machine only; any other address needs "
            "--token-file or --no-auth).",
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (default 8000).")] = 8000,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="File holding one bearer token; /model and /predict then need 'Authorization: Bearer "
            "<token>' (default: no token, allowed on loopback only).",
        ),
    ] = None,
    no_auth: Annotated[
        bool,
        typer.Option("--no-auth", help="Serve a non-loopback --host without a token (default: refuse to)."),
    ] = False,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", help="Largest upload accepted, in MB of 2^20 bytes (default 50).")
    ] = 50.0,
    offered: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma list of the CAM methods offered (default: every method but scorecam, which runs "
            "one forward pass per channel).",
        ),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            help="Most images per model pass when requests queue up together (default 4; 1: one at a time).",
        ),
    ] = 4,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last (default best).")] = "best",
    device: DeviceOpt = "auto",
) -> None:
    """Serve a web page and a REST API (POST /predict) that classify and explain one uploaded image."""
    from xraylens.serve.app import serve_run

    serve_run(
        run,
        host=host,
        port=port,
        token_file=token_file,
        no_auth=no_auth,
        max_upload_mb=max_upload_mb,
        methods=offered,
        max_batch=max_batch,
        checkpoint=checkpoint,
        device=device,
    )


@app.command()
def tune(
    trials: Annotated[
        int,
        typer.Option(
            "--trials",
            help="Finished (complete or pruned) trials the study should hold in total; a resumed or shared "
            "study runs only the missing ones. Required.",
        ),
    ],
    study: Annotated[
        str, typer.Option("--study", help="Study name; workers given the same name and --storage share it. Required.")
    ],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset, as for `train` (default: the --config's data.path)."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help=f"Model name, see `xraylens models` (default {_D.model.name}).")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="SQLAlchemy URL of the study, e.g. postgresql+psycopg2://user:pw@host/db to share it between "
            "machines (default: sqlite:///OUT/study.db).",
        ),
    ] = None,
    space: Annotated[
        Path | None,
        typer.Option(
            "--space",
            help="YAML search space that changes or replaces the built-in one (default: focal gamma, "
            "focal_alpha_scale, lr, weight decay, batch size, optimiser; see README).",
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help=f"Epochs per trial (default {_D.train.epochs}).")
    ] = None,
    out: Annotated[
        Path,
        typer.Option("--out", help="Study folder: trials/, trials.csv, best.json, best-config.yaml, plots/."),
    ] = Path("runs/tune"),
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Base YAML config for every trial (default: built-in defaults)."),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", help=f"Side of the square model input, pixels (default {_D.data.image_size})."),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            "--select",
            help="Validation score the study maximises, a metric or expression, e.g. qwk "
            f"(default {_D.train.select}; 'loss' means lowest loss).",
        ),
    ] = None,
    sampler: Annotated[
        str, typer.Option("--sampler", help="tpe or qmc (scrambled Sobol, as the KL-grading original).")
    ] = "tpe",
    seed: Annotated[int, typer.Option("--seed", help="Sampler seed (trials are trained with train.seed).")] = 0,
    pruner_patience: Annotated[
        int,
        typer.Option(
            "--pruner-patience",
            help="Prune a trial after this many epochs without improvement when it is also below the median "
            "of earlier trials at that epoch.",
        ),
    ] = 2,
    no_prune: Annotated[bool, typer.Option("--no-prune", help="Train every trial to the end.")] = False,
    startup_trials: Annotated[
        int | None,
        typer.Option(
            "--startup-trials",
            help="Random trials before TPE models the results and the pruner acts (default: a third of "
            "--trials, 2 to 10).",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help=f"auto, cpu, cuda or cuda:N (default {_D.train.device}).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any setting for every trial, e.g. --set train.select=qwk (default: none)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars; one line per trial.")] = False,
) -> None:
    """Search hyperparameters with Optuna; every trial is a run directory under OUT/trials/.

    A killed tune continues where it stopped when run again with the same command."""
    from xraylens.tune import tune as run_tune

    flags = {
        "data.path": data,
        "model.name": model,
        "train.epochs": epochs,
        "data.image_size": image_size,
        "train.select": select,
        "train.device": device,
    }
    cfg = (RunConfig.load(config) if config else RunConfig()).apply(flags).override(list(set_ or []))
    r = run_tune(
        cfg,
        out,
        trials=trials,
        study=study,
        storage=storage,
        space=space,
        sampler=sampler,
        seed=seed,
        pruner_patience=None if no_prune else pruner_patience,
        startup_trials=startup_trials,
        progress=not quiet,
    )
    c = r.counts
    typer.echo(
        f"study {r.study} ({r.storage}): {c['finished']} finished ({c['complete']} complete, {c['pruned']} "
        f"pruned), {c['failed']} failed; this run trained {len(r.ran)}"
    )
    if r.best_number is None:
        typer.echo("no complete trial yet")
    else:
        typer.echo(f"best trial {r.best_number}: {r.select} {r.best_value:.4f}")
        for k, v in r.best_params.items():
            typer.echo(f"  {k:<22} {v:.4g}" if isinstance(v, float) else f"  {k:<22} {v}")
        typer.echo(f"best run: {r.best_dir} (evaluate, explain and report accept it)")
    for note in r.notes:
        typer.echo(f"note: {note}")
    typer.echo("wrote " + ", ".join(str(p) for p in r.files.values()))


segment_app = typer.Typer(
    no_args_is_help=True,
    help="Lung segmentation: train a U-Net on image/mask pairs, predict lung masks for any image folder "
    "(for `localize --format masks`).",
)
app.add_typer(segment_app, name="segment")


@segment_app.command("train")
def segment_train(
    data: Annotated[
        Path, typer.Option("--data", help="Folder with images/ and masks/ (and optionally pairs.csv); required.")
    ],
    out: Annotated[Path, typer.Option("--out", help="New segmentation run folder; required.")],
    image_size: Annotated[
        int, typer.Option("--image-size", help="Square input side, a multiple of 32 (default 256).")
    ] = 256,
    encoder: Annotated[
        str,
        typer.Option(
            "--encoder",
            help="U-Net encoder: resnet18, resnet34, resnet50, efficientnet-b0, mobilenet_v2 "
            "(default resnet18; random initialisation).",
        ),
    ] = "resnet18",
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs (default 20).")] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step (default 8).")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate, cosine schedule (default 1e-3).")] = 1e-3,
    val_fraction: Annotated[
        float,
        typer.Option("--val-fraction", help="Share of images held out, whole patients at a time (default 0.2)."),
    ] = 0.2,
    augment: Annotated[
        str,
        typer.Option(
            "--augment", help="Comma list of flip, affine, elastic, jitter, or none (default flip,affine,jitter)."
        ),
    ] = "flip,affine,jitter",
    seed: Annotated[int, typer.Option("--seed", help="Split and training seed (default 0).")] = 0,
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar (default: shown).")] = False,
) -> None:
    """Train a lung U-Net (Dice + BCE); report Dice and IoU on the patient-grouped held-out split."""
    from xraylens.segment.train import SegmentConfig, train_segmentation

    cfg = SegmentConfig(
        image_size=image_size,
        encoder=encoder,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        val_fraction=val_fraction,
        augment=augment,
        seed=seed,
    )
    s = train_segmentation(data, out, cfg, device=device, progress=not quiet)
    typer.echo(
        f"held-out Dice {s.dice:.4f}, IoU {s.iou:.4f} (best epoch {s.best_epoch}; {s.n_train} train / "
        f"{s.n_val} val images, grouped by {s.grouping})"
    )
    for note in s.notes:
        typer.echo(f"skipped: {note}")
    typer.echo(f"wrote {s.out}")


@segment_app.command("predict")
def segment_predict(
    segrun: Annotated[Path, typer.Argument(help="Run folder written by `xraylens segment train`.")],
    data: Annotated[Path, typer.Option("--data", help="Folder of images (searched recursively); required.")],
    out: Annotated[
        Path, typer.Option("--out", help="Mask folder: <image stem>.png at original size, and masks_index.csv.")
    ],
    threshold: Annotated[
        float, typer.Option("--threshold", help="Lung where the probability is at least this (default 0.5).")
    ] = 0.5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass (default 8).")] = 8,
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar (default: shown).")] = False,
    run: Annotated[
        Path | None,
        typer.Option("--run", help="Classifier run: mask only the images of its --split (default: every image)."),
    ] = None,
    split: Annotated[
        str, typer.Option("--split", help="With --run: the split of its splits.csv to mask (default val).")
    ] = "val",
) -> None:
    """Write a lung mask for every image of a folder; masks already newer than image and model are kept."""
    from xraylens.segment.predict import predict_masks, split_images

    only = split_images(run, split) if run is not None else None
    s = predict_masks(
        segrun, data, out, threshold=threshold, batch_size=batch_size, device=device, progress=not quiet, only=only
    )
    typer.echo(f"{s.written} masks written, {s.kept} up to date, {len(s.failed)} unreadable -> {s.out}")
    for image, why in s.failed:
        typer.echo(f"unreadable: {image}: {why}")
    typer.echo(f"wrote {s.index_path}")


@app.command()
def cycle(
    run: RunArg,
    data: Annotated[Path, typer.Option("--data", help="The class-folder dataset the run was trained on; required.")],
    lung_model: Annotated[
        Path, typer.Option("--lung-model", help="Run folder of `xraylens segment train` (lung masks); required.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder: cycle-K/, masks/, cycles.csv; required.")],
    cycles: Annotated[int, typer.Option("--cycles", help="Enhancement cycles after cycle 0 (default 1).")] = 1,
    method: Annotated[str, typer.Option("--method", help="CAM method of the emphasis (default gradcam).")] = "gradcam",
    emphasis: Annotated[
        str, typer.Option("--emphasis", help="cam (CAM as weight) or mask (lung mask as weight) (default cam).")
    ] = "cam",
    restrict_to_lungs: Annotated[
        bool, typer.Option("--restrict-to-lungs", help="Multiply the CAM weight by the lung mask (default: off).")
    ] = False,
    strength: Annotated[
        float, typer.Option("--strength", help="Blend s in x*((1-s)+s*w), 0 to 1 (default 0.5).")
    ] = 0.5,
    epochs: Annotated[int, typer.Option("--epochs", help="Fine-tuning epochs per cycle (default 1).")] = 1,
    train_last: Annotated[
        int, typer.Option("--train-last", help="Backbone stages fine-tuned, plus the head (default 1).")
    ] = 1,
    lr: Annotated[float | None, typer.Option("--lr", help="Fine-tuning learning rate (default: the run's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per CAM batch (default 16).")] = 16,
    device: DeviceOpt = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar (default: shown).")] = False,
) -> None:
    """CAM-guided enhancement cycles: explain, enhance, fine-tune, evaluate; one table row per cycle."""
    from xraylens.cycle.run import cycle_run, format_table

    rows = cycle_run(
        run,
        data,
        lung_model,
        out,
        cycles=cycles,
        method=method,
        emphasis=emphasis,
        restrict_to_lungs=restrict_to_lungs,
        strength=strength,
        epochs=epochs,
        train_last=train_last,
        lr=lr,
        device=device,
        batch_size=batch_size,
        progress=not quiet,
    )
    typer.echo(format_table(rows))
    typer.echo(f"wrote {out / 'cycles.csv'}")


@app.command()
def crossval(
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Class folders or CSV manifest; all splits pooled (default: the --config's)."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Output folder: MODE/fold-K runs, folds/, crossval.csv (default crossval).")
    ] = Path("crossval"),
    folds: Annotated[int, typer.Option("--folds", help="Folds, stratified and grouped by patient (default 5).")] = 5,
    modes: Annotated[
        str, typer.Option("--modes", help="Comma list of none, early, late, clinical-only (default: all four).")
    ] = "none,early,late,clinical-only",
    clinical: Annotated[
        Path | None, typer.Option("--clinical", help="Clinical CSV, one row per image or patient (default: none).")
    ] = None,
    clinical_cols: Annotated[
        str | None,
        typer.Option("--clinical-cols", help="Comma list of clinical columns (name:num / name:cat; default: none)."),
    ] = None,
    clinical_key: Annotated[
        str | None,
        typer.Option("--clinical-key", help="CSV column matching an image's path, file name or stem (default: none)."),
    ] = None,
    clinical_from_name: Annotated[
        str | None,
        typer.Option("--clinical-from-name", help="Regex with named groups over file names (default: none)."),
    ] = None,
    allow_leaky_column: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-leaky-column", help="Let this column past the leakage guard (repeatable; default: none)."
        ),
    ] = None,
    merge_classes: Annotated[
        str | None,
        typer.Option(
            "--merge-classes",
            help="Merge classes, e.g. 'abnormal=osteopenia,osteoporosis' (several joined by ';'; default: none).",
        ),
    ] = None,
    group_pattern: Annotated[
        str | None,
        typer.Option("--group-pattern", help="Regex on the file name giving the patient (default: one per image)."),
    ] = None,
    group_column: Annotated[
        str | None, typer.Option("--group-column", help="Manifest column naming the patient (default: none).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help=f"Model name, see `xraylens models` (default {_D.model.name}).")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help=f"Epochs per run (default {_D.train.epochs}).")] = None,
    image_size: Annotated[
        str | None,
        typer.Option("--image-size", help=f"One side or HxW, e.g. 96 or 704x407 (default {_D.data.image_size})."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help=f"Images per optimiser step (default {_D.train.batch_size}).")
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option("--augment", help=f"As for train, e.g. cat_elastic (default {_D.data.augment})."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the fold assignment (training uses train.seed; default 0).")
    ] = 0,
    device: Annotated[
        str | None, typer.Option("--device", help=f"auto, cpu, cuda or cuda:N (default {_D.train.device}).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML config the runs start from (default: built-in defaults).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any setting, e.g. --set train.lr=3e-4 (repeatable; default: none)."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", help="No per-epoch or per-fold log lines (default: shown).")
    ] = False,
) -> None:
    """Cross-validate fusion modes: patient-grouped stratified folds, one run per mode and fold
    (resumable), and a table of mean ± sd accuracy, F1, F2 and AUC (crossval.csv)."""
    from xraylens.crossval import crossval as run_crossval
    from xraylens.crossval import format_table

    flags = {
        "data.path": data,
        "data.merge_classes": merge_classes,
        "data.group_pattern": group_pattern,
        "data.group_column": group_column,
        "data.image_size": image_size,
        "data.augment": augment,
        "model.name": model,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "train.device": device,
        "clinical.file": clinical,
        "clinical.cols": clinical_cols,
        "clinical.key": clinical_key,
        "clinical.from_name": clinical_from_name,
        "clinical.allow_leaky": allow_leaky_column,
    }
    cfg = (RunConfig.load(config) if config else RunConfig()).apply(flags).override(list(set_ or []))
    if quiet:  # the table only: no per-epoch or per-fold log lines
        logging.getLogger("xraylens").setLevel(logging.WARNING)
    result = run_crossval(cfg, out, folds=folds, modes=modes, seed=seed)
    typer.echo(format_table(result.table))
    typer.echo(f"wrote {out / 'crossval.csv'} and {out / 'crossval-folds.csv'}")


@app.command()
def sanity(
    run: RunArg,
    data: DataOpt = None,
    split: Annotated[
        str, typer.Option("--split", help="Split of --data whose images are explained (default test).")
    ] = "test",
    methods: MethodsOpt = "gradcam",
    layers: LayersOpt = None,
    combine: CombineOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="Images, spread evenly over the split (default 64).")] = 64,
    independent: Annotated[
        bool,
        typer.Option("--independent/--no-independent", help="Also randomise one unit at a time (default: on)."),
    ] = True,
    label_randomization: Annotated[
        bool,
        typer.Option(
            "--label-randomization",
            help="Also retrain the run on shuffled training labels and compare its maps (default: off).",
        ),
    ] = False,
    label_epochs: Annotated[
        int | None,
        typer.Option("--label-epochs", help="Epochs of the shuffled-label retraining (default: the run's)."),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            help="PASS when the mean Spearman of trained vs fully randomised maps is below this (default 0.5).",
        ),
    ] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the re-initialisation (default 0).")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: RUN/sanity).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per engine pass (default 16).")] = 16,
    device: DeviceOpt = "auto",
) -> None:
    """Model-randomisation sanity check (Adebayo et al. 2018): do the maps change when the weights go?"""
    from xraylens.trust.sanity import sanity_run

    s = sanity_run(
        run,
        data=data,
        split=split,
        methods=methods,
        layers=_names(layers) if layers else None,
        combine=combine,
        limit=limit,
        independent=independent,
        label_randomization=label_randomization,
        label_epochs=label_epochs,
        threshold=threshold,
        seed=seed,
        out=out,
        device=device,
        batch_size=batch_size,
    )
    typer.echo(s.table())
    typer.echo(f"wrote {s.csv_path}, {s.json_path} and {len(s.plots)} plot(s) in {s.out}")


@app.command()
def audit(
    run: RunArg,
    data: DataOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split of --data to audit (default test).")] = "test",
    masks: Annotated[
        Path | None,
        typer.Option("--masks", help="Folder of lung mask PNGs (as `segment predict` writes; default: none)."),
    ] = None,
    methods: MethodsOpt = "gradcam,layercam",
    layers: LayersOpt = None,
    combine: CombineOpt = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Images, spread evenly over the split (default: all).")
    ] = None,
    border: Annotated[
        float, typer.Option("--border", help="Edge band width, a fraction of the side (default 0.1).")
    ] = 0.1,
    corner: Annotated[
        float, typer.Option("--corner", help="Corner square side, a fraction of the side (default 0.15).")
    ] = 0.15,
    flip_margin: Annotated[
        float,
        typer.Option(
            "--flip-margin",
            help="Flag a region whose blanking flips this much more of the predictions than its control (default 0.1).",
        ),
    ] = 0.1,
    energy_factor: Annotated[
        float,
        typer.Option(
            "--energy-factor", help="CAM energy is high at this multiple of the region's area share (default 2)."
        ),
    ] = 2.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the control regions' positions (default 0).")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: RUN/audit).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch (default 32).")] = 32,
    device: DeviceOpt = "auto",
) -> None:
    """Shortcut audit: CAM energy and occlusion flips at the border, the corners and the lungs."""
    from xraylens.trust.audit import audit_run

    s = audit_run(
        run,
        data=data,
        split=split,
        masks=masks,
        methods=methods,
        layers=_names(layers) if layers else None,
        combine=combine,
        limit=limit,
        border=border,
        corner=corner,
        flip_margin=flip_margin,
        energy_factor=energy_factor,
        seed=seed,
        out=out,
        device=device,
        batch_size=batch_size,
    )
    typer.echo(s.table())
    typer.echo(f"wrote {s.csv_path} and {s.json_path}")


def _describe_methods(command) -> None:
    """--help of every command with --methods lists the methods table's names (imports torch, so only
    when help is asked for)."""
    from xraylens.explain.methods import methods_help

    for sub in command.commands.values():
        for p in sub.params:
            if p.name == "methods":
                p.help = f"Comma list of CAM methods: {methods_help()}."


cache_app = typer.Typer(
    no_args_is_help=True,
    help="List or clear the decoded-image cache ($XRAYLENS_CACHE, "
    "default ~/.cache/xraylens; size limit $XRAYLENS_CACHE_MAX, default 20G).",
)
app.add_typer(cache_app, name="cache")
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Cache folder (default: $XRAYLENS_CACHE, else ~/.cache/xraylens; a config's data.cache_dir).",
    ),
]


@cache_app.command("list")
def cache_list(cache_dir: CacheDirOpt = None) -> None:
    """Entries, most recently used first, with the total and where the cache lives."""
    from xraylens.data.cache import cache_entries, cache_root, format_cache_table, resolve_max_bytes

    typer.echo(format_cache_table(cache_entries(cache_dir), cache_root(cache_dir), resolve_max_bytes()))


@cache_app.command("clear")
def cache_clear(
    cache_dir: CacheDirOpt = None,
    older_than: Annotated[
        str | None,
        typer.Option("--older-than", help="Only entries unused this long, e.g. 7d, 12h or 30m (default: every entry)."),
    ] = None,
) -> None:
    """Delete cache entries; they are decoded again when next needed. Live writers are left alone."""
    from xraylens.data.cache import cache_root, clear_cache, format_bytes, parse_age

    n, freed = clear_cache(cache_dir, older_than=parse_age(older_than) if older_than else None)
    typer.echo(f"removed {n} {'entry' if n == 1 else 'entries'} ({format_bytes(freed)}) from {cache_root(cache_dir)}")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a user mistake (ours or a malformed option) is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from xraylens.distributed import quiet_unless_main

    quiet_unless_main()  # under torchrun, rank 0 alone prints and logs
    args = sys.argv[1:] if argv is None else argv
    command = typer.main.get_command(app)
    if "--help" in args and len(args) > 1:
        _describe_methods(command)
    try:
        code = command.main(args=args, prog_name="xraylens", standalone_mode=False)
    except typer.Abort:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.TyperException as e:  # click's usage errors: unknown option, missing or malformed value
        message = " ".join(getattr(e, "format_message", e.__str__)().split())
        if not message:  # no arguments: click has printed the help already
            sys.exit(getattr(e, "exit_code", 2))
        ctx = getattr(e, "ctx", None)
        where = (
            f"xraylens {ctx.command_path.split(' ', 1)[1]} --help"
            if ctx and " " in ctx.command_path
            else "xraylens --help"
        )
        typer.echo(f"error: {message} (see {where})", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except XraylensError as e:
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
