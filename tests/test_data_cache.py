import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xraylens.data.cache as cache_mod
from xraylens.data.cache import load_split, prepare_image, resolve_size
from xraylens.data.sources import load_source
from xraylens.errors import DecodeError, XraylensError


def _no_decode(monkeypatch):
    def boom(path):
        raise AssertionError(f"decoded {path} although the split was cached")

    monkeypatch.setattr(cache_mod, "decode_image", boom)


def _small_tree(tmp_path: Path, fixture_dir: Path, n: int = 3) -> Path:
    # tmp copies (outside the repo) so the test may touch and break files
    root = tmp_path / "ds"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((fixture_dir / "pneumonia" / cls).iterdir())[:n]:
            shutil.copy(f, root / cls / f.name)
    return root


def test_load_split_fixture_matches_prepare_image(fixture_dir, tmp_path):
    src = load_source(fixture_dir / "pneumonia")
    c = load_split(src, "train", (40, 32), center_crop=0.8, cache_dir=tmp_path)
    assert c.images.dtype == np.uint8 and c.images.shape == (16, 40, 32)
    assert c.labels.dtype == np.int64 and c.labels.tolist() == [r.label for r in src.split("train")]
    assert c.ids == [r.id for r in src.split("train")] and c.skipped == [] and len(c) == 16
    assert c.classes == ["NORMAL", "PNEUMONIA"]
    path = next(r.path for r in src.records if r.id == c.ids[5])
    img, geo = prepare_image(path, (40, 32), 0.8)  # the one preprocessing path
    np.testing.assert_array_equal(c.images[5], img)
    assert c.geometry[5] == geo and geo.crop == pytest.approx((22.4, 22.4, 179.2, 179.2))
    assert (tmp_path / f"{c.key}.npy").is_file() and (tmp_path / f"{c.key}.json").is_file()


def test_second_call_never_decodes(fixture_dir, tmp_path, monkeypatch):
    src = load_source(fixture_dir / "knee_kl")
    first = load_split(src, "val", 24, cache_dir=tmp_path, workers=2)
    _no_decode(monkeypatch)
    again = load_split(load_source(fixture_dir / "knee_kl"), "val", 24, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.images, first.images)
    assert again.ids == first.ids and again.geometry == first.geometry and again.key == first.key
    np.testing.assert_array_equal(again.labels, first.labels)
    # other settings are another entry, so they do decode
    with pytest.raises(AssertionError, match="decoded"):
        load_split(src, "val", 24, center_crop=0.9, cache_dir=tmp_path)


