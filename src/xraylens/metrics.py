"""Classification metrics for every workflow, and the selector that picks the best epoch.

`compute_metrics` returns one flat, JSON-serialisable dict (plain floats / ints / None / lists):

  accuracy
  precision_weighted, recall_weighted, f1_weighted
              mean over classes weighted by support (sklearn average="weighted")
  precision_macro, recall_macro, f1_macro    unweighted mean over classes
  f05, f2     binary: of the positive class; multi-class: weighted by support
  sensitivity, specificity
              binary: of the positive class; multi-class: macro mean of one-vs-rest values
              (per-class values are in per_class)
  qwk         quadratic weighted Cohen kappa over the class indices (ordinal grades, e.g. KL 0-4);
              None when undefined (truth and prediction all one class)
  auc         binary: ROC AUC of the positive-class probability; multi-class: one-vs-rest macro.
              None when a class is missing from y_true, with the reason in auc_note
  loss        as passed in (None if not given)
  confusion_matrix   rows = true class, columns = predicted class
  per_class   {class name: precision, recall, f1, sensitivity, specificity, auc, support}

Undefined ratios (no predicted / no true samples) count as 0.0, like sklearn's zero_division=0.
The maths is scikit-learn's; only specificity (not in sklearn) is read off the confusion matrix.

Old names. Until the `_weighted` keys existed the support-weighted values were called `precision`,
`recall` and `f1`, easy to misread as the binary positive-class scores. The result dict still carries
those three keys, with the same values (LEGACY_ALIASES), so scripts and metrics-*.json readers written
against the old names keep working on new files; read the `_weighted` keys in new code.
`metric_selector` accepts the old names too (`select: f1` in an old config means f1_weighted) and
falls back to the old key when scoring a dict written before the rename.
"""

from __future__ import annotations

import ast
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from xraylens.errors import XraylensError

# names metric_selector understands; each is a top-level key of compute_metrics' result
SELECTABLE = (
    "accuracy",
    "f1_weighted",
    "f1_macro",
    "qwk",
    "auc",
    "f2",
    "f05",
    "sensitivity",
    "specificity",
    "precision_weighted",
    "recall_weighted",
    "precision_macro",
    "recall_macro",
    "loss",
)

# old name -> current name; the result dict keeps the old keys as copies (see module docstring)
LEGACY_ALIASES = {"precision": "precision_weighted", "recall": "recall_weighted", "f1": "f1_weighted"}


def _div(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)


