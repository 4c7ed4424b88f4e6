"""CAM maths against pytorch-grad-cam (the oracle), NormGrad against a slow per-position loop, and the
method table (one record per method, name validation).

How the comparison is exact: pytorch-grad-cam ReLUs each layer map, min-max scales it, resizes it
with cv2 (INTER_LINEAR) per image and min-max scales again. Bilinear resizing is affine in the values,
so the two scalings collapse to one, and cv2's INTER_LINEAR enlargement samples exactly as torch's
bilinear ``align_corners=False`` without antialias. Our normalised maps therefore match its output at the
input resolution, up to its 1e-7 epsilons. EigenCAM is compared with its SVD projection swapped for the
sign-corrected one (its plain EigenCAM keeps LAPACK's arbitrary sign).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from xraylens.errors import XraylensError
from xraylens.explain import CamEngine, available_methods, methods_help, resolve_methods
from xraylens.explain.methods import (
    METHODS,
    CamContext,
    CamMethod,
    normgrad_conv1x1,
    normgrad_conv3x3,
    normgrad_scaling,
)

H, W = 96, 80  # non-square on purpose


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=3).eval()


def _load(fixture_dir, n: int, size=(H, W)) -> torch.Tensor:
    files = sorted((fixture_dir / "pneumonia").rglob("*.jpeg"))
    files = files[:: max(1, len(files) // n)][:n]  # both classes
    arrs = [np.asarray(Image.open(f).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)) for f in files]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25


@pytest.fixture(scope="module")
def pgc():
    """The oracle; only the comparisons need it, the table and NormGrad tests run without."""
    return pytest.importorskip("pytorch_grad_cam")


@pytest.fixture(scope="module")
def images(fixture_dir) -> torch.Tensor:
    return _load(fixture_dir, 3)


ORACLES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "eigencam": "EigenCAM",
}


def _oracle(pgc, name: str, model, x, targets, monkeypatch, layer: str = "layer4") -> np.ndarray:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if name == "eigencam":
        import pytorch_grad_cam.eigen_cam as ec
        from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

        monkeypatch.setattr(ec, "get_2d_projection", get_2d_projection_with_sign_correction)
    cls = getattr(pgc, ORACLES.get(name, "ScoreCAM"))
    with cls(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        if name == "scorecam":
            cam.batch_size = 64
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def test_gradient_methods_match_pytorch_grad_cam(pgc, model, images, monkeypatch):
    targets = torch.tensor([0, 1, 2])
    with CamEngine(model, ["layer4"]) as engine:
        res = engine(images, list(ORACLES), targets=targets)
    assert res.maps["gradcam"].shape == (3, 1, H, W)
    for name in ORACLES:
        ref = _oracle(pgc, name, model, images, targets, monkeypatch)
        ours = res.numpy(name)
        assert ours.shape == ref.shape
        assert not res.constant[name].all(), name  # a meaningful map, not zeros on both sides
        err = np.abs(ours - ref).max()
        assert err <= 1e-4, f"{name}: max abs diff {err:.2e}"


def test_scorecam_matches_pytorch_grad_cam(pgc, model, fixture_dir, monkeypatch):
    """On layer2 (128 channels) to keep the 2 x 128 masked forward passes per tool cheap."""
    x = _load(fixture_dir, 2, size=(64, 48))
    targets = torch.tensor([1, 0])
    with CamEngine(model, ["layer2"]) as engine:
        res = engine(x, ["scorecam"], targets=targets, scorecam_batch_size=128)
    ref = _oracle(pgc, "scorecam", model, x, targets, monkeypatch, layer="layer2")
    assert not res.constant["scorecam"].any()
    err = np.abs(res.numpy("scorecam") - ref).max()
    assert err <= 1e-4, f"scorecam: max abs diff {err:.2e}"


# -- NormGrad: slow reference written from the definitions (Rebuffi et al. 2020) --------------------
def _normgrad_reference(a: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    """Per image, per position: the Frobenius norm of the virtual layer's weight gradient there."""
    a64, g64 = a.double(), g.double()
    b, c, h, w = a.shape
    pad = torch.nn.functional.pad(a64, (1, 1, 1, 1))
    out = torch.zeros(b, h, w, dtype=torch.float64)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                gp = g64[i, :, r, s]
                if kind == "scaling":  # d/dα_c of a per-channel scale: g_c · a_c
                    grad_w = gp * a64[i, :, r, s]
                elif kind == "conv1x1":  # 1x1 conv weight gradient: g aᵀ
                    grad_w = torch.outer(gp, a64[i, :, r, s])
                else:  # 3x3 conv weight gradient: g ⊗ (3x3 patch, zero padded)
                    grad_w = torch.outer(gp, pad[i, :, r : r + 3, s : s + 3].reshape(-1))
                out[i, r, s] = torch.linalg.norm(grad_w)
    return out


