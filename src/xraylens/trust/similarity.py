"""How alike two sets of saliency maps are: the three measures of Adebayo et al. (2018).

Per image pair: Spearman rank correlation of the absolute values (ties get average ranks: ReLU'd
maps are mostly zero), SSIM (scikit-image, data range 1 on maps normalised to [0, 1]) and the
Pearson correlation of the two maps' HOG descriptors (scikit-image `hog`). A constant map (the
engine flags it and returns zeros) has no ranks and no gradients: against a non-constant map its
Spearman and HOG similarity are 0 (it carries none of the other's structure), two constant maps are
identical (1). SSIM is defined for constant maps and is computed as is.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from skimage.feature import hog
from skimage.metrics import structural_similarity

from xraylens.metrics import bootstrap_means, percentile_interval

MEASURES = ("spearman", "ssim", "hog")


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _hog(m: np.ndarray) -> np.ndarray:
    # about 12 cells across whatever the map size, 2x2-cell blocks, 9 orientations (Dalal & Triggs)
    cell = max(2, min(m.shape) // 12)
    return hog(m, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True)


def _fix_constant(sim: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    out = np.where(ca & cb, 1.0, np.where(ca | cb, 0.0, sim))
    return np.nan_to_num(out, nan=0.0)


def map_similarity(
    ref: np.ndarray,
    other: np.ndarray,
    ref_constant: np.ndarray | None = None,
    other_constant: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Similarity of each pair of maps [N, H, W] -> {measure: [N] float64} for `MEASURES`."""
    if ref.shape != other.shape or ref.ndim != 3:
        raise ValueError(f"maps must both be [N, H, W], got {ref.shape} and {other.shape}")
    n = ref.shape[0]
    a = np.abs(ref.reshape(n, -1).astype(np.float64))
    b = np.abs(other.reshape(n, -1).astype(np.float64))
    ca = ref_constant if ref_constant is not None else np.ptp(a, axis=1) == 0
    cb = other_constant if other_constant is not None else np.ptp(b, axis=1) == 0
    spearman = _rowwise_pearson(rankdata(a, axis=1), rankdata(b, axis=1))
    r64, o64 = ref.astype(np.float64), other.astype(np.float64)
    ssim = np.array([structural_similarity(r64[i], o64[i], data_range=1.0) for i in range(n)])
    ha = np.stack([_hog(r64[i]) for i in range(n)]) if n else np.zeros((0, 1))
    hb = np.stack([_hog(o64[i]) for i in range(n)]) if n else np.zeros((0, 1))
    hog_sim = _rowwise_pearson(ha, hb)
    return {
        "spearman": _fix_constant(spearman, ca, cb),
        "ssim": ssim,
        "hog": _fix_constant(hog_sim, ca, cb),
    }


def bootstrap_mean_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean (`xraylens.metrics.bootstrap_means`, 1,000
    seeded replicates, vectorised); NaN values do not count. (nan, nan) when nothing is finite."""
    ci = percentile_interval(bootstrap_means(np.asarray(values, dtype=np.float64), seed=seed))
    return (float("nan"), float("nan")) if ci is None else (ci[0], ci[1])
