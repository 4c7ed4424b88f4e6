"""The cache is memory-mapped and incremental: only new, changed or damaged rows are decoded."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import xraylens.data.cache as cache_mod
from xraylens.data.cache import CachedSplit, cache_entries, load_split
from xraylens.data.loader import iterate_batches, resolve_placement, stage_images
from xraylens.data.sources import load_source
from xraylens.errors import XraylensError


def _tree(tmp_path: Path, fixture_dir: Path, n: int = 4) -> Path:
    root = tmp_path / "ds"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((fixture_dir / "pneumonia" / cls).iterdir())[:n]:
            shutil.copy(f, root / cls / f.name)
    return root


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = cache_mod.decode_image
    monkeypatch.setattr(cache_mod, "decode_image", lambda p: calls.append(Path(p).name) or real(p))
    return calls


def _load(root: Path, cdir: Path, size=(24, 20)) -> CachedSplit:
    return load_split(load_source(root, val_fraction=0), "train", size, cache_dir=cdir, workers=2)


def test_added_and_removed_files_decode_only_themselves(fixture_dir, tmp_path, monkeypatch):
    root, cdir = _tree(tmp_path, fixture_dir), tmp_path / "c"
    first = _load(root, cdir)  # non-square: 24 high, 20 wide
    assert first.images.shape == (8, 24, 20)
    calls = _count_decodes(monkeypatch)
    extra = sorted((fixture_dir / "pneumonia" / "NORMAL").iterdir())[5]
    shutil.copy(extra, root / "NORMAL" / extra.name)
    added = _load(root, cdir)
    assert calls == [extra.name] and len(added) == 9
    for i, rid in enumerate(added.ids):  # every other row is the old row, byte for byte
        if rid in first.ids:
            np.testing.assert_array_equal(added.images[i], first.images[first.ids.index(rid)])
            assert added.geometry[i] == first.geometry[first.ids.index(rid)]
    calls.clear()
    gone = root / "PNEUMONIA" / sorted(os.listdir(root / "PNEUMONIA"))[0]
    gone.unlink()
    removed = _load(root, cdir)
    assert calls == [] and len(removed) == 8 and f"PNEUMONIA/{gone.name}" not in removed.ids
    # the older versions were replaced: one entry left, and it is the newest
    assert [e.key for e in cache_entries(cdir)] == [removed.key]


def test_unchanged_broken_file_is_not_retried(fixture_dir, tmp_path, monkeypatch):
    root, cdir = _tree(tmp_path, fixture_dir, n=2), tmp_path / "c"
    (root / "NORMAL" / "broken.png").write_text("not an image")
    first = _load(root, cdir)
    assert [s[0] for s in first.skipped] == ["NORMAL/broken.png"]
    calls = _count_decodes(monkeypatch)
    shutil.copy(next((fixture_dir / "pneumonia" / "PNEUMONIA").iterdir()), root / "PNEUMONIA" / "new.jpeg")
    again = _load(root, cdir)
    assert calls == ["new.jpeg"] and again.skipped == first.skipped


def test_split_is_a_read_only_memmap_of_the_cache_file(fixture_dir, tmp_path):
    c = load_split(load_source(fixture_dir / "knee_kl"), "train", 32, cache_dir=tmp_path)
    again = load_split(load_source(fixture_dir / "knee_kl"), "train", 32, cache_dir=tmp_path)
    for split in (c, again):
        assert isinstance(split.images, np.memmap) and not split.images.flags.writeable
        assert Path(split.images.filename) == tmp_path / f"{c.key}.npy"


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status (not Linux)")


def test_an_epoch_over_the_map_keeps_the_pixels_out_of_anonymous_memory(tmp_path):
    # 2,400 images of 128x128, 2,040 of them train = 33 MB of pixels; an epoch reads every row from the map
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2400, 128, 128), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", train_images=imgs, train_labels=np.arange(2400) % 2)
    del imgs
    load_split(load_source(tmp_path / "big.npz"), "train", 128, cache_dir=tmp_path / "c", workers=1)
    src = load_source(tmp_path / "big.npz")  # an .npz source holds its own arrays: not the cache's doing
    before = _rss_anon()
    c = load_split(src, "train", 128, cache_dir=tmp_path / "c")
    total = 0
    for x, _, _ in iterate_batches(c, 64, shuffle=True, seed=1):
        total += int(x[:, 0, 0, 0].sum())
    grown = _rss_anon() - before
    # a split held in RAM would add its 33 MB here; the map's pages are file-backed (the kernel may drop them)
    assert c.images.nbytes > 33_000_000 and grown < c.images.nbytes // 4, grown
    assert total > 0


def test_map_and_ram_give_identical_batches_and_training(fixture_dir, tmp_path):
    mapped = load_split(load_source(fixture_dir / "pneumonia"), "train", 32, cache_dir=tmp_path)
    in_ram = CachedSplit(images=np.array(mapped.images), labels=mapped.labels, ids=mapped.ids, geometry=mapped.geometry)
    assert not isinstance(in_ram.images, np.memmap)

    def train_three_steps(c: CachedSplit) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        net.append(torch.nn.Linear(4, 2))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        seen = []
        for epoch in range(3):
            for x, y, idx in iterate_batches(c, 5, shuffle=True, seed=3, epoch=epoch, drop_last=True):
                seen.append((x.clone(), y, idx))
                loss = torch.nn.functional.cross_entropy(net(x.float() / 255), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return seen, [p.detach() for p in net.parameters()]

    (seen_a, w_a), (seen_b, w_b) = train_three_steps(mapped), train_three_steps(in_ram)
    assert len(seen_a) == 9
    for (xa, ya, ia), (xb, yb, ib) in zip(seen_a, seen_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    for a, b in zip(w_a, w_b, strict=True):
        assert torch.equal(a, b)


def test_damaged_chunk_re_decodes_its_rows_only(fixture_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_ROWS", 4)
    src = load_source(fixture_dir / "pneumonia")
    c = load_split(src, "train", 16, cache_dir=tmp_path)
    good = np.array(c.images)
    meta = json.loads((tmp_path / f"{c.key}.json").read_text())
    assert meta["chunk_rows"] == 4 and len(meta["crc"]) == 4
    npy = tmp_path / f"{c.key}.npy"
    data = bytearray(npy.read_bytes())
    offset = len(data) - good.nbytes + 9 * 16 * 16 + 7  # a pixel of row 9: chunk 2 (rows 8-11)
    data[offset] ^= 0xFF
    npy.write_bytes(bytes(data))
    calls = _count_decodes(monkeypatch)
    monkeypatch.setenv("XRAYLENS_CACHE_VERIFY", "0")  # the user's choice: no pass over the file, no check
    unchecked = load_split(src, "train", 16, cache_dir=tmp_path)
    assert calls == [] and unchecked.images[9, 0, 7] == good[9, 0, 7] ^ 0xFF
    monkeypatch.delenv("XRAYLENS_CACHE_VERIFY")
    again = load_split(src, "train", 16, cache_dir=tmp_path)
    assert sorted(calls) == sorted(Path(next(r.path for r in src.records if r.id == i)).name for i in c.ids[8:12])
    np.testing.assert_array_equal(again.images, good) and again.key == c.key
    calls.clear()
    load_split(src, "train", 16, cache_dir=tmp_path)
    assert calls == []  # repaired on disk


def test_truncated_file_is_rebuilt(fixture_dir, tmp_path):
    src = load_source(fixture_dir / "pneumonia")
    c = load_split(src, "val", 16, cache_dir=tmp_path)
    good = np.array(c.images)
    npy = tmp_path / f"{c.key}.npy"
    npy.write_bytes(npy.read_bytes()[:-100])
    np.testing.assert_array_equal(load_split(src, "val", 16, cache_dir=tmp_path).images, good)


def test_multichannel_rows(fixture_dir, tmp_path, monkeypatch):
    # a two-channel preprocessing (image + an edge map) caches [N, 2, H, W] and batches [B, 2, H, W]
    real = cache_mod.prepare_image

    def two_channels(p, size, crop=1.0):
        img, geo = real(p, size, crop)
        return np.stack([img, 255 - img]), geo

    monkeypatch.setattr(cache_mod, "prepare_image", two_channels)
    src = load_source(fixture_dir / "knee_kl")
    c = load_split(src, "val", (16, 12), cache_dir=tmp_path)
    assert c.images.shape == (len(c), 2, 16, 12)
    again = load_split(src, "val", (16, 12), cache_dir=tmp_path)
    np.testing.assert_array_equal(again.images[:, 1], 255 - again.images[:, 0])
    x, _, _ = next(iterate_batches(again, 3))
    assert tuple(x.shape) == (3, 2, 16, 12)
    assert cache_entries(tmp_path)[0].image_shape == (16, 12)


_BUILD = textwrap.dedent(
    """
    import sys, zlib
    from xraylens.data.cache import load_split
    from xraylens.data.sources import load_source
    c = load_split(load_source(sys.argv[1]), "train", 48, cache_dir=sys.argv[2], workers=1)
    print(c.key, zlib.crc32(bytes(c.images)), len(c))
    """
)


def test_two_processes_building_one_entry(fixture_dir, tmp_path, monkeypatch):
    cdir = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD, str(fixture_dir / "pneumonia"), str(cdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert outs[0][0] == outs[1][0]  # same key, same pixels
    key = outs[0][0].split()[0]
    assert sorted(p.name for p in cdir.iterdir()) == [f"{key}.json", f"{key}.npy"]  # no temp left behind
    _count_decodes(monkeypatch)
    monkeypatch.setattr(cache_mod, "decode_image", lambda p: (_ for _ in ()).throw(AssertionError(p)))
    c = load_split(load_source(fixture_dir / "pneumonia"), "train", 48, cache_dir=cdir)
    assert f"{c.key} " in outs[0][0] and str(len(c)) == outs[0][0].split()[2]


def test_placement(fixture_dir, tmp_path):
    c = load_split(load_source(fixture_dir / "pneumonia"), "val", 16, cache_dir=tmp_path)
    assert resolve_placement("auto", 10**12, "cpu") == "mmap" and resolve_placement("gpu", 1, "cpu") == "mmap"
    assert stage_images(c, "cpu", "pinned") == ("mmap", None)
    with pytest.raises(XraylensError, match="data.placement 'disk' is not one of auto, gpu, pinned, mmap"):
        resolve_placement("disk", 1, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU-resident and pinned splits)")
def test_gpu_and_pinned_placements_match_the_map(fixture_dir, tmp_path):
    c = load_split(load_source(fixture_dir / "pneumonia"), "train", 32, cache_dir=tmp_path)
    assert resolve_placement("auto", c.images.nbytes, "cuda") == "gpu"
    ref = list(iterate_batches(c, 6, shuffle=True, seed=2))
    for where in ("gpu", "pinned"):
        got = list(iterate_batches(c, 6, shuffle=True, seed=2, device="cuda", placement=where))
        for (xa, ya, ia), (xb, yb, ib) in zip(ref, got, strict=True):
            assert xb.is_cuda == (where == "gpu") and (where != "pinned" or xb.is_pinned())
            assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb) and torch.equal(ia, ib)