def _qwk(y: np.ndarray, pred: np.ndarray, k: int) -> float | None:
    # sklearn>=1.4 (our floor) returns NaN with a warning when kappa is undefined; newer ones also
    # take replace_undefined_by, which 1.4 lacks, so map the NaN ourselves
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa = float(skm.cohen_kappa_score(y, pred, labels=np.arange(k), weights="quadratic"))
    return None if math.isnan(kappa) else kappa


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
        raise XraylensError(f"probs has {p.shape[1]} columns but {k} classes were given; pass one name per output")
    if y.size == 0:
        raise XraylensError("no samples to score; check that the evaluated split is not empty")
    if k < 2:
        raise XraylensError(f"metrics need at least 2 classes, got {k}")
    if not np.isfinite(p).all():
        # argmax and AUC of NaN scores would be meaningless numbers, and NaN breaks strict JSON
        bad = int((~np.isfinite(p)).any(1).sum())
        raise XraylensError(
            f"probs hold NaN or inf in {bad} of {p.shape[0]} rows: the model output diverged; "
            "lower train.lr or turn off train.amp"
        )
    if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
        y = y.astype(np.int64)  # labels that went through a float tensor are still indices
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
        raise XraylensError(f"y_true must hold class indices 0..{k - 1}; got values {np.unique(y)[:10].tolist()}")
    binary = k == 2
    if positive is None:
        positive = k - 1  # e.g. [NORMAL, PNEUMONIA] -> PNEUMONIA
    if not 0 <= positive < k:
        raise XraylensError(f"positive class index {positive} is out of range for {k} classes")

    y = y.astype(np.int64)
    pred = p.argmax(1)
    n = y.size
    labels = np.arange(k)  # every class, also those absent from y and pred, so shapes stay [K]
    cm = skm.confusion_matrix(y, pred, labels=labels)

    def prfs(beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return skm.precision_recall_fscore_support(y, pred, beta=beta, labels=labels, average=None, zero_division=0)

    prec, rec, f1, support_i = prfs(1.0)
    f05_c, f2_c = prfs(0.5)[2], prfs(2.0)[2]
    support = support_i.astype(np.float64)
    wts = support / n  # == sklearn average="weighted", without three more passes over the labels
    # specificity = TN / (TN + FP), the recall of "not c"; sklearn has no direct function for it
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    tn = n - support - fp
    spec = _div(tn, tn + fp)

    present = support > 0
    auc_c: list[float | None] = []
    for c in range(k):
        ok = present[c] and support[c] < n  # roc_auc_score needs both positives and negatives
        auc_c.append(float(skm.roc_auc_score(y == c, p[:, c])) if ok else None)
    auc_note = None
    if binary:
        auc = auc_c[positive]
    else:
        # mean of per-class binary AUCs == roc_auc_score(multi_class="ovr", average="macro"), without
        # its check that rows sum to 1 (float32 softmax rows may not, to its tolerance)
        auc = float(np.mean(auc_c)) if all(a is not None for a in auc_c) else None
    if auc is None:
        missing = [str(classes[c]) for c in range(k) if not present[c]]
        auc_note = (
            f"ROC AUC undefined: no samples of class(es) {', '.join(missing)} in y_true"
            if missing
            else "ROC AUC undefined: y_true holds a single class"
        )

    weighted = {
        "precision_weighted": float((prec * wts).sum()),
        "recall_weighted": float((rec * wts).sum()),
        "f1_weighted": float((f1 * wts).sum()),
    }
    out: dict[str, Any] = {
        "n": int(n),
        "classes": [str(c) for c in classes],
        "positive": str(classes[positive]) if binary else None,
        "accuracy": float(skm.accuracy_score(y, pred)),
        **weighted,
        **{old: weighted[new] for old, new in LEGACY_ALIASES.items()},
        "precision_macro": float(prec.mean()),
        "recall_macro": float(rec.mean()),
        "f1_macro": float(f1.mean()),
        "f05": float(f05_c[positive] if binary else (f05_c * wts).sum()),
        "f2": float(f2_c[positive] if binary else (f2_c * wts).sum()),
        "sensitivity": float(rec[positive] if binary else rec.mean()),
        "specificity": float(spec[positive] if binary else spec.mean()),
        "qwk": _qwk(y, pred, k),
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
        if node.id not in SELECTABLE and node.id not in LEGACY_ALIASES:
            raise XraylensError(f"unknown metric {node.id!r} in selector {expr!r}; use {', '.join(SELECTABLE)}")
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


def _probes() -> list[dict[str, float]]:
    """Metric values to try a selector on: all equal (0, 0.5, 1), and two mixes of distinct,
    irregular values so that e.g. `f1_macro/(f1_weighted-f2)` finds a point where it is finite."""
    mixes = [
        {nm: 0.05 + 0.9 * ((i + 1) * g % 1.0) for i, nm in enumerate(SELECTABLE)}
        for g in (0.6180339887, 0.4142135624)  # golden ratio, sqrt(2) - 1: no two metrics equal
    ]
    probes = [dict.fromkeys(SELECTABLE, v) for v in (0.5, 0.0, 1.0)] + mixes
    for values in probes:
        values.update({old: values[new] for old, new in LEGACY_ALIASES.items()})  # one metric, one value
    return probes


def _finite_somewhere(tree: ast.AST) -> bool:
    for values in _probes():
        try:
            if math.isfinite(_eval(tree, values)):
                return True
        except (ZeroDivisionError, OverflowError):
            pass
    return False


def metric_selector(expr: str) -> Callable[[dict[str, Any]], float]:
    """A score to maximise when choosing the best epoch.

    `expr` is a metric name or an arithmetic expression over names (`1.5*f2+accuracy`). The bare name
    `loss` means "lower is better" and scores -loss; inside an expression every name is its raw value
    (write `accuracy - loss`). The old names f1, precision, recall mean the `_weighted` metrics.

    An expression that is not finite for any metric values (`accuracy/0`, `1e999*f2`) is refused here.
    One that is finite in general scores -inf where a metric is undefined (None or NaN, e.g. auc with a
    missing class) or a denominator is zero, so such an epoch is never preferred; `checked_score`
    also refuses NaN and +inf results. The returned function carries `.expr` (as given).
    """
    text = (expr or "").strip()
    if not text:
        raise XraylensError(f"empty metric selector; use a name ({', '.join(SELECTABLE)}) or e.g. '1.5*f2+accuracy'")
    if text == "loss":
        text = "-loss"
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise XraylensError(
            f"cannot parse selector {expr!r} ({e.msg}); use e.g. 'f1_weighted' or '1.5*f2+accuracy'"
        ) from None
    _check(tree, expr)
    if not _finite_somewhere(tree):
        raise XraylensError(
            f"selector {expr!r} evaluates to a non-finite number (division by zero or overflow) for every "
            "metric value tried; fix train.select / --select, e.g. 'f1_weighted' or '1.5*f2+accuracy'"
        )
    names = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)})

    def select(metrics: dict[str, Any]) -> float:
        values: dict[str, float] = {}
        for name in names:
            key = _key_in(metrics, name)
            if key is None:
                raise XraylensError(f"metric {name!r} used by selector {expr!r} is missing from the metrics")
            v = metrics[key]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return -math.inf
            values[name] = float(v)
        try:
            return float(_eval(tree, values))
        except (ZeroDivisionError, OverflowError):
            return -math.inf

    select.expr = expr  # type: ignore[attr-defined]  # for logs: which rule picked the epoch
    select.names = tuple(names)  # type: ignore[attr-defined]  # for checked_score's message
    return select


