"""Model zoo: every architecture trains on real fixture images, round-trips its weights and exposes
CAM layers; pretrained handling, heads, partial unfreezing and SE placement are checked directly."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from xraylens.errors import XraylensError
from xraylens.models import cam_layers, create_model, list_models
from xraylens.models.heads import MLPHead

H, W = 64, 80  # non-square on purpose: every test input exercises it
ZOO = [
    "tinyvgg",
    "tinyvgg_bn",
    "vgg16",
    "vgg19",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "se_resnet18",
    "densenet121",
    "se_densenet121",
    "efficientnet_b0",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches gain nothing from intra-op threads; on a shared 2-core box the OpenMP spin-wait
    of 2 threads made this file ~2.5x slower in wall time (measured), so run it on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch(fixture_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Two real chest X-rays (one NORMAL, one PNEUMONIA), greyscale, resized to H x W, standardised."""
    root = fixture_dir / "pneumonia"
    paths = [sorted((root / c).glob("*.jp*g"))[0] for c in ("NORMAL", "PNEUMONIA")]
    imgs = [np.asarray(Image.open(p).convert("L").resize((W, H), Image.BILINEAR), np.float32) for p in paths]
    x = torch.from_numpy(np.stack(imgs))[:, None] / 255.0
    return (x - 0.5) / 0.25, torch.tensor([0, 1])


def _build(name: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=2, image_size=(H, W), **kw)


def test_list_models_is_the_zoo() -> None:
    assert sorted(ZOO) == list_models()


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(XraylensError, match="choose one of: densenet121") as e:
        create_model("resnet9000", num_classes=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ZOO)
def test_train_step_cam_and_roundtrip(name: str, batch, tmp_path: Path) -> None:
    x, y = batch
    model = _build(name)
    assert (model.xraylens_name, model.num_classes, model.in_chans) == (name, 2, 1)
    stem = model.get_submodule(model.xraylens_arch.stem)
    head = model.get_submodule(model.xraylens_arch.head)
    stem0, head0 = stem.weight.detach().clone(), head.weight.detach().clone()

    # one SGD step on real images; the CAM layers are hooked during the same forward
    layers = cam_layers(model)
    assert layers and layers == model.default_cam_layers
    acts: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.detach()))
        for n in layers
    ]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    logits = model(x)
    for h in hooks:
        h.remove()
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    assert logits.shape == (2, 2) and torch.isfinite(loss)
    assert not torch.equal(stem.weight, stem0) and not torch.equal(head.weight, head0)
    assert set(acts) == set(layers) and all(a.ndim == 4 and a.shape[0] == 2 for a in acts.values())
    # weights-only round trip into a fresh model gives the same eval outputs
    model.eval()
    with torch.no_grad():
        out = model(x)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    fresh = _build(name)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tinyvgg", "resnet18", "se_densenet121", "efficientnet_b0"])
def test_three_channels(name: str) -> None:
    model = _build(name, in_chans=3).eval()
    assert model.get_submodule(model.xraylens_arch.stem).in_channels == 3
    with torch.no_grad():
        assert model(torch.randn(2, 3, H, W)).shape == (2, 2)


def test_tinyvgg_layout_and_wrong_size() -> None:
    m = create_model("tinyvgg", num_classes=2, image_size=64, hidden_units=8)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) for c in convs)
    assert m.classifier.in_features == 8 * 13 * 13  # 64 -> 60 -> 30 -> 26 -> 13
    with pytest.raises(XraylensError, match="image_size"):
        m(torch.zeros(1, 1, 32, 32))


# ---- pretrained ---------------------------------------------------------------------------------


def test_pretrained_true_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("resnet50", "vgg16"):
        t0 = time.perf_counter()
        with pytest.raises(XraylensError, match="--weights PATH") as e:
            create_model(name, num_classes=2, pretrained=True)
        assert time.perf_counter() - t0 < 2.0
        assert "\n" not in str(e.value)


