import numpy as np
import pytest
import torch

from xraylens.data.cache import CachedSplit, load_split
from xraylens.data.loader import iterate_batches, to_model_input
from xraylens.data.records import Geometry
from xraylens.data.sources import load_source
from xraylens.errors import XraylensError


def _cached(n=50, h=6, w=5, labels=None) -> CachedSplit:
    rng = np.random.default_rng(0)
    labels = np.asarray(labels if labels is not None else np.arange(n) % 3, dtype=np.int64)
    geo = Geometry(h, w, (0.0, 0.0, float(w), float(h)), h, w)
    return CachedSplit(
        images=rng.integers(0, 256, (len(labels), h, w), dtype=np.uint8),
        labels=labels,
        ids=[f"i{k}" for k in range(len(labels))],
        geometry=[geo] * len(labels),
        classes=["a", "b", "c"],
    )


def test_shapes_dtypes_and_order():
    c = _cached()
    batches = list(iterate_batches(c, 16))
    assert [len(b[0]) for b in batches] == [16, 16, 16, 2]
    x, y, idx = batches[0]
    assert x.dtype == torch.uint8 and x.shape == (16, 1, 6, 5)
    assert y.dtype == torch.int64 and idx.dtype == torch.int64
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(50))  # no shuffle: file order
    for x, y, idx in batches:
        np.testing.assert_array_equal(x[:, 0].numpy(), c.images[idx.numpy()])
        np.testing.assert_array_equal(y.numpy(), c.labels[idx.numpy()])
    assert [len(b[0]) for b in iterate_batches(c, 16, drop_last=True)] == [16, 16, 16]
    with pytest.raises(XraylensError, match="batch_size"):
        next(iterate_batches(c, 0))


def test_shuffle_deterministic_in_seed_and_epoch():
    c = _cached()

    def order(**kw):
        return torch.cat([b[2] for b in iterate_batches(c, 8, shuffle=True, **kw)]).tolist()

    a = order(seed=1, epoch=0)
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert order(seed=1, epoch=0) == a
    assert order(seed=1, epoch=1) != a and order(seed=2, epoch=0) != a


def test_balanced_sampling_proportions():
    labels = np.array([0] * 90 + [1] * 10)
    c = _cached(labels=labels)
    drawn = []
    for epoch in range(20):
        ys = torch.cat([b[1] for b in iterate_batches(c, 32, balanced=True, seed=0, epoch=epoch)])
        assert len(ys) == 100  # N draws per epoch
        drawn.append(ys)
    frac = torch.cat(drawn).float().mean().item()
    assert abs(frac - 0.5) < 0.06  # minority class drawn ~half the time instead of 10%

    def order(epoch):
        return torch.cat([b[2] for b in iterate_batches(c, 32, balanced=True, seed=0, epoch=epoch)])

    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))


def test_to_model_input_numbers():
    x = torch.tensor([0, 255, 51, 128], dtype=torch.uint8).view(1, 1, 2, 2)
    out = to_model_input(x)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 2, 2)
    expected = (torch.tensor([0, 255, 51, 128]) / 255.0 - 0.5) / 0.25
    torch.testing.assert_close(out.flatten(), expected.float(), rtol=0, atol=1e-6)
    assert out.flatten()[:3].tolist() == pytest.approx([-2.0, 2.0, -1.2], abs=1e-6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = to_model_input(x, in_chans=3, mean=mean, std=std, channels_last=True)
    assert rgb.shape == (1, 3, 2, 2) and rgb.is_contiguous(memory_format=torch.channels_last)
    for ch in range(3):
        ref = (x[0, 0].float() / 255 - mean[ch]) / std[ch]
        torch.testing.assert_close(rgb[0, ch], ref, rtol=0, atol=1e-5)
    grey3 = to_model_input(x[:, 0], in_chans=3)  # [B,H,W] accepted; single mean repeated
    assert grey3.shape == (1, 3, 2, 2) and torch.equal(grey3[:, 0], grey3[:, 2])


def test_to_model_input_errors():
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(XraylensError, match="data.mean has 2 values; give 1 or in_chans=3"):
        to_model_input(x, in_chans=3, mean=(0.5, 0.5))
    with pytest.raises(XraylensError, match="std must be positive"):
        to_model_input(x, std=(0.0,))
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(x.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_model_input_moves_uint8_first():
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    out = to_model_input(x, device="cuda")
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), to_model_input(x))


def test_fixture_end_to_end(fixture_dir, tmp_path):
    c = load_split(load_source(fixture_dir / "knee_kl"), "train", 32, cache_dir=tmp_path)
    x, y, idx = next(iterate_batches(c, 8, shuffle=True, seed=0))
    xin = to_model_input(x, in_chans=3)
    assert xin.shape == (8, 3, 32, 32) and torch.isfinite(xin).all()
    assert -2.0 - 1e-6 <= xin.min() and xin.max() <= 2.0 + 1e-6


# (3, 3) and (4, 5) end on an uneven global batch (5 -> 2,2,1; 10 -> 3,3,2,2)
@pytest.mark.parametrize("world,bs", [(1, 4), (2, 4), (3, 3), (4, 5)])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("sampling", [{"shuffle": True}, {"balanced": True}])
def test_shards_over_ranks_concatenate_to_the_unsharded_global_batch(world, bs, drop_last, sampling):
    # DDP: batch_size is per process, so the global batch is bs * world images of the epoch order
    c = _cached(n=50)
    kw = dict(seed=5, epoch=2, drop_last=drop_last, **sampling)
    whole = list(iterate_batches(c, bs * world, **kw))
    shards = [list(iterate_batches(c, bs, shard=(r, world), **kw)) for r in range(world)]
    assert all(len(s) == len(whole) for s in shards)  # every rank takes the same number of steps
    for step, (x, y, idx) in enumerate(whole):
        parts = [s[step] for s in shards]
        sizes = [len(p[2]) for p in parts]
        # contiguous shares that differ by at most one, the extra images on the lower ranks
        assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1 and sizes[-1] >= 1
        assert torch.equal(torch.cat([p[2] for p in parts]), idx)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
    if not drop_last:  # the ragged last global batch ran too: 50 images in all, each exactly once
        assert sorted(torch.cat([b[2] for s in shards for b in s]).tolist()) == sorted(
            torch.cat([b[2] for b in whole]).tolist()
        )
        assert sum(len(b[2]) for s in shards for b in s) == 50


def test_shard_mistakes_are_errors():
    c = _cached(n=50)
    with pytest.raises(XraylensError, match="shard"):
        next(iterate_batches(c, 4, shard=(2, 2)))
    with pytest.raises(XraylensError, match="shard"):
        next(iterate_batches(c, 4, shard=(0, 0)))
    # 50 images in global batches of 12: the last global batch has 2 images, rank 2 of 3 gets none
    with pytest.raises(XraylensError, match="cannot feed 3 processes"):
        list(iterate_batches(c, 4, shard=(2, 3)))
    assert len(list(iterate_batches(c, 4, shard=(2, 3), drop_last=True))) == 50 // 12
