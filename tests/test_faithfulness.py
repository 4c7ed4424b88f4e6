"""Deletion / insertion on a tiny model whose score is a known function of the input."""

from __future__ import annotations

import pytest
import torch

from xraylens.errors import XraylensError
from xraylens.localize.faithfulness import deletion_insertion, make_baseline


class Linear(torch.nn.Module):
    """logits = [0, sum(w * x)]: the class-1 softmax score is sigmoid(sum(w * x))."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        z = (x * self.w).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(z), z], 1)


def _setup():
    w = torch.linspace(-1.0, 2.0, 16).view(1, 1, 4, 4)[:, :, torch.randperm(4), :]  # distinct weights
    model = Linear(w.clone())
    x = torch.ones(2, 1, 4, 4)
    return w, model, x


def test_deletion_curve_is_exact():
    w, model, x = _setup()
    maps = torch.cat([w, -w])  # image 0: most positive weights first; image 1: the reverse
    r = deletion_insertion(model, x, maps, torch.tensor([1, 1]), steps=16, baseline="zero", batch_size=5)
    for i, m in enumerate(maps):
        order = torch.argsort(m.flatten(), descending=True)
        removed = torch.cat([torch.zeros(1), torch.cumsum(w.flatten()[order], 0)])
        expected = torch.sigmoid(w.sum() - removed)
        assert torch.allclose(r.curves[i], expected, atol=1e-6)
        assert r.auc[i].item() == pytest.approx(torch.trapezoid(expected, torch.linspace(0, 1, 17)).item())
    assert r.auc[0] < r.auc[1]  # the faithful map drops the score faster
    assert r.fractions.tolist() == pytest.approx([k / 16 for k in range(17)])


def test_insertion_curve_and_target_class():
    w, model, x = _setup()
    maps = torch.cat([w, -w])
    r = deletion_insertion(model, x, maps, torch.tensor([1, 1]), steps=16, baseline="zero", mode="insertion")
    order = torch.argsort(w.flatten(), descending=True)
    added = torch.cat([torch.zeros(1), torch.cumsum(w.flatten()[order], 0)])
    assert torch.allclose(r.curves[0], torch.sigmoid(added), atol=1e-6)
    assert r.auc[0] > r.auc[1]
    r0 = deletion_insertion(model, x, maps, torch.tensor([0, 0]), steps=16, baseline="zero", mode="insertion")
    assert torch.allclose(r0.curves, 1 - r.curves, atol=1e-6)  # class 0 = 1 - class 1 here


def test_chunking_steps_and_mode_untouched():
    w, model, x = _setup()
    maps = torch.rand(2, 1, 2, 2)  # smaller than x: resized bilinearly
    model.train()
    a = deletion_insertion(model, x, maps, torch.tensor([1, 0]), steps=4, baseline="mean", batch_size=1)
    calls = model.calls
    b = deletion_insertion(model, x, maps, torch.tensor([1, 0]), steps=4, baseline="mean", batch_size=1000)
    assert calls == 2 * 5 and model.calls - calls == 1  # all steps of all images in one forward
    assert torch.allclose(a.curves, b.curves) and a.curves.shape == (2, 5)
    assert model.training and model.w.grad is None


def test_baselines_and_errors():
    x = torch.rand(2, 3, 16, 16)
    assert make_baseline(x, "zero").abs().sum() == 0
    assert torch.allclose(make_baseline(x, "mean")[:, :, 3, 5], x.mean((-2, -1)))
    blur = make_baseline(x, "blur", blur_sigma=2.0)
    assert blur.shape == x.shape and blur.std() < x.std()
    model = Linear(torch.ones(1, 3, 16, 16))
    with pytest.raises(XraylensError, match="baseline must be"):
        deletion_insertion(model, x, torch.rand(2, 1, 16, 16), torch.tensor([1, 1]), baseline="noise")
    with pytest.raises(XraylensError, match="mode must be"):
        deletion_insertion(model, x, torch.rand(2, 1, 16, 16), torch.tensor([1, 1]), mode="both")
    r = deletion_insertion(model, x, torch.rand(2, 1, 16, 16), torch.tensor([1, 1]), steps=8)
    assert r.auc.shape == (2,) and r.curves.shape == (2, 9)
