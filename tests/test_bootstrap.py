"""Bootstrap confidence intervals: vectorised replicates equal the loop definition, intervals are
reproducible from the seed and cover the true value about 95 % of the time on simulated data, and
`evaluate` shows them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm
from typer.testing import CliRunner

from xraylens.errors import XraylensError
from xraylens.metrics import (
    CI_METRICS,
    bootstrap_classification,
    bootstrap_indices,
    bootstrap_mean_ci,
    bootstrap_means,
    classification_stats,
    compute_metrics,
    format_ci,
    percentile_interval,
)


def test_replicates_equal_the_loop_definition_and_skip_nan():
    rng = np.random.default_rng(0)
    v = rng.random(50)
    v[[3, 17, 40]] = np.nan  # images that do not count
    idx = bootstrap_indices(v.size, reps=200, seed=5)
    fast = bootstrap_means(v, idx=idx)
    slow = np.array([np.nanmean(v[row]) if np.isfinite(v[row]).any() else np.nan for row in idx])
    np.testing.assert_allclose(fast, slow)
    # paired rows share the resampling
    two = bootstrap_means(np.stack([v, 2 * v]), idx=idx)
    np.testing.assert_allclose(two[1], 2 * two[0])
    # nothing finite: no interval
    assert bootstrap_mean_ci([np.nan, np.nan]) is None
    assert percentile_interval(np.array([np.nan])) is None
    with pytest.raises(XraylensError, match="reps"):
        bootstrap_indices(10, reps=0)


def test_reproducible_with_a_seed():
    v = np.random.default_rng(1).random(300)
    a = bootstrap_mean_ci(v, seed=7)
    assert a == bootstrap_mean_ci(v, seed=7)
    assert a != bootstrap_mean_ci(v, seed=8)
    assert a[0] < v.mean() < a[1]
    y = np.random.default_rng(2).integers(0, 2, 200)
    p = np.random.default_rng(3).random((200, 2))
    assert bootstrap_classification(y, p, seed=4) == bootstrap_classification(y, p, seed=4)


def test_mean_interval_covers_the_true_value_about_95_percent():
    """300 simulated data sets of 120 Bernoulli(0.7) hits: the 95 % interval holds 0.7 in ~95 %."""
    rng = np.random.default_rng(0)
    covered = 0
    trials = 300
    for t in range(trials):
        lo, hi = bootstrap_mean_ci((rng.random(120) < 0.7).astype(float), seed=t)
        covered += lo <= 0.7 <= hi
    assert 0.90 <= covered / trials <= 0.985, covered / trials


def test_auc_interval_covers_the_true_auc():
    """Binormal scores (negatives N(0, 1), positives N(1, 1)): true AUC = Phi(1 / sqrt 2) = 0.760."""
    true_auc = float(norm.cdf(1 / math.sqrt(2)))
    rng = np.random.default_rng(1)
    covered, trials = 0, 150
    for t in range(trials):
        y = rng.integers(0, 2, 150)
        s = rng.normal(y.astype(float), 1.0)
        p1 = 1 / (1 + np.exp(-s))
        ci = bootstrap_classification(y, np.stack([1 - p1, p1], 1), seed=t, reps=500)["auc_ci"]
        covered += ci[0] <= true_auc <= ci[1]
    assert 0.88 <= covered / trials <= 0.99, covered / trials


@pytest.mark.parametrize("k", [2, 3, 5])
def test_weighted_statistics_equal_compute_metrics(k):
    """Weights of ones give compute_metrics' values; bootstrap counts give the metrics of the
    resampled data set (the vectorised replicate is the resample)."""
    rng = np.random.default_rng(k)
    n = 400
    y = rng.integers(0, k, n)
    p = rng.random((n, k)) + np.eye(k)[y] * 0.3
    p = np.round(p / p.sum(1, keepdims=True), 2)  # ties in the scores
    names = [str(i) for i in range(k)]
    full = compute_metrics(y, p, names)
    ones = classification_stats(np.ones((1, n)), y, p)
    for m in CI_METRICS:
        assert ones[m][0] == pytest.approx(full[m]), m
    idx = bootstrap_indices(n, reps=3, seed=0)
    w = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)
    stats = classification_stats(w, y, p)
    for r, row in enumerate(idx):
        ref = compute_metrics(y[row], p[row], names)
        for m in CI_METRICS:
            if ref[m] is not None:
                assert stats[m][r] == pytest.approx(ref[m]), (m, r)


def test_intervals_bracket_the_estimate_and_format():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)
    p = rng.random((300, 3)) + np.eye(3)[y] * 0.5
    m = compute_metrics(y, p, ["a", "b", "c"])
    ci = bootstrap_classification(y, p)
    for k in CI_METRICS:
        lo, hi = ci[f"{k}_ci"]
        assert lo <= m[k] <= hi, k
    assert ci["ci"] == {"method": "percentile bootstrap over images", "level": 0.95, "replicates": 1000, "seed": 0}
    assert format_ci(0.91234, [0.884, 0.9371]) == "0.912 [0.884, 0.937]"
    assert format_ci(None, None) == "-"


def test_evaluate_cli_prints_and_writes_intervals(tiny_run, tmp_path):
    from xraylens.cli import app

    out = tmp_path / "ev"
    res = CliRunner().invoke(app, ["evaluate", str(tiny_run), "--split", "val", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    acc = next(ln for ln in res.output.splitlines() if ln.strip().startswith("accuracy"))
    assert "[" in acc and "]" in acc
    m = json.loads((out / "metrics-val.json").read_text())
    assert m["accuracy"] is not None and len(m["accuracy_ci"]) == 2
    assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
    assert m["ci"]["replicates"] == 1000
    rows = (out / "metrics-val.csv").read_text().splitlines()
    assert rows[0] == "metric,value,ci_low,ci_high"
    acc_row = next(r for r in rows if r.startswith("accuracy,")).split(",")
    assert float(acc_row[2]) == pytest.approx(m["accuracy_ci"][0], abs=1e-6)
    # --bootstrap 0: no intervals, old keys unchanged
    res0 = CliRunner().invoke(
        app, ["evaluate", str(tiny_run), "--split", "val", "--device", "cpu", "--out", str(out), "--bootstrap", "0"]
    )
    assert res0.exit_code == 0, res0.output
    m0 = json.loads((out / "metrics-val.json").read_text())
    assert "accuracy_ci" not in m0 and m0["accuracy"] == m["accuracy"]
