"""CamEngine contracts: one pass, targets (class and callable), constant maps, hook hygiene, in-place ReLU,
memory, and the one logits -> probabilities rule."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from xraylens.errors import XraylensError
from xraylens.explain import CamEngine, ClassTarget, SegmentationTarget, explain
from xraylens.explain.methods import METHODS, gradcam
from xraylens.ops import class_probabilities, class_probabilities_np

GRAD_METHODS = [
    "gradcam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "hirescam",
    "normgrad-scaling",
    "normgrad-conv1x1",
    "normgrad-conv3x3",
    "eigencam",
]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=1).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 1, 64, 72, generator=torch.Generator().manual_seed(0))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_one_forward_one_backward_for_all_gradient_methods(model, x):
    counts = {"fwd": 0, "bwd": 0}

    def on_fwd(*_):
        counts["fwd"] += 1

    def on_head(_m, _i, out):  # every backward through the head fires this tensor hook once
        out.register_hook(lambda g: counts.__setitem__("bwd", counts["bwd"] + 1))

    h1 = model.register_forward_hook(on_fwd)
    h2 = model.fc.register_forward_hook(on_head)
    try:
        with CamEngine(model, ["layer4"]) as engine:
            res = engine(x, GRAD_METHODS)
    finally:
        h1.remove()
        h2.remove()
    assert counts == {"fwd": 1, "bwd": 1}
    assert set(res.maps) == set(GRAD_METHODS)
    for name, m in res.maps.items():
        assert m.shape == (3, 1, 64, 72), name
        assert torch.isfinite(m).all() and m.min() >= 0 and m.max() <= 1, name
        assert res.raw[name]["layer4"].shape == (3, 1, 2, 3), name
    assert res.logits.shape == (3, 3) and not res.logits.requires_grad


def test_targets_pred_true_int_tensor(model, x):
    with CamEngine(model, ["layer4"]) as engine:
        pred = engine(x, "gradcam", targets="pred")
        assert torch.equal(pred.targets, pred.logits.argmax(1))
        labels = torch.tensor([2, 0, 1])
        true = engine(x, "gradcam", targets="true", labels=labels)
        assert torch.equal(true.targets, labels)
        tens = engine(x, "gradcam", targets=labels)
        assert torch.allclose(tens.maps["gradcam"], true.maps["gradcam"])
        one = engine(x, "gradcam", targets=1)
        assert one.targets.tolist() == [1, 1, 1]
        # a per-sample target gives the same map as explaining that image alone
        solo = engine(x[1:2], "gradcam", targets=0)
        assert torch.allclose(true.maps["gradcam"][1:2], solo.maps["gradcam"], atol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"targets": [0, 1]}, "2 targets for a batch of 3"),
        ({"targets": "true"}, "needs labels"),
        ({"targets": 7}, "0..2"),
        ({"targets": "best"}, "pred"),
        ({"combine": "median"}, "combine"),
    ],
)
def test_bad_arguments_raise_one_line_errors(model, x, kw, match):
    with CamEngine(model, ["layer4"]) as engine:
        with pytest.raises(XraylensError, match=match) as exc:
            engine(x, "gradcam", **kw)
    assert "\n" not in str(exc.value)
    assert _no_hooks(model)


def test_unknown_method_and_layer(model, x):
    with pytest.raises(XraylensError, match="choose from"):
        explain(model, x, ["gradcam", "saliency-magic"], layers=["layer4"])
    with pytest.raises(XraylensError, match="not found"):
        CamEngine(model, ["layer9"])
    with pytest.raises(XraylensError, match="layers="):
        CamEngine(nn.Sequential(nn.Conv2d(1, 2, 3)))
    assert _no_hooks(model)


class _Negative(nn.Module):
    """ReLU features and an all-negative head: Grad-CAM of class 0 is zero everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.fill_(-1.0)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_constant_map_is_zeros_and_flagged():
    torch.manual_seed(0)
    net = _Negative().eval()
    res = explain(net, torch.randn(2, 1, 16, 16), ["gradcam", "layercam"], layers=["act"], targets=0)
    for name in ("gradcam", "layercam"):
        assert res.constant[name].tolist() == [True, True]
        assert torch.count_nonzero(res.maps[name]) == 0
        assert not torch.isnan(res.maps[name]).any()