def test_pretrained_true_unreachable_host_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def hanging_connect(*a: object, **k: object) -> None:  # a resolver or firewall that never answers
        time.sleep(5)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    t0 = time.perf_counter()
    with pytest.raises(XraylensError, match="cannot be reached.*--weights PATH"):
        create_model("efficientnet_b0", num_classes=2, pretrained=True)
    assert time.perf_counter() - t0 < 2.0


def test_pretrained_true_without_hub_weights() -> None:
    with pytest.raises(XraylensError, match="tinyvgg has no ImageNet weights"):
        create_model("tinyvgg", num_classes=2, pretrained=True)


def test_pretrained_path_timm_resnet(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(1)
    src = timm.create_model("resnet18", num_classes=1000).state_dict()  # random "ImageNet" weights
    path = tmp_path / "resnet18.pth"
    torch.save(src, path)

    m = create_model("resnet18", num_classes=2, in_chans=1, pretrained=str(path))
    torch.testing.assert_close(m.conv1.weight, src["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(m.layer3[1].conv2.weight, src["layer3.1.conv2.weight"])
    assert torch.equal(m.layer2[0].bn1.running_var, src["layer2.0.bn1.running_var"])
    assert m.fc.out_features == 2

    # 3 channels: the kernel is copied; SE-ResNet18 takes resnet18 weights with its SE layers fresh
    m3 = create_model("resnet18", num_classes=2, in_chans=3, pretrained=path)
    assert torch.equal(m3.conv1.weight, src["conv1.weight"])
    se = create_model("se_resnet18", num_classes=2, pretrained=path, head_hidden=(8,))
    assert torch.equal(se.layer4[1].conv1.weight, src["layer4.1.conv1.weight"])

    # a file of another architecture: one line naming what does not fit
    with pytest.raises(XraylensError, match=r"do not fit resnet34: \d+ missing \(layer1\.2") as e:
        create_model("resnet34", num_classes=2, pretrained=path)
    assert "\n" not in str(e.value) and "--weights PATH" in str(e.value)
    with pytest.raises(XraylensError, match="not found"):
        create_model("resnet18", num_classes=2, pretrained=tmp_path / "nope.pth")


def test_pretrained_path_torchvision_densenet_safetensors(tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(2)
    src = torchvision.models.densenet121(weights=None).state_dict()
    path = tmp_path / "densenet121.safetensors"
    save_file(src, str(path))

    for name in ("densenet121", "se_densenet121"):  # SE-DenseNet: same convs/norms, SE layers fresh
        m = create_model(name, num_classes=2, in_chans=1, pretrained=path)
        torch.testing.assert_close(m.features.conv0.weight, src["features.conv0.weight"].sum(1, keepdim=True))
        key = "features.denseblock4.denselayer16.conv2.weight"
        assert torch.equal(m.get_parameter(key), src[key])
        assert m.classifier.out_features == 2


def test_old_torchvision_densenet_keys_are_remapped() -> None:
    from xraylens.models.densenet import remap_old_densenet_key as remap

    assert remap("features.denseblock1.denselayer1.norm.1.weight") == "features.denseblock1.denselayer1.norm1.weight"
    assert remap("features.norm5.weight") == "features.norm5.weight"


# ---- heads and partial unfreezing --------------------------------------------------------------


def test_head_hidden_shape_and_trainability() -> None:
    m = create_model("resnet18", num_classes=3, head_hidden=(32, 16), drop_rate=0.2, train_last=0)
    assert isinstance(m.fc, MLPHead)
    linears = [mod for mod in m.fc if isinstance(mod, nn.Linear)]
    assert [(li.in_features, li.out_features) for li in linears] == [(512, 32), (32, 16), (16, 3)]
    assert [type(mod).__name__ for mod in m.fc][:3] == ["Linear", "ReLU", "Dropout"]
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {f"fc.{n}" for n, _ in m.fc.named_parameters()}
    m.eval()
    assert m(torch.randn(2, 1, H, W)).shape == (2, 3)


def _trainable(m: nn.Module) -> set[str]:
    return {n for n, p in m.named_parameters() if p.requires_grad}


def _starting(m: nn.Module, *prefixes: str) -> set[str]:
    return {n for n, _ in m.named_parameters() if n.startswith(prefixes)}


def test_train_last_freezes_exactly_the_intended_stages() -> None:
    m = create_model("resnet18", num_classes=2, train_last=1)
    assert _trainable(m) == _starting(m, "layer4.", "fc.")
    m = create_model("resnet18", num_classes=2, train_last=4)
    assert _trainable(m) == _starting(m, "layer", "fc.")  # the stem stays frozen

    m = create_model("densenet121", num_classes=2, train_last=2)
    want = (
        "features.transition2.",
        "features.denseblock3.",
        "features.transition3.",
        "features.denseblock4.",
    )
    assert _trainable(m) == _starting(m, *want, "features.norm5.", "classifier.")

    m = create_model("efficientnet_b0", num_classes=2, train_last=1)
    assert _trainable(m) == _starting(m, "blocks.6.", "conv_head.", "bn2.", "classifier.")

    m = create_model("tinyvgg", num_classes=2, image_size=64, train_last=0)
    assert _trainable(m) == {"classifier.weight", "classifier.bias"}

    with pytest.raises(XraylensError, match="train_last must be an integer from 0"):
        create_model("tinyvgg", num_classes=2, image_size=64, train_last=3)


def test_vgg_stages() -> None:
    m = create_model("vgg16", num_classes=2, train_last=2)
    # stage 6 = fc6/fc7, stage 5 = the last conv block (features 24, 26, 28); head = classifier.6
    assert _trainable(m) == _starting(m, "features.24.", "features.26.", "features.28.", "classifier.")
    assert cam_layers(m) == ["features.30"]
    assert len(m.xraylens_arch.stages) == 6


# ---- SE placement -------------------------------------------------------------------------------


def test_se_resnet18_se_between_bn2_and_residual_add() -> None:
    from timm.layers import SEModule

    m = create_model("se_resnet18", num_classes=2).eval()
    ses = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, SEModule)]
    assert [n for n, _ in ses] == [f"layer{i}.{j}.se" for i in range(1, 5) for j in range(2)]
    assert [mod.fc1.out_channels for _, mod in ses][::2] == [4, 8, 16, 32]  # exact reduction 16

    block = m.layer1[0]  # no downsample: out = relu(se(bn2(...)) + x)
    seen: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def keep(name: str):
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            order.append(name)
            seen[name + ".in"], seen[name + ".out"] = inp[0], out.clone()  # clone: the add is in place

        return hook

    hs = [getattr(block, n).register_forward_hook(keep(n)) for n in ("bn2", "se", "act2")]
    hs.append(block.register_forward_hook(keep("block")))
    hs.append(block.register_forward_pre_hook(lambda mod, inp: seen.__setitem__("x", inp[0].clone())))
    with torch.no_grad():
        m(torch.randn(2, 1, H, W))
    for h in hs:
        h.remove()
    assert order == ["bn2", "se", "act2", "block"]
    assert seen["se.in"] is not None and torch.equal(seen["se.in"], seen["bn2.out"])
    torch.testing.assert_close(seen["block.out"], torch.relu(seen["se.out"] + seen["x"]))


def test_se_densenet121_se_placement() -> None:
    from xraylens.models.se_densenet import SELayer

    m = create_model("se_densenet121", num_classes=2)
    names = [n for n, mod in m.named_modules() if isinstance(mod, SELayer)]
    assert len(names) == 1 + 4 + 4 + (6 + 12 + 24 + 16)  # stem, before/after each block, every layer
    top = list(m.features._modules)
    assert top[:6] == ["conv0", "norm0", "relu0", "pool0", "se0", "se1a"]
    for k in range(1, 5):
        i = top.index(f"denseblock{k}")
        assert top[i - 1] == f"se{k}a" and top[i + 1] == f"se{k}b"
    for block in (m.features.denseblock1, m.features.denseblock4):
        for layer in block.values():
            assert next(iter(layer._modules)) == "se"  # SE first, on the concatenated input
    assert m.features.se0.fc1.out_features == 64 // 16
