import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xraylens.data.cache as cache_mod
from xraylens.data.cache import (
    ORPHAN_AGE_S,
    cache_entries,
    clear_cache,
    format_cache_table,
    load_split,
    parse_age,
    parse_size,
    prepare_image,
    resolve_max_bytes,
    resolve_size,
)
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
    # a new entry, but only the edited file is decoded again: the other five rows are copied
    assert second.key != first.key and calls == [str(target)]
    assert abs(int(second.images[0].mean()) - 7) <= 1
    np.testing.assert_array_equal(second.images[1:], first.images[1:])


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
    np.savez(
        tmp_path / "m.npz",
        train_images=imgs,
        train_labels=np.arange(6) % 2,
        val_images=imgs[:2],
        val_labels=np.array([[0], [1]]),
    )
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


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _bump(path: Path, step: int) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + step * 10**9))


def test_touches_replace_the_old_entry(fixture_dir, tmp_path):
    root = _small_tree(tmp_path, fixture_dir, n=2)
    cdir = tmp_path / "c"
    other = load_split(load_source(root, val_fraction=0), "train", 12, cache_dir=cdir)  # other settings
    one = load_split(load_source(root, val_fraction=0), "train", 16, cache_dir=cdir)
    limit = 3 * sum(e.bytes for e in cache_entries(cdir))  # small, but room for both settings
    image = root / "NORMAL" / one.ids[0].split("/")[-1]
    keys = [one.key]
    for step in (1, 2, 3):  # three edits of one file: 4 -> 8 -> 12 files before
        _bump(image, step)
        keys.append(load_split(load_source(root, val_fraction=0), "train", 16, cache_dir=cdir, max_bytes=limit).key)
        # only the newest version of the 16 px entry is left, beside the untouched 12 px one
        assert _files(cdir) == sorted(f"{k}.{x}" for k in (other.key, keys[-1]) for x in ("npy", "json"))
    assert len(set(keys)) == 4


