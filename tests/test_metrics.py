import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from xraylens.errors import XraylensError
from xraylens.metrics import LEGACY_ALIASES, checked_score, compute_metrics, metric_selector


def _probs_for(pred, k, rng):
    """Random probabilities whose argmax is `pred`."""
    p = rng.uniform(0.0, 1.0, (len(pred), k))
    p[np.arange(len(pred)), pred] += 1.0
    return p / p.sum(1, keepdims=True)


def test_binary_hand_computed():
    # NORMAL=0, PNEUMONIA=1 (positive). TP=3, FN=1, FP=2, TN=4
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    p1 = np.where(pred == 1, 0.8, 0.2)
    m = compute_metrics(y, np.stack([1 - p1, p1], 1), ["NORMAL", "PNEUMONIA"], loss=0.3)
    assert m["confusion_matrix"] == [[4, 2], [1, 3]]
    assert m["positive"] == "PNEUMONIA"
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    prec, rec = 3 / 5, 3 / 4
    assert m["f2"] == pytest.approx(5 * prec * rec / (4 * prec + rec))
    assert m["f05"] == pytest.approx(1.25 * prec * rec / (0.25 * prec + rec))
    assert m["per_class"]["PNEUMONIA"]["precision"] == pytest.approx(prec)
    assert m["per_class"]["NORMAL"]["support"] == 6
    assert m["loss"] == 0.3
    json.dumps(m, allow_nan=False)  # plain, strict JSON


def test_binary_against_sklearn_and_positive_override():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    probs = rng.dirichlet([1, 1], 200)
    probs[:, 1] = np.clip(probs[:, 1] + 0.3 * y, 0, 1)
    probs[:, 0] = 1 - probs[:, 1]
    pred = probs.argmax(1)
    m = compute_metrics(y, probs, ["neg", "pos"])
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["f2"] == pytest.approx(skm.fbeta_score(y, pred, beta=2))
    assert m["f05"] == pytest.approx(skm.fbeta_score(y, pred, beta=0.5))
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    # class 0 as positive: sensitivity of 0 is the recall of 0, specificity is the recall of 1
    m0 = compute_metrics(y, probs, ["neg", "pos"], positive=0)
    assert m0["sensitivity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m0["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=1))
    assert m0["auc"] == pytest.approx(skm.roc_auc_score(y == 0, probs[:, 0]))


def test_multiclass_against_sklearn():
    rng = np.random.default_rng(1)
    k = 5  # KL grades
    y = rng.integers(0, k, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, k, 300))
    probs = _probs_for(pred, k, rng)
    probs[rng.random(300) < 0.05] = 1.0 / k  # some ties: argmax picks the first, like numpy
    pred = probs.argmax(1)
    m = compute_metrics(y, probs, [str(i) for i in range(k)])
    assert m["positive"] is None
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    for avg, suffix in (("weighted", "_weighted"), ("macro", "_macro")):
        assert m["precision" + suffix] == pytest.approx(skm.precision_score(y, pred, average=avg, zero_division=0))
        assert m["recall" + suffix] == pytest.approx(skm.recall_score(y, pred, average=avg, zero_division=0))
        assert m["f1" + suffix] == pytest.approx(skm.f1_score(y, pred, average=avg, zero_division=0))
    assert m["f2"] == pytest.approx(skm.fbeta_score(y, pred, beta=2, average="weighted"))
    assert m["f05"] == pytest.approx(skm.fbeta_score(y, pred, beta=0.5, average="weighted"))
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(k)).tolist()
    cm = np.array(m["confusion_matrix"])
    for c in range(k):
        tn = cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]
        spec = tn / (cm.sum() - cm[c].sum())
        assert m["per_class"][str(c)]["specificity"] == pytest.approx(spec)
        assert m["per_class"][str(c)]["sensitivity"] == pytest.approx(cm[c, c] / cm[c].sum())
    assert m["sensitivity"] == pytest.approx(m["recall_macro"])
    json.dumps(m, allow_nan=False)


def test_missing_class_gives_auc_none_with_reason_and_zero_division():
    y = np.array([0, 0, 1, 1])  # class 2 never occurs
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["auc"] is None and "c" in m["auc_note"]
    assert m["per_class"]["c"]["auc"] is None
    assert m["per_class"]["c"]["precision"] == 0.0  # predicted once, never right
    assert m["per_class"]["a"]["auc"] == pytest.approx(skm.roc_auc_score(y == 0, probs[:, 0]))
    one = compute_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.3, 0.7]]), ["n", "p"])
    assert one["auc"] is None and one["qwk"] is None and one["accuracy"] == 1.0
    json.dumps(one, allow_nan=False)