def _key_in(metrics: dict[str, Any], name: str) -> str | None:
    """The key holding metric `name`: its current spelling first, then the other one, so old configs
    (`f1`) score new dicts and new names score dicts written before the rename."""
    current = LEGACY_ALIASES.get(name, name)
    olds = [old for old, new in LEGACY_ALIASES.items() if new == current]
    return next((key for key in (current, *olds) if key in metrics), None)


def checked_score(
    select: Callable[[dict[str, Any]], float], metrics: dict[str, Any], *, epoch: int | None = None
) -> float:
    """`select(metrics)` for one epoch, refusing a score that would corrupt the best-epoch choice.

    Returns a finite float, or -inf where the selector scores an epoch "never preferred" (undefined
    metric, zero denominator). Raises XraylensError on NaN (never compares, so the best epoch would
    depend on order) or +inf (would win every later comparison), e.g. `accuracy*loss` with an
    infinite loss. `epoch` (1-based) only goes into the message.
    """
    score = float(select(metrics))
    if math.isnan(score) or score == math.inf:
        expr = getattr(select, "expr", "?")
        at = "" if epoch is None else f" at epoch {epoch}"
        keys = [_key_in(metrics, name) for name in getattr(select, "names", ())]
        used = ", ".join(f"{key}={metrics[key]}" for key in keys if key is not None)
        raise XraylensError(
            f"selector {expr!r} gave {score}{at} (from {used}); change train.select / --select "
            "so it stays finite, e.g. 'f1_weighted' or 'accuracy - loss'"
        )
    return score


