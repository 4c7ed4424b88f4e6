"""cat_elastic: the [original, CLAHE+Sobel] input, elastic deformation drawn from a set of (alpha, sigma)
on a fraction of the batch, and non-square inputs through train, evaluate, predict, explain, localize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from skimage import exposure, filters

from xraylens.config import RunConfig
from xraylens.data.augment import GpuAugment
from xraylens.data.cache import prepare_image
from xraylens.data.enhance import add_enhanced_channel
from xraylens.errors import XraylensError
from xraylens.runs import InputSettings

PAIRS = [(34.0, 4.0), (40.0, 6.0), (50.0, 8.0)]


def _fixture_images(fixture_dir, size=(40, 28)):
    files = sorted((fixture_dir / "osteoporosis" / "images").rglob("*.png"))
    assert len(files) == 9
    return files, np.stack([prepare_image(f, size)[0] for f in files])


def test_enhanced_channel_is_the_documented_recipe(fixture_dir):
    _, imgs = _fixture_images(fixture_dir)
    x = torch.from_numpy(imgs)[:, None]
    out = add_enhanced_channel(x)
    assert out.shape == (9, 2, 40, 28) and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], x[:, 0])  # channel 0 is the original, untouched
    for i, img in enumerate(imgs):
        # by hand, as the README and data/enhance.py state it
        c = exposure.equalize_adapthist(img, kernel_size=None, clip_limit=0.01, nbins=256)
        e = filters.sobel(c)
        want = np.rint(255.0 * e / e.max()).astype(np.uint8)
        np.testing.assert_array_equal(out[i, 1].numpy(), want)
        assert want.max() == 255 and want.std() > 5  # real edges, not a blank channel
    # the memo returns the same bytes the second time
    assert torch.equal(add_enhanced_channel(x), out)


def test_model_input_carries_both_channels_normalised(fixture_dir):
    _, imgs = _fixture_images(fixture_dir)
    cfg = RunConfig().override(["data.augment=flip,cat_elastic", "data.image_size=40x28"])
    assert (cfg.data.augment, cfg.data.enhance, cfg.model.in_chans) == ("flip,elastic", "clahe-sobel", 2)
    inputs = InputSettings.from_config(cfg)
    x8 = torch.from_numpy(imgs)[:, None]
    xin = inputs.to_model(x8, "cpu")
    assert xin.shape == (9, 2, 40, 28)
    enh = add_enhanced_channel(x8)[:, 1].float()
    torch.testing.assert_close(xin[:, 1], (enh / 255.0 - 0.5) / 0.25, rtol=0, atol=1e-5)
    torch.testing.assert_close(xin[:, 0], (x8[:, 0].float() / 255.0 - 0.5) / 0.25, rtol=0, atol=1e-5)


def test_config_rules_for_the_two_channel_input():
    with pytest.raises(XraylensError, match="in_chans=2"):
        RunConfig().override(["data.enhance=clahe-sobel"]).check()
    with pytest.raises(XraylensError, match="2 only with data.enhance"):
        RunConfig().override(["model.in_chans=2"]).check()
    with pytest.raises(XraylensError, match="data.enhance 'sharpen' is unknown"):
        RunConfig().override(["data.enhance=sharpen"]).check()
    with pytest.raises(XraylensError, match="alpha:sigma"):
        RunConfig().override(["data.elastic_params=34:0"]).check()
    with pytest.raises(XraylensError, match="alpha:sigma"):
        RunConfig().override(["data.elastic_params=34"]).check()
    cfg = RunConfig().override(["data.image_size=704x407"])
    assert cfg.data.image_size == [704, 407]
    cfg.check()
    with pytest.raises(XraylensError, match="at least 8"):
        RunConfig().override(["data.image_size=704x4"]).check()


def test_elastic_fraction_and_seeded_draws():
    b = 2000
    x = torch.randn(b, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    aug = GpuAugment(elastic=True, elastic_params=PAIRS, elastic_p=0.3)
    y = aug(x, generator=torch.Generator().manual_seed(7))
    changed = (y - x).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert 0.27 < changed.float().mean().item() < 0.33
    assert torch.equal(y[~changed], x[~changed])  # untouched samples, bit for bit
    # both channels of a sample get the same warp: a sample whose channels are equal stays so
    same = x[:, :1].expand(-1, 2, -1, -1).contiguous()
    ys = aug(same, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ys[:, 0], ys[:, 1])
    # the selection is exactly the documented draw order: 6 uniforms per sample, then (select, pair)
    g = torch.Generator().manual_seed(7)
    torch.rand(6, b, generator=g)
    u_el, u_pick = torch.rand(2, b, generator=g).unbind(0)
    assert torch.equal(changed, u_el < 0.3)
    pick = (u_pick * 3).long()
    counts = torch.bincount(pick[u_el < 0.3], minlength=3)
    assert counts.min() > 150  # every (alpha, sigma) of the set is drawn
    # reproducible with the same seed, different with another
    assert torch.equal(aug(x, generator=torch.Generator().manual_seed(7)), y)
    assert not torch.equal(aug(x, generator=torch.Generator().manual_seed(8)), y)


def test_each_pair_sets_the_displacement_size():
    # a larger sigma smooths the same noise more: mean |displacement| falls with sigma at equal alpha
    x = torch.linspace(-1, 1, 64).view(1, 1, 1, 64).expand(400, 1, 64, 64).contiguous()
    sizes = []
    for sigma in (2.0, 8.0):
        aug = GpuAugment(elastic=True, elastic_params=[(30.0, sigma)], elastic_p=1.0)
        y = aug(x, generator=torch.Generator().manual_seed(1))
        sizes.append((y - x)[:, :, 16:48, 16:48].abs().mean().item())
    assert sizes[0] > sizes[1] > 0


def test_non_square_cat_elastic_end_to_end(fixture_dir, tmp_path):
    from xraylens.data.phantom import write_phantom
    from xraylens.evaluate.predict import predict_files
    from xraylens.evaluate.run import evaluate_run
    from xraylens.explain.run import explain_run
    from xraylens.localize.run import localize_run
    from xraylens.runs import open_run
    from xraylens.train.loop import train

    # the osteoporosis fixture: train, evaluate, predict, explain at 40 x 24 (H x W)
    data = fixture_dir / "osteoporosis" / "images"
    cfg = tiny_config(data, **{"model.name": "tinyvgg_bn", "data.augment": "flip,cat_elastic"})
    cfg.set("data.image_size", "40x24")
    run_dir = tmp_path / "run"
    train(cfg, run_dir, progress=False)
    run = open_run(run_dir, device="cpu")
    assert run.model.in_chans == 2 and run.config.data.image_size == [40, 24]
    m = evaluate_run(run, None, "val", out=tmp_path / "ev")
    assert m["n_images"] >= 1 and 0.0 <= m["accuracy"] <= 1.0
    files = sorted(data.rglob("*.png"))[:2]
    preds = predict_files(run, files)
    assert len(preds) == 2
    explain_run(run, None, "val", out=tmp_path / "cams", device="cpu")
    maps = np.load(tmp_path / "cams" / "maps.npz")["gradcam"]
    assert maps.shape[1:] == (40, 24) and np.isfinite(maps).all() and maps.max() > 0
    # serve's model worker: the same two-channel input, maps at the input size
    from xraylens.serve.predictor import Predictor

    server = Predictor(run, max_batch=2, warm_up=False)
    try:
        arr, _ = run.inputs.prepare(files[0])
        got = server.submit(arr, ["gradcam"]).result()
        assert got.maps["gradcam"].shape == (40, 24)
        np.testing.assert_allclose(got.probabilities, list(preds[0]["probabilities"].values()), atol=1e-5)
    finally:
        server.close()

    # localize needs boxes: a phantom with known lesions, trained non-square with cat_elastic
    root = write_phantom(tmp_path / "ph", n_train=16, n_val=8, n_test=8, size=48, seed=2)
    cfg = tiny_config(root, **{"model.name": "tinyvgg_bn", "data.augment": "cat_elastic"})
    cfg.set("data.image_size", "48x32")
    train(cfg, tmp_path / "prun", progress=False)
    ls = localize_run(
        tmp_path / "prun", annotations=root / "boxes.csv", fmt="nih", split="test", device="cpu",
        out=tmp_path / "loc", bootstrap=0,
    )  # fmt: skip
    assert ls.n_annotated >= 1
    assert all(np.isfinite(v) for v in ls.overall.values())
    prun = open_run(tmp_path / "prun", device="cpu")
    _, cached = prun.load_split(None, "test")
    assert cached.images.shape[1:] == (48, 32)
    assert prun.inputs.to_model(torch.from_numpy(np.array(cached.images[:2]))[:, None]).shape == (2, 2, 48, 32)
