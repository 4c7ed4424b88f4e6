import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xraylens.errors import XraylensError
from xraylens.train.losses import LOSSES, balanced_class_weights, build_loss


def _batch(b=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g, dtype=torch.float64) * 2, torch.randint(0, k, (b,), generator=g)


def _np_focal(logits, y, gamma, alpha):
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    lpt = logp[np.arange(len(y)), y]
    a = np.ones(len(y)) if alpha is None else np.asarray(alpha, dtype=float)[y]
    return float(np.mean(-a * (1 - np.exp(lpt)) ** gamma * lpt))


def test_focal_gamma0_no_alpha_equals_ce():
    x, y = _batch()
    fl = build_loss("focal", 3, gamma=0.0)(x.float(), y)
    assert torch.allclose(fl, F.cross_entropy(x.float(), y), atol=1e-6)


@pytest.mark.parametrize("gamma,alpha", [(2.0, None), (1.5, [0.2, 0.3, 0.5]), (3.0, 0.25), (0.5, None)])
def test_focal_matches_numpy_per_sample(gamma, alpha):
    x, y = _batch(b=16, seed=1)
    got = build_loss("focal", 3, gamma=gamma, alpha=alpha)(x.float(), y).item()
    a = None if alpha is None else (np.full(3, alpha) if np.isscalar(alpha) else alpha)
    assert got == pytest.approx(_np_focal(x.numpy(), y.numpy(), gamma, a), rel=1e-5)


def test_focal_seed_matches_upstream_formula_and_differs_from_focal():
    counts = [50, 10, 5]  # imbalanced
    w = torch.tensor([65 / (3 * c) for c in counts])
    x, y = _batch(b=10, seed=2)
    x, y = x.float(), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 0])
    ce = torch.nn.CrossEntropyLoss(weight=w)(x, y)  # weighted batch mean: one scalar
    pt = torch.exp(-ce)
    want = torch.mean(w[y] * (1 - pt) ** 2.0 * ce)
    seed = build_loss("focal-seed", 3, class_counts=counts)
    assert torch.allclose(seed(x, y), want, atol=1e-6)
    # hyperval.py: scalar alpha is the scaling factor on the class weights
    scaled = build_loss("focal-seed", 3, class_counts=counts, alpha=0.25, gamma=1.7)(x, y)
    assert torch.allclose(scaled, torch.mean(0.25 * w[y] * (1 - pt) ** 1.7 * ce), atol=1e-6)
    proper = build_loss("focal", 3, alpha=w)(x, y)
    assert abs(proper.item() - seed(x, y).item()) > 1e-3


def test_balanced_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 7 + [1] * 2 + [2] * 3)
    want = compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(balanced_class_weights([7, 2, 3], 3).numpy(), want, rtol=1e-6)
    x, t = _batch(b=12, seed=3)
    got = build_loss("ce-weighted", 3, class_counts=[7, 2, 3])(x.float(), t)
    assert torch.allclose(got, F.cross_entropy(x.float(), t, weight=torch.tensor(want, dtype=torch.float32)))


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_finite_for_extreme_logits(name):
    x = torch.tensor([[80.0, -80.0], [-80.0, 80.0], [1e4, 0.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 0, 1])  # confident right, confident wrong, saturated, undecided
    kw = {"gamma": 0.5} if name == "focal" else {}
    loss = build_loss(name, 2, class_counts=[3, 1], **kw)(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_bce_two_classes():
    x, y = _batch(b=8, k=2, seed=4)
    x = x.float()
    got = build_loss("bce", 2)(x, y)
    onehot = np.eye(2)[y.numpy()]
    p = 1 / (1 + np.exp(-x.numpy().astype(float)))
    want = -np.mean(onehot * np.log(p) + (1 - onehot) * np.log(1 - p))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_errors():
    with pytest.raises(XraylensError, match="focal-seed"):
        build_loss("hinge", 3)
    with pytest.raises(XraylensError):
        build_loss("ce-weighted", 3)  # needs class counts
    with pytest.raises(XraylensError):
        build_loss("ce-weighted", 3, class_counts=[1, 2])
    with pytest.raises(XraylensError):
        build_loss("focal", 3, alpha=[0.5, 0.5])
    assert isinstance(build_loss("CE", 2), torch.nn.CrossEntropyLoss)