def test_hooks_released_also_after_exceptions(model, x):
    with CamEngine(model, ["layer4", "layer3"]) as engine:
        assert model.layer4._forward_hooks
        engine(x, "gradcam")
    assert _no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with CamEngine(model, ["layer4"]):
            raise RuntimeError("boom")
    assert _no_hooks(model)
    # an error inside the model's forward also leaves nothing behind
    engine = CamEngine(model, ["layer4"])
    with pytest.raises(RuntimeError):
        engine(torch.randn(2, 5, 32, 32), "gradcam")  # 5 channels into a 1-channel stem
    assert _no_hooks(model)
    # the engine is usable again after a failed call
    assert engine(x, "gradcam").maps["gradcam"].shape == (3, 1, 64, 72)
    assert _no_hooks(model)


def test_model_state_untouched(x):
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=2, in_chans=1)
    net.train()
    for p in net.layer1.parameters():
        p.requires_grad_(False)
    before = {n: p.requires_grad for n, p in net.named_parameters()}
    explain(net, x, ["gradcam", "eigencam"], layers=["layer4"])
    assert net.training
    assert {n: p.requires_grad for n, p in net.named_parameters()} == before
    assert all(p.grad is None for p in net.parameters())  # no parameter gradient computed or kept
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)  # fully frozen model still explains
    res = explain(net, x, "gradcam", layers=["layer4"])
    assert not res.constant["gradcam"].all()
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_densenet_inplace_relu_matches_reference():
    """torchvision DenseNet applies F.relu(inplace=True) to `features`' output: gradient and activation
    must be those of the pre-ReLU tensor, as if no in-place op had happened."""
    torch.manual_seed(0)
    net = torchvision.models.densenet121(num_classes=2).eval()
    net.features[0] = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    xx = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    res = explain(net, xx, ["gradcam", "layercam"], layers=["features"], targets=torch.tensor([0, 1]))
    # reference without any in-place op
    a = net.features(xx).detach().requires_grad_(True)
    out = net.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(a), 1), 1))
    (g,) = torch.autograd.grad(out.gather(1, torch.tensor([[0], [1]])).sum(), a)
    ref = gradcam(a.detach(), g)
    assert torch.allclose(res.raw["gradcam"]["features"][:, 0], ref, rtol=1e-4, atol=1e-6)
    assert not res.constant["gradcam"].all()
    assert _no_hooks(net)


def test_multi_layer_combination(model, x):
    with CamEngine(model, ["layer3", "layer4"]) as engine:
        res = engine(x, ["gradcam", "normgrad-conv1x1"])
        mx = engine(x, ["gradcam"], combine="max")
    assert set(res.raw["gradcam"]) == {"layer3", "layer4"}
    assert res.raw["gradcam"]["layer3"].shape[-2:] == (4, 5)
    single = {ly: explain(model, x, ["gradcam", "normgrad-conv1x1"], layers=[ly]) for ly in ("layer3", "layer4")}

    def norm(t):
        lo = t.amin(dim=(1, 2, 3), keepdim=True)
        return (t - lo) / (t.amax(dim=(1, 2, 3), keepdim=True) - lo)

    mean = norm((single["layer3"].maps["gradcam"] + single["layer4"].maps["gradcam"]) / 2)
    assert torch.allclose(res.maps["gradcam"], mean, atol=1e-5)
    prod = norm(single["layer3"].maps["normgrad-conv1x1"] * single["layer4"].maps["normgrad-conv1x1"])
    assert torch.allclose(res.maps["normgrad-conv1x1"], prod, atol=1e-5)
    top = norm(torch.maximum(single["layer3"].maps["gradcam"], single["layer4"].maps["gradcam"]))
    assert torch.allclose(mx.maps["gradcam"], top, atol=1e-5)