def test_least_recently_used_entry_goes_first(fixture_dir, tmp_path, monkeypatch, caplog):
    src = load_source(fixture_dir / "pneumonia")
    a = load_split(src, "val", 16, center_crop=1.0, cache_dir=tmp_path)
    b = load_split(src, "val", 16, center_crop=0.9, cache_dir=tmp_path)
    _age(tmp_path / f"{a.key}.json", 300)  # A written first ...
    _age(tmp_path / f"{b.key}.json", 200)
    size = max(e.bytes for e in cache_entries(tmp_path))
    _no_decode(monkeypatch)
    load_split(src, "val", 16, center_crop=1.0, cache_dir=tmp_path)  # ... but read last: a hit is a use
    monkeypatch.undo()
    c = load_split(src, "val", 16, center_crop=0.8, cache_dir=tmp_path, max_bytes=int(2.5 * size))
    assert [e.key for e in cache_entries(tmp_path)] == [c.key, a.key]  # most recent first; B evicted
    # an entry larger than the whole limit is not written, and evicts nothing
    with caplog.at_level(logging.WARNING, logger="xraylens.cache"):
        load_split(src, "val", 16, center_crop=0.7, cache_dir=tmp_path, max_bytes=size // 2)
    assert "larger than the cache limit" in caplog.text
    assert {e.key for e in cache_entries(tmp_path)} == {c.key, a.key}
    # the just-written entry stays even when the limit leaves room for nothing else
    d = load_split(src, "val", 16, center_crop=0.6, cache_dir=tmp_path, max_bytes=size + size // 2)
    assert [e.key for e in cache_entries(tmp_path)] == [d.key]


def test_orphans_are_removed_on_next_load(fixture_dir, tmp_path):
    src = load_source(fixture_dir / "pneumonia")
    c = load_split(src, "val", 12, cache_dir=tmp_path)
    dead = "val-" + "a" * 32
    old_tmp = tmp_path / f".{c.key}.npy.k3x9q2ab.npy"  # a writer killed mid-write (old mkstemp name)
    live_tmp = tmp_path / f".{dead}.npy.0badf00d.npy"  # a writer still running
    half = tmp_path / f"{dead}.npy"  # killed between the .npy and the .json
    lone_json = tmp_path / ("val-" + "b" * 32 + ".json")
    mine = [tmp_path / "notes.txt", tmp_path / ".hidden.npy.x.npy", tmp_path / "x.npy"]  # not the cache's
    for p in (old_tmp, live_tmp, half, lone_json, *mine):
        p.write_bytes(b"\0" * 100)
    for p in (old_tmp, half, *mine):
        _age(p, ORPHAN_AGE_S + 60)
    fresh_half = tmp_path / ("val-" + "c" * 32 + ".npy")  # a live writer's .npy before its .json
    fresh_half.write_bytes(b"")
    load_split(src, "val", 12, cache_dir=tmp_path)
    assert not old_tmp.exists() and not half.exists() and not lone_json.exists()
    assert live_tmp.exists() and fresh_half.exists() and all(p.exists() for p in mine)
    assert [e.key for e in cache_entries(tmp_path)] == [c.key]


def test_cache_entries_clear_and_table(fixture_dir, tmp_path):
    assert cache_entries(tmp_path / "none") == [] and clear_cache(tmp_path / "none") == (0, 0)
    src = load_source(fixture_dir / "pneumonia")
    a = load_split(src, "val", 12, cache_dir=tmp_path)
    b = load_split(src, "train", (20, 16), cache_dir=tmp_path)
    _age(tmp_path / f"{a.key}.json", 3 * 86400)
    es = cache_entries(tmp_path)
    assert [e.key for e in es] == [b.key, a.key]
    e = es[0]
    assert (e.split, e.n_images, e.image_shape, e.source) == ("train", 16, (20, 16), src.root)
    assert e.bytes == sum((tmp_path / f"{b.key}.{x}").stat().st_size for x in ("npy", "json"))
    assert e.created <= e.last_used <= time.time()
    table = format_cache_table(es, tmp_path, 2 * 1024**3).splitlines()
    assert table[0].split() == ["entry", "split", "images", "shape", "size", "last", "used", "source"]
    assert b.key in table[1] and "20x16" in table[1] and "just now" in table[1]
    assert a.key in table[2] and "3 d ago" in table[2]
    assert table[-1].startswith("2 entries, ") and table[-1].endswith(f"of 2.0 GiB (XRAYLENS_CACHE_MAX) in {tmp_path}")
    assert clear_cache(tmp_path, older_than=86400) == (1, es[1].bytes)
    assert clear_cache(tmp_path) == (1, es[0].bytes) and _files(tmp_path) == []


def test_cache_cli(fixture_dir, tmp_path):
    from typer.testing import CliRunner

    from xraylens.cli import app

    load_split(load_source(fixture_dir / "pneumonia"), "val", 12, cache_dir=tmp_path)
    run = CliRunner().invoke(app, ["cache", "list", "--cache-dir", str(tmp_path)])
    assert run.exit_code == 0 and "1 entry," in run.output and str(tmp_path) in run.output
    run = CliRunner().invoke(app, ["cache", "clear", "--cache-dir", str(tmp_path), "--older-than", "1d"])
    assert run.exit_code == 0 and "removed 0 entries" in run.output
    run = CliRunner().invoke(app, ["cache", "clear", "--cache-dir", str(tmp_path)])
    assert run.exit_code == 0 and "removed 1 entry " in run.output and _files(tmp_path) == []


def test_cache_files_honour_the_umask(fixture_dir, tmp_path):
    old = os.umask(0o022)
    try:
        c = load_split(load_source(fixture_dir / "pneumonia"), "val", 12, cache_dir=tmp_path)
    finally:
        os.umask(old)
    for x in ("npy", "json"):
        assert (tmp_path / f"{c.key}.{x}").stat().st_mode & 0o777 == 0o644


def test_size_settings(monkeypatch):
    assert parse_size("20G") == 20 * 1024**3 and parse_size("500m") == 500 * 1024**2
    assert parse_size("1.5GiB") == int(1.5 * 1024**3) and parse_size("123") == 123 and parse_size("0") == 0
    assert parse_size("unlimited") is None and parse_age("7d") == 7 * 86400 and parse_age("30m") == 1800
    monkeypatch.delenv("XRAYLENS_CACHE_MAX", raising=False)
    assert resolve_max_bytes() == 20 * 1024**3 and resolve_max_bytes(10) == 10 and resolve_max_bytes("1K") == 1024
    monkeypatch.setenv("XRAYLENS_CACHE_MAX", "unlimited")
    assert resolve_max_bytes() is None
    monkeypatch.setenv("XRAYLENS_CACHE_MAX", "lots")
    with pytest.raises(XraylensError, match=r"XRAYLENS_CACHE_MAX='lots' is not a size; set it to e.g. 20G"):
        resolve_max_bytes()
    for bad, match in ((-1, "max_bytes"), ("2X", "cache size")):
        with pytest.raises(XraylensError, match=match):
            resolve_max_bytes(bad)
    with pytest.raises(XraylensError, match="age '7'"):
        parse_age("7")