def test_input_errors():
    with pytest.raises(XraylensError):
        compute_metrics([0, 1], np.full((2, 3), 1 / 3), ["a", "b"])
    with pytest.raises(XraylensError):
        compute_metrics([0, 5], np.full((2, 2), 0.5), ["a", "b"])
    with pytest.raises(XraylensError):
        compute_metrics([], np.zeros((0, 2)), ["a", "b"])
    with pytest.raises(XraylensError):
        compute_metrics([0, 1], np.full((2, 2), 0.5), ["a", "b"], positive=2)
    with pytest.raises(XraylensError):
        compute_metrics([0.5, 1.0], np.full((2, 2), 0.5), ["a", "b"])
    assert compute_metrics(np.array([0.0, 1.0]), np.eye(2), ["a", "b"])["accuracy"] == 1.0


METRICS = {"accuracy": 0.8, "f2": 0.6, "f1": 0.7, "loss": 0.25, "auc": None, "qwk": 0.5}


@pytest.mark.parametrize(
    "expr,want",
    [
        ("accuracy", 0.8),
        ("loss", -0.25),
        ("1.5*f2+accuracy", 1.5 * 0.6 + 0.8),
        ("(f1 + f2) / 2", 0.65),
        ("accuracy - loss", 0.55),
        ("-loss", -0.25),
        ("2 * (qwk - 0.5) + 1", 1.0),
    ],
)
def test_selector_valid(expr, want):
    assert metric_selector(expr)(METRICS) == pytest.approx(want)


def test_selector_undefined_values_never_win():
    assert metric_selector("auc")(METRICS) == -math.inf
    assert metric_selector("accuracy / (qwk - 0.5)")(METRICS) == -math.inf


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "f3",
        "accuracy ** 2",
        "__import__('os')",
        "accuracy if f1 else f2",
        "f1 > 0.5",
        "abs(loss)",
        "accuracy.real",
        "'f1'",
        "f1; f2",
        "f1 +",
        "[f1]",
        "True + f1",
        "f1 % 2",
    ],
)
def test_selector_rejects(expr):
    with pytest.raises(XraylensError):
        metric_selector(expr)


def test_selector_on_real_metrics():
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]])
    m = compute_metrics(y, probs, ["n", "p"], loss=0.4)
    assert metric_selector("f05 + 2*sensitivity")(m) == pytest.approx(m["f05"] + 1.0)
    assert metric_selector("loss")(m) == pytest.approx(-0.4)


def _reference(y, probs, k):
    """Textbook formulas from raw counts, independent of sklearn (which compute_metrics now uses)."""
    pred = probs.argmax(1)
    n = len(y)
    cm = np.zeros((k, k), int)
    for t, q in zip(y, pred, strict=True):
        cm[t, q] += 1
    out = {"precision": [], "recall": [], "f1": [], "spec": [], "auc": []}
    for c in range(k):
        tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c].sum() - cm[c, c]
        tn = n - tp - fp - fn
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        out["precision"].append(p)
        out["recall"].append(r)
        out["f1"].append(2 * p * r / (p + r) if p + r else 0.0)
        out["spec"].append(tn / (tn + fp) if tn + fp else 0.0)
        pos, neg = probs[y == c, c], probs[y != c, c]
        # AUC = P(score of a positive > score of a negative), ties count half
        pairs = [(a > b) + 0.5 * (a == b) for a in pos for b in neg]
        out["auc"].append(float(np.mean(pairs)) if len(pos) and len(neg) else None)
    i = np.arange(k)
    w = (i[:, None] - i[None, :]) ** 2
    expected = np.outer(cm.sum(1), cm.sum(0)) / n
    out["qwk"] = 1 - (w * cm).sum() / (w * expected).sum()
    out["cm"] = cm
    out["support"] = cm.sum(1)
    return out