def test_output_size_score_prob_and_unnormalised(model, x):
    with CamEngine(model, "layer4") as engine:
        res = engine(x, ["gradcam", "layercam"], output_size=(20, 30), score="prob", normalize=False)
    assert res.maps["gradcam"].shape == (3, 1, 20, 30)
    assert res.maps["layercam"].max() < 1  # un-normalised: gradients of a probability are small
    assert res.probs.shape == (3,) and torch.all((res.probs > 0) & (res.probs < 1))


def test_scorecam_batched_equals_per_image_and_chunk_size_free():
    torch.manual_seed(0)
    net = _Tiny().eval()
    xb = torch.randn(3, 1, 32, 24)
    with CamEngine(net) as engine:
        full = engine(xb, ["scorecam", "gradcam"], targets=torch.tensor([0, 1, 1]), score="prob", scorecam_batch_size=5)
        big = engine(xb, "scorecam", targets=torch.tensor([0, 1, 1]), score="prob", scorecam_batch_size=999)
        solo = engine(xb[2:], "scorecam", targets=1, score="prob")
    assert torch.allclose(full.maps["scorecam"], big.maps["scorecam"], atol=1e-5)
    assert torch.allclose(full.maps["scorecam"][2:], solo.maps["scorecam"], atol=1e-5)
    assert full.maps["scorecam"].shape == (3, 1, 32, 24)


def test_single_logit_binary_model():
    """A BCE model (one logit) reads as two classes: class 1 = the logit, class 0 = its negation."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=1, in_chans=1).eval()
    xx = torch.randn(2, 1, 64, 64)
    res = explain(net, xx, ["gradcam", "hirescam"], layers=["layer4"], targets=torch.tensor([1, 0]))
    assert res.targets.tolist() == [1, 0]
    assert torch.equal(res.preds, (res.logits[:, 0] > 0).long())
    pos = explain(net, xx, ["hirescam"], layers=["layer4"], targets=1).raw["hirescam"]["layer4"]
    neg = explain(net, xx, ["hirescam"], layers=["layer4"], targets=0).raw["hirescam"]["layer4"]
    assert not torch.allclose(pos, neg)


def test_three_channel_non_square_input():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4).eval()
    one_pass = [m for m, rec in METHODS.items() if not rec.extra_forward]  # Score-CAM: 1024 forwards here
    res = explain(net, torch.randn(2, 3, 48, 80), one_pass, layers=["layer4"])
    assert all(m.shape == (2, 1, 48, 80) for m in res.maps.values())


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, stride=2),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(8, 2)
        self.default_cam_layers = ["features.2"]

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_memory_does_not_grow_over_2000_images():
    psutil = pytest.importorskip("psutil")
    torch.manual_seed(0)
    net = _Tiny().eval()
    xb = torch.randn(50, 1, 32, 32)
    proc = psutil.Process()
    methods = ["gradcam", "gradcam++", "normgrad-conv3x3", "eigencam"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs would dominate on a busy machine
    try:
        _memory_loop(net, xb, methods, proc)
    finally:
        torch.set_num_threads(threads)


def _memory_loop(net, xb, methods, proc) -> None:
    with CamEngine(net) as engine:  # default layers from model.default_cam_layers
        for _ in range(5):  # warm-up: allocator pools, lazy inits
            engine(xb, methods)
        gc.collect()
        start = proc.memory_info().rss
        for _ in range(40):  # 2,000 images
            res = engine(xb, methods)
        del res
        gc.collect()
        grown = proc.memory_info().rss - start
        assert not engine._acts and not engine._grads and engine._cut is None
    assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"


def test_every_zoo_model_explains_at_64px():
    """The registry's default CAM layers work with the engine, one pass, for every zoo model."""
    registry = pytest.importorskip("xraylens.models.registry")
    xx = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    methods = ["gradcam", "normgrad-conv3x3"]
    for name in registry.list_models():
        torch.manual_seed(0)
        net = registry.create_model(name, num_classes=2, in_chans=1, image_size=64).eval()
        res = explain(net, xx, methods)  # layers from model.default_cam_layers
        for m in methods:
            assert res.maps[m].shape == (2, 1, 64, 64), (name, m)
            assert torch.isfinite(res.maps[m]).all(), (name, m)
        assert not res.constant["normgrad-conv3x3"].any(), name
        assert _no_hooks(net) and all(p.grad is None for p in net.parameters()), name