@pytest.mark.parametrize(
    "kind, fn", [("scaling", normgrad_scaling), ("conv1x1", normgrad_conv1x1), ("conv3x3", normgrad_conv3x3)]
)
def test_normgrad_matches_loop_reference_on_random_tensors(kind, fn):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, 6, 5, 7, generator=gen).relu()
    g = torch.randn(2, 6, 5, 7, generator=gen)
    ref = _normgrad_reference(a, g, kind)
    assert torch.allclose(fn(a, g).double(), ref, atol=1e-5, rtol=1e-5)


def test_normgrad_engine_matches_reference_on_model_gradients(model, images):
    """A and G captured independently (retain_grad), maps from the engine's raw output."""
    targets = torch.tensor([2, 0, 1])
    store = {}

    def keep(_m, _i, out):
        out.retain_grad()
        store["a"] = out

    h = model.layer4.register_forward_hook(keep)
    try:
        logits = model(images)
        logits.gather(1, targets[:, None]).sum().backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    a, g = store["a"].detach(), store["a"].grad
    names = ["normgrad-scaling", "normgrad-conv1x1", "normgrad-conv3x3"]
    with CamEngine(model, ["layer4"]) as engine:
        res = engine(images, names, targets=targets)
    for name in names:
        ref = _normgrad_reference(a, g, name.split("-")[1])
        ours = res.raw[name]["layer4"][:, 0].double()
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item()), name


def test_methods_are_pure_batched_functions():
    """Each one-pass method maps [B,C,h,w] x2 -> [B,h,w] and treats images independently; the
    record's uniform ``compute(ctx)`` gives the same as its pure function."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, 8, 4, 5, generator=gen).relu()
    g = torch.randn(3, 8, 4, 5, generator=gen)
    one_pass = [rec for rec in METHODS.values() if not rec.extra_forward]
    assert len(one_pass) == len(METHODS) - 1  # all but Score-CAM
    for rec in one_pass:
        full = rec.fn(a, g)
        assert full.shape == (3, 4, 5), rec.name
        one = rec.fn(a[1:2], g[1:2])
        assert torch.allclose(full[1:2], one, atol=1e-5), rec.name
        assert torch.isfinite(full).all(), rec.name
        assert torch.equal(rec.compute(CamContext(a, g)), full), rec.name


# -- the method table -----------------------------------------------------------------------------
def test_one_record_per_method_holds_every_fact():
    assert available_methods() == list(METHODS)
    assert available_methods()[:2] == ["gradcam", "gradcam++"] and "scorecam" in METHODS
    for name, rec in METHODS.items():
        assert isinstance(rec, CamMethod) and rec.name == name
        assert callable(rec.fn)
        assert rec.default_combine in ("mean", "max", "product"), name
        assert rec.summary and "\n" not in rec.summary, name
        # needs_gradients / combine facts the engine used to keep in side tables
        assert rec.needs_gradients == (name not in ("eigencam", "scorecam")), name
        assert rec.extra_forward == (name == "scorecam"), name
        assert (rec.default_combine == "product") == name.startswith("normgrad"), name
    with pytest.raises(dataclasses.FrozenInstanceError):  # frozen: facts cannot drift at run time
        METHODS["gradcam"].needs_gradients = False
    assert methods_help() == ", ".join(METHODS)
    verbose = methods_help(verbose=True).splitlines()
    assert len(verbose) == len(METHODS) and verbose[0].startswith("gradcam: ")


def test_scorecam_record_needs_the_engine_context():
    a = torch.rand(1, 2, 3, 3)
    with pytest.raises(XraylensError, match="CamEngine"):
        METHODS["scorecam"].compute(CamContext(a))


@pytest.mark.parametrize(
    "given, expected",
    [
        ("gradcam", ["gradcam"]),
        (" gradcam , LayerCAM,gradcam++ ", ["gradcam", "layercam", "gradcam++"]),
        (["eigencam", "gradcam", "eigencam"], ["eigencam", "gradcam"]),  # duplicates dropped, order kept
        (("scorecam,gradcam", " gradcam"), ["scorecam", "gradcam"]),
        ("gradcam,,", ["gradcam"]),
    ],
)
def test_resolve_methods_accepts_comma_strings_and_lists(given, expected):
    assert resolve_methods(given) == expected


@pytest.mark.parametrize(
    "given, match",
    [
        ("gradcam,saliency-magic", "unknown CAM method.*saliency-magic.*choose from gradcam, gradcam\\+\\+"),
        ("", "no CAM method"),
        (" , ", "no CAM method"),
        ([], "no CAM method"),
        ([3], "names such as"),
        (None, "names such as"),
    ],
)
def test_resolve_methods_rejects_with_the_known_names(given, match):
    with pytest.raises(XraylensError, match=match) as exc:
        resolve_methods(given)
    assert "\n" not in str(exc.value)
    assert "normgrad-conv3x3" in str(exc.value)