# ------------------------------------------------------------------- bootstrap confidence intervals
#
# Percentile bootstrap (Efron): resample the n images with replacement `reps` times, recompute the
# figure on each replicate, report the 2.5th and 97.5th percentiles. Vectorised: a replicate is a row
# of a counts matrix [reps, n] (how often each image was drawn), so means are one matrix product and
# confusion matrices one product with a one-hot of (true, pred); no Python loop per replicate. Rows
# are built in chunks of bounded size from one seeded generator, so the result depends only on the
# seed (not on the chunking). CheXlocalize (Saporta et al. 2022) reports the same intervals.

BOOTSTRAP_REPS = 1000
CI_LEVEL = 0.95
_CHUNK_CELLS = 2_000_000  # counts-matrix cells per chunk (16 MB of float64)

# evaluate's figures that get an interval; each becomes a `<name>_ci` key [low, high]
CI_METRICS = ("accuracy", "sensitivity", "specificity", "f1_weighted", "f1_macro", "qwk", "auc")


def bootstrap_indices(n: int, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> np.ndarray:
    """Resampling indices [reps, n] (int64, with replacement), reproducible from `seed`."""
    if n <= 0 or reps <= 0:
        raise XraylensError(f"bootstrap needs n > 0 samples and reps > 0 replicates, got n={n}, reps={reps}")
    return np.random.default_rng(seed).integers(0, n, size=(reps, n))


def _count_chunks(n: int, reps: int, seed: int, idx: np.ndarray | None = None):
    """Yield counts matrices [b, n] float64 (row r = how often each sample is in replicate r), chunk by
    chunk, either from given indices [reps, n] or drawn from `seed`."""
    if idx is not None:
        idx = np.asarray(idx)
        if idx.ndim != 2 or idx.shape[1] != n:
            raise XraylensError(f"bootstrap indices must be [reps, {n}], got {idx.shape}")
        reps = idx.shape[0]
    if n <= 0 or reps <= 0:
        raise XraylensError(f"bootstrap needs n > 0 samples and reps > 0 replicates, got n={n}, reps={reps}")
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK_CELLS // n)
    for lo in range(0, reps, step):
        b = min(step, reps - lo)
        ix = idx[lo : lo + b] if idx is not None else rng.integers(0, n, size=(b, n))
        flat = (np.arange(b, dtype=np.int64)[:, None] * n + ix).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def percentile_interval(stats: np.ndarray, level: float = CI_LEVEL) -> list[float] | None:
    """[low, high] percentile interval of the finite replicate values; None if none is finite (e.g. an
    AUC undefined in every replicate)."""
    s = np.asarray(stats, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    lo, hi = np.percentile(s, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return [float(lo), float(hi)]


def bootstrap_means(
    values: np.ndarray | Sequence[float],
    *,
    reps: int = BOOTSTRAP_REPS,
    seed: int = 0,
    idx: np.ndarray | None = None,
) -> np.ndarray:
    """Bootstrap replicates of the mean: values [n] -> [reps], or [m, n] -> [m, reps] with the SAME
    resampling for every row (paired: e.g. a model and a second reader on the same images).

    NaN marks a sample that does not count (an image without annotation): each replicate redraws all n
    samples and averages its non-NaN ones, so the number counted varies as in a new sample (CheXlocalize
    averages with pandas' NaN-skipping mean). A replicate with nothing to average is NaN."""
    v = np.asarray(values, dtype=np.float64)
    one = v.ndim == 1
    v = np.atleast_2d(v)
    ok = np.isfinite(v)
    vz = np.where(ok, v, 0.0)
    out = []
    for w in _count_chunks(v.shape[1], reps, seed, idx):
        s, c = vz @ w.T, ok.astype(np.float64) @ w.T  # [m, b]
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(np.where(c > 0, s / np.where(c > 0, c, 1.0), np.nan))
    res = np.concatenate(out, axis=1)
    return res[0] if one else res


def bootstrap_mean_ci(
    values: np.ndarray | Sequence[float],
    *,
    reps: int = BOOTSTRAP_REPS,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> list[float] | None:
    """95 % (by default) percentile interval of the NaN-skipping mean of `values`; None when no value
    is finite."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or not np.isfinite(v).any():
        return None
    return percentile_interval(bootstrap_means(v, reps=reps, seed=seed), level)


def _auc_weighted(w: np.ndarray, scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of sample weights w [b, n] (bootstrap counts): P(score_pos > score_neg)
    + 0.5 P(tie), from one global sort and per-tie-group sums (Mann-Whitney), NaN without both classes."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ws = w[:, order]
    pos = positive[order].astype(np.float64)
    p = np.add.reduceat(ws * pos, starts, axis=1)  # [b, groups]
    q = np.add.reduceat(ws * (1.0 - pos), starts, axis=1)
    below = np.cumsum(q, axis=1) - q
    num = (p * (below + 0.5 * q)).sum(1)
    den = p.sum(1) * q.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def classification_stats(
    w: np.ndarray, y: np.ndarray, probs: np.ndarray, positive: int | None = None
) -> dict[str, np.ndarray]:
    """The CI_METRICS for each row of sample weights w [b, n] (w = ones gives `compute_metrics`' values;
    tested). Same conventions: undefined ratios 0, binary figures of the positive class, multi-class
    sensitivity/specificity macro means, QWK and AUC NaN where undefined."""
    y = np.asarray(y).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    n, k = p.shape
    positive = k - 1 if positive is None else positive
    pred = p.argmax(1)
    onehot = np.zeros((n, k * k))
    onehot[np.arange(n), y * k + pred] = 1.0
    cm = (w @ onehot).reshape(-1, k, k)  # [b, true, pred]
    tot = cm.sum((1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(2), cm.sum(1)
    fp, fn = predicted - tp, support - tp
    tn = tot[:, None] - support - fp
    rec, spec = _div(tp, support), _div(tn, tn + fp)
    f1 = _div(2 * tp, 2 * tp + fp + fn)
    out = {
        "accuracy": _div(tp.sum(1), tot),
        "f1_weighted": (f1 * _div(support, tot[:, None])).sum(1),
        "f1_macro": f1.mean(1),
        "sensitivity": rec[:, positive] if k == 2 else rec.mean(1),
        "specificity": spec[:, positive] if k == 2 else spec.mean(1),
    }
    ii, jj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    wq = (ii - jj) ** 2 / float((k - 1) ** 2)
    expected = support[:, :, None] * predicted[:, None, :] / np.where(tot > 0, tot, 1.0)[:, None, None]
    den = (wq * expected).sum((1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["qwk"] = np.where(den > 0, 1.0 - (wq * cm).sum((1, 2)) / np.where(den > 0, den, 1.0), np.nan)
    if k == 2:
        out["auc"] = _auc_weighted(w, p[:, positive], y == positive)
    else:  # macro one-vs-rest: undefined when any class lacks positives or negatives in the replicate
        out["auc"] = np.mean([_auc_weighted(w, p[:, c], y == c) for c in range(k)], axis=0)
    return out


def bootstrap_classification(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    *,
    positive: int | None = None,
    reps: int = BOOTSTRAP_REPS,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict[str, Any]:
    """`<metric>_ci` = [low, high] (or None where undefined in every replicate) for each of CI_METRICS,
    plus `ci` describing the method, to merge into `compute_metrics`' result."""
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    reps_stats: dict[str, list[np.ndarray]] = {m: [] for m in CI_METRICS}
    for w in _count_chunks(y.size, reps, seed):
        for m, v in classification_stats(w, y, p, positive).items():
            reps_stats[m].append(v)
    out: dict[str, Any] = {f"{m}_ci": percentile_interval(np.concatenate(v), level) for m, v in reps_stats.items()}
    out["ci"] = {"method": "percentile bootstrap over images", "level": level, "replicates": reps, "seed": seed}
    return out


def format_ci(value: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    """'0.912 [0.884, 0.937]' (value only when there is no interval; '-' when there is no value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    if ci:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text