# -- logits -> probabilities ------------------------------------------------------------------------
def test_class_probabilities_one_rule_for_softmax_and_single_logit():
    z = torch.tensor([[-30.0], [0.0], [2.0]], dtype=torch.float16)
    p = class_probabilities(z)
    assert p.dtype == torch.float32 and p.shape == (3, 2)
    assert torch.allclose(p[:, 1], torch.sigmoid(z.float())[:, 0]) and torch.allclose(p.sum(1), torch.ones(3))
    assert p[0, 1] > 0  # sigmoid(-z) form: the small side does not round to 0 early
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(class_probabilities(logits), torch.softmax(logits, 1))
    assert np.allclose(class_probabilities_np(z.numpy()), p.numpy())
    assert class_probabilities_np(np.zeros((0, 4))).shape == (0, 4)
    with pytest.raises(XraylensError, match=r"logits \[B, K\]"):
        class_probabilities(torch.zeros(3))


# -- callable targets -------------------------------------------------------------------------------
def test_class_target_gives_the_same_maps_as_class_indices(model, x):
    with CamEngine(model, ["layer4"]) as engine:
        for plain, fn in [(1, ClassTarget(1)), (torch.tensor([2, 0, 1]), ClassTarget([2, 0, 1]))]:
            a = engine(x, GRAD_METHODS, targets=plain)
            b = engine(x, GRAD_METHODS, targets=fn)
            assert torch.equal(a.targets, b.targets)
            for m in GRAD_METHODS:
                assert torch.equal(a.maps[m], b.maps[m]), m
        prob = engine(x, "gradcam,layercam", targets=0, score="prob")
        prob_fn = engine(x, ["gradcam", "layercam"], targets=ClassTarget(0, prob=True))
        assert torch.equal(prob.maps["layercam"], prob_fn.maps["layercam"])
        # a plain callable works too; it names no class, so targets are -1 and probs NaN
        lam = engine(x, "gradcam", targets=lambda out: out[:, 1])
        assert torch.equal(lam.maps["gradcam"], engine(x, "gradcam", targets=1).maps["gradcam"])
        assert lam.targets.tolist() == [-1, -1, -1] and torch.isnan(lam.probs).all()
        assert lam.preds.shape == (3,)
    net = _Tiny().eval()
    xb = torch.randn(3, 1, 32, 24, generator=torch.Generator().manual_seed(4))
    with CamEngine(net) as engine:  # Score-CAM through the same target
        s1 = engine(xb, "scorecam", targets=torch.tensor([0, 1, 1]), score="prob")
        s2 = engine(xb, "scorecam", targets=ClassTarget([0, 1, 1], prob=True))
    assert torch.equal(s1.maps["scorecam"], s2.maps["scorecam"])
    binary = timm.create_model("resnet18", num_classes=1, in_chans=1).eval()
    a = explain(binary, x, "hirescam", layers=["layer4"], targets=0)
    b = explain(binary, x, "hirescam", layers=["layer4"], targets=ClassTarget(0))
    assert torch.equal(a.maps["hirescam"], b.maps["hirescam"]) and b.targets.tolist() == [0, 0, 0]


