"""Classification metrics for every workflow, and the selector that picks the best epoch.

`compute_metrics` returns one flat, JSON-serialisable dict (plain floats / ints / None / lists):

  accuracy
  precision, recall, f1                      weighted by support (sklearn average="weighted")
  precision_macro, recall_macro, f1_macro    unweighted mean over classes
  f05, f2     binary: of the positive class; multi-class: weighted by support
  sensitivity, specificity
              binary: of the positive class; multi-class: macro mean of one-vs-rest values
              (per-class values are in per_class)
  qwk         quadratic weighted Cohen kappa over the class indices (ordinal grades, e.g. KL 0-4)
  auc         binary: ROC AUC of the positive-class probability; multi-class: one-vs-rest macro.
              None when a class is missing from y_true, with the reason in auc_note
  loss        as passed in (None if not given)
  confusion_matrix   rows = true class, columns = predicted class
  per_class   {class name: precision, recall, f1, sensitivity, specificity, auc, support}

Undefined ratios (no predicted / no true samples) count as 0.0, like sklearn's zero_division=0.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from xraylens.errors import XraylensError

# names metric_selector understands; each is a top-level key of compute_metrics' result
SELECTABLE = (
    "accuracy",
    "f1",
    "f1_macro",
    "qwk",
    "auc",
    "f2",
    "f05",
    "sensitivity",
    "specificity",
    "precision",
    "recall",
    "precision_macro",
    "recall_macro",
    "loss",
)


def _div(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)


def _fbeta(p: np.ndarray, r: np.ndarray, beta: float) -> np.ndarray:
    b2 = beta * beta
    return _div((1 + b2) * p * r, b2 * p + r)


def _auc_binary(is_pos: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney ROC AUC with tie-averaged ranks (equal to sklearn's roc_auc_score)."""
    from scipy.stats import rankdata

    n_pos = int(is_pos.sum())
    n_neg = is_pos.size - n_pos
    ranks = rankdata(score)  # average ranks for ties, like the trapezoid ROC
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _qwk(cm: np.ndarray) -> float | None:
    k = cm.shape[0]
    n = cm.sum()
    idx = np.arange(k, dtype=np.float64)
    w = (idx[:, None] - idx[None, :]) ** 2 / max((k - 1) ** 2, 1)
    expected = np.outer(cm.sum(1), cm.sum(0)) / n
    denom = float((w * expected).sum())
    if denom == 0.0:
        return None  # every sample in one class for both truth and prediction: kappa is undefined
    return float(1.0 - (w * cm).sum() / denom)


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: Sequence[Sequence[float]] | np.ndarray,
    classes: Sequence[str],
    *,
    positive: int | None = None,
    loss: float | None = None,
) -> dict[str, Any]:
    """All metrics for predicted class probabilities `probs` [N, K] against labels `y_true` [N]."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0]:
        raise XraylensError(f"metrics need y_true [N] and probs [N, K]; got shapes {y.shape} and {p.shape}")
    if p.shape[1] != k:
        raise XraylensError(
            f"probs has {p.shape[1]} columns but {k} classes were given; pass one name per output"
        )
    if y.size == 0:
        raise XraylensError("no samples to score; check that the evaluated split is not empty")
    if k < 2:
        raise XraylensError(f"metrics need at least 2 classes, got {k}")
    if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
        y = y.astype(np.int64)  # labels that went through a float tensor are still indices
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
        raise XraylensError(
            f"y_true must hold class indices 0..{k - 1}; got values {np.unique(y)[:10].tolist()}"
        )
    binary = k == 2
    if positive is None:
        positive = k - 1  # e.g. [NORMAL, PNEUMONIA] -> PNEUMONIA
    if not 0 <= positive < k:
        raise XraylensError(f"positive class index {positive} is out of range for {k} classes")

    y = y.astype(np.int64)
    pred = p.argmax(1)
    n = y.size
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)

    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)  # true count per class
    predicted = cm.sum(0).astype(np.float64)
    fp, fn = predicted - tp, support - tp
    tn = n - tp - fp - fn
    prec, rec = _div(tp, predicted), _div(tp, support)
    f1 = _fbeta(prec, rec, 1.0)
    f05_c, f2_c = _fbeta(prec, rec, 0.5), _fbeta(prec, rec, 2.0)
    spec = _div(tn, tn + fp)
    wts = support / n

    present = support > 0
    auc_c: list[float | None] = []
    for c in range(k):
        ok = present[c] and support[c] < n  # need both positives and negatives
        auc_c.append(_auc_binary(y == c, p[:, c]) if ok else None)
    auc_note = None
    if binary:
        auc = auc_c[positive]
    else:
        auc = float(np.mean(auc_c)) if all(a is not None for a in auc_c) else None
    if auc is None:
        missing = [str(classes[c]) for c in range(k) if not present[c]]
        auc_note = (
            f"ROC AUC undefined: no samples of class(es) {', '.join(missing)} in y_true"
            if missing
            else "ROC AUC undefined: y_true holds a single class"
        )

    out: dict[str, Any] = {
        "n": int(n),
        "classes": [str(c) for c in classes],
        "positive": str(classes[positive]) if binary else None,
        "accuracy": float(tp.sum() / n),
        "precision": float((prec * wts).sum()),
        "recall": float((rec * wts).sum()),
        "f1": float((f1 * wts).sum()),
        "precision_macro": float(prec.mean()),
        "recall_macro": float(rec.mean()),
        "f1_macro": float(f1.mean()),
        "f05": float(f05_c[positive] if binary else (f05_c * wts).sum()),
        "f2": float(f2_c[positive] if binary else (f2_c * wts).sum()),
        "sensitivity": float(rec[positive] if binary else rec.mean()),
        "specificity": float(spec[positive] if binary else spec.mean()),
        "qwk": _qwk(cm),
        "auc": auc,
        "auc_note": auc_note,
        "loss": None if loss is None else float(loss),
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": {
            str(classes[c]): {
                "precision": float(prec[c]),
                "recall": float(rec[c]),
                "f1": float(f1[c]),
                "sensitivity": float(rec[c]),
                "specificity": float(spec[c]),
                "auc": auc_c[c],
                "support": int(support[c]),
            }
            for c in range(k)
        },
    }
    return out


# ---------------------------------------------------------------------------- best-epoch selector

_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNOPS: dict[type, Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _check(node: ast.AST, expr: str) -> None:
    """Reject anything but numbers, known metric names, + - * / and parentheses."""
    if isinstance(node, ast.Expression):
        _check(node.body, expr)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        _check(node.left, expr)
        _check(node.right, expr)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        _check(node.operand, expr)
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        pass
    elif isinstance(node, ast.Name):
        if node.id not in SELECTABLE:
            raise XraylensError(
                f"unknown metric {node.id!r} in selector {expr!r}; use {', '.join(SELECTABLE)}"
            )
    else:
        raise XraylensError(
            f"selector {expr!r} may only use numbers, metric names, + - * / and parentheses "
            f"(found {type(node).__name__}); e.g. '1.5*f2+accuracy'"
        )


def _eval(node: ast.AST, values: dict[str, float]) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body, values)
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval(node.left, values), _eval(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNOPS[type(node.op)](_eval(node.operand, values))
    if isinstance(node, ast.Constant):
        return float(node.value)
    assert isinstance(node, ast.Name)
    return values[node.id]


def metric_selector(expr: str) -> Callable[[dict[str, Any]], float]:
    """A score to maximise when choosing the best epoch.

    `expr` is a metric name or an arithmetic expression over names (`1.5*f2+accuracy`). The bare name
    `loss` means "lower is better" and scores -loss; inside an expression every name is its raw value
    (write `accuracy - loss`). An undefined metric (None, e.g. auc with a missing class) or a division
    by zero scores -inf, so such an epoch is never preferred.
    """
    text = (expr or "").strip()
    if not text:
        raise XraylensError(
            f"empty metric selector; use a name ({', '.join(SELECTABLE)}) or e.g. '1.5*f2+accuracy'"
        )
    if text == "loss":
        text = "-loss"
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise XraylensError(
            f"cannot parse selector {expr!r} ({e.msg}); use e.g. 'f1' or '1.5*f2+accuracy'"
        ) from None
    _check(tree, expr)
    names = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)})

    def select(metrics: dict[str, Any]) -> float:
        values: dict[str, float] = {}
        for name in names:
            if name not in metrics:
                raise XraylensError(f"metric {name!r} used by selector {expr!r} is missing from the metrics")
            v = metrics[name]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return -math.inf
            values[name] = float(v)
        try:
            return float(_eval(tree, values))
        except ZeroDivisionError:
            return -math.inf

    select.expr = expr  # type: ignore[attr-defined]  # for logs: which rule picked the epoch
    return select
