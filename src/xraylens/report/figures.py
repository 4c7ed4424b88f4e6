"""The report's figures: matplotlib (Agg, no pyplot state) drawn straight into PNG data URIs.

Every function returns a `data:image/png;base64,...` string, so the page needs no file beside it.
Curves come from a split's per-image probabilities (predictions-<split>.csv): binary runs show the
positive class, multi-class runs one-vs-rest per class plus a macro average.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

DPI = 110
# colour-blind-safe and print-friendly; baselines are drawn grey
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#f0e442", "#000000")
GREY = "#8c8c8c"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return png_uri(buf.getvalue())


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def label(text: object, width: int = 28) -> str:
    """A user string (class or method name) as matplotlib text: '$' would start mathtext, and a very
    long name would squeeze the plot (the tables beside the figure have it whole)."""
    t = str(text)
    t = t if len(t) <= width else t[: width - 1] + "…"
    return t.replace("$", r"\$")


def _style(ax, title: str | None = None) -> None:
    ax.grid(True, color="#e4e4e4", linewidth=0.7)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)
    if title:
        ax.set_title(title, fontsize=10)


def training_curves(history: Mapping[str, np.ndarray], best_epoch: int | None, select: str) -> str:
    """Loss (train, val) beside the selection score and the learning rate, the best epoch marked."""
    epoch = history["epoch"]
    marker = "o" if len(epoch) <= 40 else None
    fig = _figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    for key, name, colour in (("train_loss", "train loss", PALETTE[0]), ("val_loss", "val loss", PALETTE[1])):
        if key in history and np.isfinite(history[key]).any():
            ax1.plot(epoch, history[key], marker=marker, ms=3, lw=1.5, color=colour, label=name)
    _style(ax1, "Loss")
    ax1.set_xlabel("epoch", fontsize=9)
    score = history.get("score")
    if score is not None and np.isfinite(score).any():
        ax2.plot(epoch, score, marker=marker, ms=3, lw=1.5, color=PALETTE[2], label=f"score: {label(select)}")
    _style(ax2, "Selection score and learning rate")
    ax2.set_xlabel("epoch", fontsize=9)
    ax2.set_ylabel("score", fontsize=9)
    lr = history.get("lr")
    handles, labels = ax2.get_legend_handles_labels()
    if lr is not None and np.isfinite(lr).any():
        ax3 = ax2.twinx()
        ax3.plot(epoch, lr, ls="--", lw=1.2, color=GREY, label="learning rate")
        pos = lr[np.isfinite(lr) & (lr > 0)]
        if len(pos) and pos.max() / pos.min() > 20:  # a decayed schedule is unreadable on a linear axis
            ax3.set_yscale("log")
        ax3.set_ylabel("learning rate", fontsize=9, color=GREY)
        ax3.tick_params(labelsize=8, colors=GREY)
        ax3.spines["top"].set_visible(False)
        h, lab = ax3.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if best_epoch:
        for ax in (ax1, ax2):
            ax.axvline(best_epoch, color="#444444", ls=":", lw=1.2)
        if score is not None:
            hit = np.flatnonzero(epoch == best_epoch)
            if len(hit) and np.isfinite(score[hit[0]]):
                ax2.plot([best_epoch], [score[hit[0]]], marker="*", ms=12, color=PALETTE[4], ls="none")
        handles.append(_proxy_line())
        labels.append(f"best epoch {best_epoch}")
    if len(epoch) == 1:  # one point: keep the axis from collapsing onto it
        for ax in (ax1, ax2):
            ax.set_xlim(epoch[0] - 1, epoch[0] + 1)
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if ax1.lines:
        ax1.legend(fontsize=8, frameon=False)
    if handles:  # below the panel: the lr axis on the right leaves no free corner inside it
        ax2.legend(handles, labels, fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    return _uri(fig)


def _proxy_line():
    from matplotlib.lines import Line2D

    return Line2D([], [], color="#444444", ls=":", lw=1.2)


def confusion(cm: np.ndarray, classes: Sequence[str]) -> str:
    """Counts and row-normalised (recall per true class), side by side."""
    cm = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = min(5.0, 1.6 + 0.45 * k)
    fig = _figure(2 * side + 0.6, side)
    names = [label(c, 18) for c in classes]
    longest = max(map(len, names))
    rotate = 45 if longest * k > 24 else 0  # labels that would touch under their columns
    for ax, data, title, fmt in (
        (fig.add_subplot(1, 2, 1), cm, "Counts", "d"),
        (fig.add_subplot(1, 2, 2), norm, "Row-normalised (recall)", ".2f"),
    ):
        vmax = max(1, data.max()) if fmt == "d" else 1.0
        ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(k), names, fontsize=8, rotation=rotate, ha="right" if rotate else "center")
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_xlabel("predicted", fontsize=9)
        ax.set_ylabel("true", fontsize=9)
        if k <= 12:  # beyond that the numbers overlap; the table below has them
            for i in range(k):
                for j in range(k):
                    v = data[i, j]
                    ax.text(
                        j,
                        i,
                        format(v, fmt),
                        ha="center",
                        va="center",
                        fontsize=8 if k <= 6 else 6,
                        color="white" if v > 0.6 * vmax else "black",
                    )
    return _uri(fig)


def _one_vs_rest(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive: int | None):
    """(name, is_positive [N], score [N]) per curve: the positive class only for a binary run."""
    chosen = [positive] if positive is not None else range(len(classes))
    return [(classes[c], y == c, probs[:, c]) for c in chosen]


def roc(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive: int | None) -> str:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure(4.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color=GREY, lw=1, ls="--", label="chance")
    grid = np.linspace(0, 1, 201)
    tprs, aucs = [], []
    curves = _one_vs_rest(y, probs, classes, positive)
    for n, (name, is_pos, score) in enumerate(curves):
        if is_pos.all() or not is_pos.any():
            continue  # no positives or no negatives: no curve (the metrics say so)
        fpr, tpr, _ = roc_curve(is_pos, score)
        auc = float(roc_auc_score(is_pos, score))
        tprs.append(np.interp(grid, fpr, tpr))
        aucs.append(auc)
        lw = 2.0 if len(curves) == 1 else 1.0
        ax.plot(fpr, tpr, lw=lw, color=PALETTE[n % len(PALETTE)], label=f"{label(name)} (AUC {auc:.3f})")
    if len(curves) > 1 and tprs:
        ax.plot(grid, np.mean(tprs, 0), lw=2.4, color="black", label=f"macro (AUC {np.mean(aucs):.3f})")
    _style(ax, "ROC" + (f": {label(curves[0][0])} vs rest" if len(curves) == 1 else ", one vs rest"))
    ax.set_xlabel("false positive rate", fontsize=9)
    ax.set_ylabel("true positive rate", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return _uri(fig)


def precision_recall(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive: int | None) -> str:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = _figure(4.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    grid = np.linspace(0, 1, 201)
    precs, aps = [], []
    curves = _one_vs_rest(y, probs, classes, positive)
    for n, (name, is_pos, score) in enumerate(curves):
        if not is_pos.any():
            continue
        prec, rec, _ = precision_recall_curve(is_pos, score)
        ap = float(average_precision_score(is_pos, score))
        # interpolated precision (the best precision at this recall or more), for the macro mean
        order = np.argsort(rec)
        envelope = np.maximum.accumulate(prec[order][::-1])[::-1]
        precs.append(np.interp(grid, rec[order], envelope))
        aps.append(ap)
        colour = PALETTE[n % len(PALETTE)]
        ax.plot(rec, prec, lw=2.0 if len(curves) == 1 else 1.0, color=colour, label=f"{label(name)} (AP {ap:.3f})")
        if len(curves) == 1:
            ax.axhline(is_pos.mean(), color=GREY, lw=1, ls="--", label=f"chance ({is_pos.mean():.2f})")
    if len(curves) > 1 and precs:
        ax.plot(grid, np.mean(precs, 0), lw=2.4, color="black", label=f"macro (AP {np.mean(aps):.3f})")
    _style(ax, "Precision-recall" + (f": {label(curves[0][0])}" if len(curves) == 1 else ", one vs rest"))
    ax.set_xlabel("recall", fontsize=9)
    ax.set_ylabel("precision", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, frameon=False, loc="best")
    return _uri(fig)


def calibration(
    y: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive: int | None, bins: int = 10
) -> tuple[str, float]:
    """Reliability diagram and expected calibration error: the positive class's probability for a
    binary run, the top-label confidence (probability of the predicted class) otherwise."""
    if positive is not None:
        conf, correct = probs[:, positive], (y == positive).astype(np.float64)
        what, ylab = f"P({label(classes[positive])})", f"fraction {label(classes[positive])}"
    else:
        conf, correct = probs.max(1), (probs.argmax(1) == y).astype(np.float64)
        what, ylab = "confidence of the predicted class", "accuracy"
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    mean_conf = np.bincount(idx, conf, bins) / np.maximum(count, 1)
    frac = np.bincount(idx, correct, bins) / np.maximum(count, 1)
    ece = float(np.sum(count / max(1, len(conf)) * np.abs(frac - mean_conf)))
    fig = _figure(4.4, 3.8)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color=GREY, lw=1, ls="--", label="perfectly calibrated")
    used = count > 0
    top.plot(mean_conf[used], frac[used], marker="o", ms=4, lw=1.6, color=PALETTE[0], label=f"model (ECE {ece:.3f})")
    _style(top, "Calibration")
    top.set_ylabel(ylab, fontsize=9)
    top.set_ylim(0, 1.01)
    top.legend(fontsize=7, frameon=False, loc="upper left")
    bottom.bar(edges[:-1], count, width=1 / bins, align="edge", color=PALETTE[5], edgecolor="white")
    _style(bottom)
    bottom.set_ylabel("images", fontsize=8)
    bottom.set_xlabel(what, fontsize=9)
    bottom.set_xlim(0, 1)
    return _uri(fig), ece


def pointing_game_bars(accuracy: Mapping[str, float | None], baselines: Sequence[str]) -> str:
    """Pointing-game accuracy per method, the baselines grey."""
    names = [m for m in accuracy if accuracy[m] is not None and math.isfinite(accuracy[m])]
    fig = _figure(6.0, 0.9 + 0.32 * max(1, len(names)))
    ax = fig.add_subplot(1, 1, 1)
    values = [accuracy[m] for m in names]
    colours = [GREY if m in baselines else PALETTE[0] for m in names]
    pos = np.arange(len(names))[::-1]
    ax.barh(pos, values, color=colours, height=0.6)
    for p, v in zip(pos, values, strict=True):
        ax.text(min(v + 0.01, 0.93), p, f"{v:.3f}", va="center", fontsize=8)
    ax.set_yticks(pos, [label(m) for m in names], fontsize=8)
    ax.set_xlim(0, 1)
    _style(ax, "Pointing game (all annotated images)")
    ax.set_xlabel("accuracy (peak inside an annotation)", fontsize=9)
    return _uri(fig)


def embed_png(path: Path, max_width: int = 1100, max_bytes: int = 300_000) -> str:
    """A PNG file as a data URI, kept small: above `max_bytes` it is stored with a 256-colour palette,
    at its own width or shrunk to `max_width` (about the page's width), whichever file is smaller. A
    36-tile CAM grid drops from 0.5-2 MB to 0.2-0.6 MB, its tiles' titles still legible. (Shrinking
    alone can grow a file: tiles upsampled from small inputs are blocky and compress well.)"""
    from PIL import Image

    data = path.read_bytes()
    if len(data) <= max_bytes:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # a truncated file is reported by the caller, not embedded broken
        return png_uri(data)
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    candidates = [rgb]
    if rgb.width > max_width:
        candidates.append(rgb.resize((max_width, round(rgb.height * max_width / rgb.width)), Image.Resampling.LANCZOS))
    encoded = []
    for c in candidates:
        buf = io.BytesIO()
        c.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buf, format="PNG", optimize=True
        )
        encoded.append(buf.getvalue())
    return png_uri(min(encoded, key=len))


def fold_scores(series: Mapping[str, Mapping[str, Sequence[float]]], metrics: Sequence[tuple[str, str]]) -> str:
    """One panel per metric: each mode's per-fold figures as dots and their mean as a bar (crossval)."""
    fig = _figure(min(12.0, 2.2 + 2.6 * len(metrics)), 3.4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    names = list(series)
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for i, name in enumerate(names):
            v = np.asarray(series[name].get(key, []), dtype=np.float64)
            v = v[np.isfinite(v)]
            if not len(v):
                continue
            colour = PALETTE[i % len(PALETTE)]
            ax.bar(i, v.mean(), width=0.6, color=colour, alpha=0.35)
            ax.plot(np.full(len(v), i) + np.linspace(-0.12, 0.12, len(v)), v, "o", ms=4, color=colour)
        ax.set_xticks(range(len(names)), [label(n, 16) for n in names], fontsize=8, rotation=30, ha="right")
        ax.set_ylim(0, 1.02)
        _style(ax, label(title))
    return _uri(fig)