class _Segmenter(nn.Module):
    """A tiny segmentation net, [B,1,H,W] -> [B,2,H,W], whose output at a pixel depends only on a small
    neighbourhood of the input (3x3 convs, stride 2, 1x1 head): the evidence for a region's score lies
    in that region. Positive weights and no biases make the features grow with the input's brightness,
    so the ground truth is known: the bright blob inside the mask, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(8, 2, 1, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.abs_()

    def forward(self, x):
        return F.interpolate(self.head(self.features(x)), scale_factor=2, mode="nearest")


def _two_blobs(b: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.zeros(b, 1, 40, 48)
    left = torch.zeros(40, 48, dtype=torch.bool)
    right = torch.zeros(40, 48, dtype=torch.bool)
    left[12:22, 6:16] = True
    right[18:28, 30:40] = True
    x[:, 0][:, left] = 1.0
    x[:, 0][:, right] = 2.0  # the brighter blob: a class-score map would peak here
    return x, left, right


def test_segmentation_target_highlights_the_masked_region():
    torch.manual_seed(0)
    net = _Segmenter().eval()
    x, left, right = _two_blobs()
    for mask, inside, outside in [(left, left, right), (right, right, left)]:
        res = explain(
            net, x, ["hirescam", "layercam", "gradcam"], layers=["features"], targets=SegmentationTarget(1, mask)
        )
        assert res.logits.shape == (2, 2, 40, 48)
        assert res.targets.tolist() == [-1, -1] and torch.isnan(res.probs).all()
        for m in ("hirescam", "layercam"):  # element-wise methods: evidence only where the mask reads
            cam = res.maps[m][:, 0]
            assert not res.constant[m].any(), m
            assert cam[:, inside].mean() > 0.5, m
            assert cam[:, outside].max() == 0, m
            peak = cam.flatten(1).argmax(1)
            assert inside.flatten()[peak].all(), m
        # Grad-CAM's channel weights are global: it sees both blobs, but still a valid map
        assert res.maps["gradcam"].shape == (2, 1, 40, 48) and not res.constant["gradcam"].any()


def test_segmentation_target_per_image_masks_and_scorecam():
    torch.manual_seed(0)
    net = _Segmenter().eval()
    x, left, right = _two_blobs(3)
    masks = torch.stack([left, right, left])
    with CamEngine(net, ["features.2"]) as engine:
        full = engine(x, ["scorecam", "hirescam"], targets=SegmentationTarget(1, masks), scorecam_batch_size=5)
        for i in range(3):
            solo = engine(x[i : i + 1], ["scorecam", "hirescam"], targets=SegmentationTarget(1, masks[i]))
            for m in ("scorecam", "hirescam"):
                assert torch.allclose(full.maps[m][i], solo.maps[m][0], atol=1e-5), (m, i)
    assert torch.equal(full.maps["hirescam"][0, 0] > 0, full.maps["hirescam"][2, 0] > 0)
    assert not torch.equal(full.maps["hirescam"][0], full.maps["hirescam"][1])


@pytest.mark.parametrize(
    "targets, kw, match",
    [
        ("pred", {}, "callable target"),  # a segmentation output has no class logits
        (SegmentationTarget(1, torch.ones(40, 48)), {"score": "prob"}, "defines its own score"),
        (lambda out: out.sum(), {}, "one score per image"),
        (SegmentationTarget(5, torch.ones(40, 48)), {}, "out of range"),
        (SegmentationTarget(1, torch.ones(20, 24)), {}, "does not fit"),
        (ClassTarget(0), {}, r"logits \[B, K\]"),
    ],
)
def test_bad_callable_targets_raise_one_line_errors(targets, kw, match):
    net = _Segmenter().eval()
    x, _, _ = _two_blobs()
    with pytest.raises(XraylensError, match=match) as exc:
        explain(net, x, "gradcam", layers=["features"], targets=targets, **kw)
    assert "\n" not in str(exc.value)
    assert _no_hooks(net)
    res = explain(net, x, "eigencam", layers=["features"], targets=SegmentationTarget(0, torch.ones(40, 48)))
    with pytest.raises(XraylensError, match="preds need logits"):
        _ = res.preds