def test_multiclass_against_textbook_formulas_with_absent_and_unpredicted_classes():
    rng = np.random.default_rng(7)
    k, n = 5, 120
    y = rng.choice([0, 1, 2, 4], n)  # class 3 never occurs in y_true
    pred = np.where(rng.random(n) < 0.5, y, rng.choice([0, 1, 3], n))  # class 2 and 4 predicted only if right
    probs = _probs_for(pred, k, rng)
    ref = _reference(y, probs, k)
    m = compute_metrics(y, probs, list("abcde"))
    wts = ref["support"] / n
    for name in ("precision", "recall", "f1"):
        assert m[f"{name}_weighted"] == pytest.approx(float(np.dot(ref[name], wts)))
        assert m[f"{name}_macro"] == pytest.approx(float(np.mean(ref[name])))
        assert m[name] == m[f"{name}_weighted"]  # old key kept as a copy
        for c, cls in enumerate("abcde"):
            assert m["per_class"][cls][name] == pytest.approx(ref[name][c])
    assert m["specificity"] == pytest.approx(float(np.mean(ref["spec"])))
    assert m["qwk"] == pytest.approx(ref["qwk"])
    assert m["confusion_matrix"] == ref["cm"].tolist()
    assert m["per_class"]["d"]["precision"] == 0.0 and m["per_class"]["d"]["recall"] == 0.0
    assert m["auc"] is None and "d" in m["auc_note"]
    for c, cls in enumerate("abcde"):
        assert m["per_class"][cls]["auc"] == pytest.approx(ref["auc"][c])
    json.dumps(m, allow_nan=False)
    for v in (m["accuracy"], m["f1_weighted"], m["qwk"], m["per_class"]["a"]["auc"]):
        assert type(v) is float  # plain floats, not numpy scalars


def test_binary_auc_against_pair_counting_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    p1 = np.round(rng.random(60) * 0.5 + 0.4 * y, 1)  # coarse scores: many ties
    probs = np.stack([1 - p1, p1], 1)
    ref = _reference(y, probs, 2)
    m = compute_metrics(y, probs, ["n", "p"])
    assert m["auc"] == pytest.approx(ref["auc"][1])
    assert compute_metrics(y, probs, ["n", "p"], positive=0)["auc"] == pytest.approx(ref["auc"][0])


def test_nonfinite_probs_are_refused():
    probs = np.array([[0.5, 0.5], [np.nan, np.nan], [0.2, 0.8]])
    with pytest.raises(XraylensError, match="1 of 3 rows"):
        compute_metrics([0, 1, 1], probs, ["a", "b"])


def test_old_metric_names_select_the_weighted_metrics():
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    probs = _probs_for(np.array([0, 2, 2, 1, 1, 0, 2]), 3, np.random.default_rng(0))
    m = compute_metrics(y, probs, ["x", "y", "z"])
    assert set(LEGACY_ALIASES) == {"f1", "precision", "recall"}
    for old, new in LEGACY_ALIASES.items():
        assert m[old] == m[new]
        assert metric_selector(old)(m) == m[new]
        new_dict = {k: v for k, v in m.items() if k not in LEGACY_ALIASES}  # a reader that drops the copies
        assert metric_selector(old)(new_dict) == m[new]
        old_dict = {k: v for k, v in m.items() if k not in LEGACY_ALIASES.values()}  # metrics-*.json of before
        assert metric_selector(new)(old_dict) == m[new]
    assert metric_selector("f1 - f1_weighted")(m) == 0.0


@pytest.mark.parametrize(
    "expr",
    [
        "accuracy/0",
        "accuracy / (f1 - f1_weighted)",  # the same metric under both names
        "f2 / (qwk - qwk)",
        "1e999 * f2",
        "1e999 - 1e999 + f1",
        "1" + "0" * 400 + " * accuracy",  # int too large for a float
    ],
)
def test_selector_rejects_never_finite(expr):
    with pytest.raises(XraylensError, match="non-finite") as e:
        metric_selector(expr)
    assert repr(expr) in str(e.value)


@pytest.mark.parametrize(
    "expr",
    ["accuracy / (qwk - 0.5)", "f1_macro / (f1_weighted - f2)", "1 / accuracy", "accuracy / (1 - accuracy)"],
)
def test_selector_accepts_expressions_finite_somewhere(expr):
    metric_selector(expr)


def test_checked_score():
    sel = metric_selector("accuracy - loss")
    assert checked_score(sel, METRICS, epoch=1) == pytest.approx(0.55)
    assert checked_score(metric_selector("auc"), METRICS, epoch=1) == -math.inf  # undefined: never preferred
    assert checked_score(metric_selector("loss"), {"loss": math.inf}) == -math.inf  # diverged: worst, not wrong
    with pytest.raises(XraylensError, match=r"'accuracy\*loss' gave inf at epoch 3 \(from accuracy=0.8, loss=inf\)"):
        checked_score(metric_selector("accuracy*loss"), {"accuracy": 0.8, "loss": math.inf}, epoch=3)
    with pytest.raises(XraylensError, match="gave nan at epoch 2"):
        checked_score(metric_selector("accuracy*loss - loss"), {"accuracy": 0.8, "loss": math.inf}, epoch=2)
    # an old name shows the key it read; without an epoch the message has none
    with pytest.raises(XraylensError, match=r"^selector 'f1 \+ f2' gave inf \(from f1_weighted=inf, f2=0.5\);"):
        checked_score(metric_selector("f1 + f2"), {"f1_weighted": math.inf, "f2": 0.5})