def test_env_cache_dir(fixture_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XRAYLENS_CACHE", str(tmp_path / "envcache"))
    c = load_split(load_source(fixture_dir / "pneumonia"), "val", 16, progress=True)
    assert (tmp_path / "envcache" / f"{c.key}.npy").is_file()


def test_changed_file_invalidates(fixture_dir, tmp_path, monkeypatch):
    root = _small_tree(tmp_path, fixture_dir)
    first = load_split(load_source(root, val_fraction=0), "train", 16, cache_dir=tmp_path / "c")
    target = root / "NORMAL" / first.ids[0].split("/")[-1]
    Image.fromarray(np.full((30, 30), 7, np.uint8)).save(target, format="JPEG")
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = []
    real = cache_mod.decode_image
    monkeypatch.setattr(cache_mod, "decode_image", lambda p: calls.append(p) or real(p))
    second = load_split(load_source(root, val_fraction=0), "train", 16, cache_dir=tmp_path / "c")
    assert second.key != first.key and len(calls) == 6
    assert abs(int(second.images[0].mean()) - 7) <= 1


def test_unreadable_files_are_skipped_and_reported(fixture_dir, tmp_path):
    root = _small_tree(tmp_path, fixture_dir)
    data = next((root / "NORMAL").iterdir()).read_bytes()
    (root / "NORMAL" / "cut.jpeg").write_bytes(data[: len(data) // 3])
    (root / "PNEUMONIA" / "empty.png").write_bytes(b"")
    (root / "PNEUMONIA" / "text.png").write_text("hello")
    c = load_split(load_source(root, val_fraction=0), "train", 16, cache_dir=tmp_path / "c", workers=2)
    assert len(c) == 6 and c.images.shape == (6, 16, 16)
    reasons = dict(c.skipped)
    assert set(reasons) == {"NORMAL/cut.jpeg", "PNEUMONIA/empty.png", "PNEUMONIA/text.png"}
    assert "truncated" in reasons["NORMAL/cut.jpeg"] and "empty file" in reasons["PNEUMONIA/empty.png"]
    # the skip list is cached too
    again = load_split(load_source(root, val_fraction=0), "train", 16, cache_dir=tmp_path / "c")
    assert again.skipped == c.skipped


def test_no_readable_image_is_an_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        (tmp_path / "ds" / cls / "x.png").write_text("not an image")
    with pytest.raises(XraylensError, match=r"none of the 2 images of split 'train' .* could be decoded"):
        load_split(load_source(tmp_path / "ds", val_fraction=0), "train", 8, cache_dir=tmp_path / "c")
    with pytest.raises(XraylensError, match=r"no 'test' split \(found: train\)"):
        load_split(load_source(tmp_path / "ds", val_fraction=0), "test", 8, cache_dir=tmp_path / "c")


def test_geometry_maps_a_known_point(tmp_path):
    # a 4x4 bright block centred at original (x=80, y=40) in a 100x200 (h x w) image
    img = np.zeros((100, 200), np.uint8)
    img[38:42, 78:82] = 255
    out, geo = prepare_image(img, (100, 200), center_crop=0.5)  # crop (50, 25, 100, 50), scale 2
    assert geo.crop == (50.0, 25.0, 100.0, 50.0) and geo.scale_x == 2.0 and geo.scale_y == 2.0
    ex, ey = geo.to_input(np.array([80.0, 40.0]))
    assert (ex, ey) == (60.0, 30.0)
    ys, xs = np.nonzero(out > 64)
    w = out[ys, xs].astype(float)
    # pixel (r, c) covers [c, c+1): its centre is c + 0.5
    assert abs((xs + 0.5) @ w / w.sum() - ex) < 0.5 and abs((ys + 0.5) @ w / w.sum() - ey) < 0.5
    np.testing.assert_allclose(geo.to_original(geo.to_input(np.array([[3.0, 7.0]]))), [[3.0, 7.0]])


def test_prepare_image_path_equals_array(fixture_dir):
    path = sorted((fixture_dir / "knee_kl" / "2").iterdir())[0]
    a, ga = prepare_image(path, 32, 0.9)
    b, gb = prepare_image(np.asarray(Image.open(path)), (32, 32), 0.9)
    np.testing.assert_array_equal(a, b)
    assert ga == gb and a.shape == (32, 32)
    with pytest.raises(XraylensError, match="center_crop"):
        prepare_image(path, 32, 1.5)
    with pytest.raises(DecodeError):
        prepare_image(path.parent / "missing.png", 32)


def test_resolve_size():
    assert resolve_size(7) == (7, 7) and resolve_size((3, 5)) == (3, 5)
    for bad in (0, (1, 2, 3), (0, 4)):
        with pytest.raises(XraylensError, match="image_size"):
            resolve_size(bad)


def test_npz_goes_through_prepare_image(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "m.npz", train_images=imgs, train_labels=np.arange(6) % 2,
             val_images=imgs[:2], val_labels=np.array([[0], [1]]))
    src = load_source(tmp_path / "m.npz")
    c = load_split(src, "train", 14, cache_dir=tmp_path / "c", workers=1)
    assert c.images.shape == (6, 14, 14) and c.labels.tolist() == [0, 1, 0, 1, 0, 1]
    np.testing.assert_array_equal(c.images[3], prepare_image(imgs[3], 14)[0])
    assert c.ids[3] == "m.npz:train:3"
    monkeypatch.setattr(cache_mod, "prepare_image", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = load_split(load_source(tmp_path / "m.npz"), "train", 14, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(again.images, c.images)


def test_damaged_cache_entry_is_rebuilt(fixture_dir, tmp_path):
    src = load_source(fixture_dir / "pneumonia")
    c = load_split(src, "val", 12, cache_dir=tmp_path)
    (tmp_path / f"{c.key}.json").write_text("{not json")
    again = load_split(src, "val", 12, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.images, c.images)
