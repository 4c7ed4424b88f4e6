import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xraylens.data.decode import decode_image
from xraylens.errors import DecodeError, XraylensError


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


def test_fixture_png_and_rgb_jpeg(fixture_dir):
    png = _first(fixture_dir / "knee_kl" / "0")
    out = decode_image(png)
    assert out.dtype == np.uint8 and out.ndim == 2 and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, np.asarray(Image.open(png)))
    jpg = _first(fixture_dir / "pneumonia" / "NORMAL")
    out = decode_image(jpg)
    assert out.shape == (224, 224)
    np.testing.assert_array_equal(out, np.asarray(Image.open(jpg).convert("L")))


def test_truncated_jpeg(fixture_dir, tmp_path):
    data = _first(fixture_dir / "pneumonia" / "NORMAL").read_bytes()
    cut = tmp_path / "cut.jpeg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match=r"cut.jpeg: not a readable image \(.*truncated"):
        decode_image(cut)


def test_empty_text_and_missing(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DecodeError, match=r"empty.png: empty file \(0 bytes\)"):
        decode_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("this is not an image\n")
    with pytest.raises(DecodeError, match="text.png: not a readable image"):
        decode_image(tmp_path / "text.png")
    with pytest.raises(DecodeError, match="gone.png: cannot open"):
        decode_image(tmp_path / "gone.png")


def _blocks(a: np.ndarray, k: int = 4) -> np.ndarray:
    """Each pixel as a k x k block: small test pictures grown past the minimum side."""
    return np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def test_16bit_png_minmax(tmp_path):
    arr = np.array([[1000, 1800], [3000, 5000]], dtype=np.uint16)
    Image.fromarray(_blocks(arr)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = decode_image(tmp_path / "deep.png")
    # (v - 1000) / 4000 * 255: 0, 51, 127.5 -> 128, 255
    np.testing.assert_array_equal(out, _blocks(np.array([[0, 51], [128, 255]])))
    Image.fromarray(np.full((8, 8), 777, np.uint16)).save(tmp_path / "flat.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "flat.png"), np.zeros((8, 8), np.uint8))


def test_rgba_alpha_is_discarded(tmp_path):
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 50
    rgba[:4, :, 3] = 0  # fully transparent top half keeps its grey value (no compositing on black)
    rgba[4:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png")
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert out.shape == (8, 10) and np.all(np.abs(out.astype(int) - expected) <= 1)
    la = np.stack([np.full((8, 8), 90, np.uint8), np.zeros((8, 8), np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "la.png"), np.full((8, 8), 90))


# ------------------------------------------------------------------------------------------ size limits


def test_pixel_limit_parameter_and_environment(fixture_dir, monkeypatch):
    jpg = _first(fixture_dir / "pneumonia" / "NORMAL")  # 224 x 224 = 50,176 pixels
    with pytest.raises(
        DecodeError,
        match=r"224x224 image \(50,176 pixels\) is above the limit of 50,000 "
        r"pixels; set XRAYLENS_MAX_PIXELS=50176 \(or more\)",
    ):
        decode_image(jpg, max_pixels=50_000)
    assert decode_image(jpg, max_pixels=50_176).shape == (224, 224)
    monkeypatch.setenv("XRAYLENS_MAX_PIXELS", "50000")
    with pytest.raises(DecodeError, match="above the limit of 50,000 pixels"):
        decode_image(jpg)
    monkeypatch.setenv("XRAYLENS_MAX_PIXELS", "lots")
    with pytest.raises(XraylensError, match="XRAYLENS_MAX_PIXELS='lots' is not a positive whole number"):
        decode_image(jpg)


def test_no_raw_pillow_warning_and_our_limit_governs(fixture_dir, monkeypatch):
    jpg = _first(fixture_dir / "pneumonia" / "NORMAL")
    # stand-in for a huge file: shrink Pillow's own limit so a 224 x 224 image trips it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any DecompressionBombWarning fails the test
        # within our limit: decoded (Pillow's limit is raised to ours, not left to refuse the file)
        assert decode_image(jpg, max_pixels=60_000).shape == (224, 224)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
        # between Pillow's limit and twice it: Pillow would only warn; ours refuses with its message
        with pytest.raises(DecodeError, match="above the limit of 30,000 pixels"):
            decode_image(jpg, max_pixels=30_000)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
        # over twice Pillow's limit: its DecompressionBombError becomes ours
        with pytest.raises(DecodeError, match=r"image of 50,176 pixels is above the limit of 20,000"):
            decode_image(jpg, max_pixels=20_000)


def test_dicom_pixel_limit(tmp_path):
    path = _dicom(tmp_path / "big.dcm", RAMP)
    with pytest.raises(DecodeError, match=r"big.dcm: 40x25 image \(1,000 pixels\) is above the limit of 999"):
        decode_image(path, max_pixels=999)


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (300, 7)])
def test_tiny_image_is_refused(tmp_path, shape):
    Image.fromarray(np.full(shape, 128, np.uint8)).save(tmp_path / "tiny.png")
    h, w = shape
    with pytest.raises(DecodeError, match=rf"tiny.png: {w}x{h} image is smaller than 8 pixels on a side"):
        decode_image(tmp_path / "tiny.png")
    path = _dicom(tmp_path / "tiny.dcm", np.arange(h * w).reshape(shape))
    with pytest.raises(DecodeError, match=rf"tiny.dcm: {w}x{h} image is smaller than 8 pixels"):
        decode_image(path)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "ok.png")
    assert decode_image(tmp_path / "ok.png").shape == (8, 8)


def test_cache_reports_refused_files_as_skipped(fixture_dir, tmp_path, monkeypatch):
    from xraylens.data.cache import load_split
    from xraylens.data.sources import load_source

    root = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for src in sorted((fixture_dir / "pneumonia" / cls).iterdir())[:3]:
            shutil.copy(src, root / cls / src.name)
    big = np.asarray(Image.open(_first(fixture_dir / "pneumonia" / "NORMAL")).convert("L").resize((300, 300)))
    Image.fromarray(big).save(root / "NORMAL" / "big.png")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(root / "NORMAL" / "dot.png")
    monkeypatch.setenv("XRAYLENS_MAX_PIXELS", str(224 * 224))
    source = load_source(root)
    split = source.splits[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = load_split(source, split, 32, cache_dir=tmp_path / "cache", workers=2)
    reasons = dict(c.skipped)
    assert len(c) == len(source.split(split)) - 2
    big_id, dot_id = (next(i for i in reasons if n in i) for n in ("big.png", "dot.png"))
    assert "above the limit of 50,176 pixels; set XRAYLENS_MAX_PIXELS=90000" in reasons[big_id]
    assert "smaller than 8 pixels on a side" in reasons[dot_id]


# ----------------------------------------------------------------------------------------------- DICOM


def _dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    window=None,
    slope=2.0,
    intercept=-100.0,
    with_pixels=True,
) -> Path:
    from xraylens.data.phantom import dicom_phantom

    ds = dicom_phantom(pixels if with_pixels else None, photometric)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.save_as(path, enforce_file_format=True)
    return path


def _window_expected(stored: np.ndarray, slope, intercept, center, width) -> np.ndarray:
    # DICOM linear VOI (PS3.3 C.11.2.1.2) on the rescaled values, then min-max to 0..255
    x = stored * slope + intercept
    y = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    y = (y - y.min()) / (y.max() - y.min())
    return np.rint(y * 255)


RAMP = np.arange(1000, dtype=np.uint16).reshape(25, 40)


def test_dicom_monochrome2_rescale_and_window(tmp_path):
    path = _dicom(tmp_path / "m2.dcm", RAMP, window=(900, 1000))
    out = decode_image(path)
    assert out.dtype == np.uint8 and out.shape == (25, 40)
    expected = _window_expected(RAMP.astype(float), 2.0, -100.0, 900, 1000)
    assert np.abs(out.astype(int) - expected).max() <= 1
    flat = out.ravel()
    # rescale then window: stored 250 -> 400 (window floor) -> 0, stored 300 -> 500 -> > 0;
    # without the rescale the floor would sit at stored 400
    assert flat[250] == 0 and flat[300] > 0 and flat[750] == 255 and flat[999] == 255


def test_dicom_monochrome1_is_inverted(tmp_path):
    m2 = decode_image(_dicom(tmp_path / "m2.dcm", RAMP, window=(900, 1000)))
    m1 = decode_image(_dicom(tmp_path / "m1.dcm", RAMP, "MONOCHROME1", window=(900, 1000)))
    np.testing.assert_array_equal(m1, 255 - m2)
    assert m1.ravel()[0] == 255 and m1.ravel()[-1] == 0


def test_dicom_without_window_is_minmax_and_found_by_magic(tmp_path):
    path = _dicom(tmp_path / "scan.bin", RAMP, slope=-1.0, intercept=0.0)  # negative slope flips
    out = decode_image(path)  # no DICOM suffix: found by the "DICM" magic at byte 128
    assert out.ravel()[0] == 255 and out.ravel()[-1] == 0


def test_dicom_multiframe_takes_first_frame(tmp_path):
    frames = np.stack([RAMP, RAMP[::-1]])
    out = decode_image(_dicom(tmp_path / "mf.dcm", frames))
    single = decode_image(_dicom(tmp_path / "sf.dcm", RAMP))
    np.testing.assert_array_equal(out, single)


def test_dicom_without_pixel_data(tmp_path):
    path = _dicom(tmp_path / "nopix.dcm", RAMP, with_pixels=False)
    with pytest.raises(DecodeError, match="nopix.dcm: DICOM has no pixel data"):
        decode_image(path)
    (tmp_path / "junk.dcm").write_text("not dicom at all")
    with pytest.raises(DecodeError, match="junk.dcm"):
        decode_image(tmp_path / "junk.dcm")


# ------------------------------------------------------------------------------------------ bytes (uploads)


def test_bytes_decode_like_files(fixture_dir, tmp_path):
    from xraylens.data.decode import decode_bytes

    for path in (_first(fixture_dir / "knee_kl" / "0"), _first(fixture_dir / "pneumonia" / "NORMAL")):
        np.testing.assert_array_equal(decode_bytes(path.read_bytes()), decode_image(path))
    dcm = _dicom(tmp_path / "scan.bin", RAMP, window=(900, 1000))  # found by the DICM magic, as a file is
    np.testing.assert_array_equal(decode_bytes(dcm.read_bytes()), decode_image(dcm))


def test_bytes_errors_and_limits_like_files(fixture_dir, tmp_path):
    from xraylens.data.decode import decode_bytes

    data = _first(fixture_dir / "pneumonia" / "NORMAL").read_bytes()
    with pytest.raises(DecodeError, match=r"^upload: not a readable image \(.*truncated"):
        decode_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match=r"^upload: empty file \(0 bytes\)$"):
        decode_bytes(b"")
    with pytest.raises(DecodeError, match="^x.png: not a readable image"):
        decode_bytes(b"this is not an image\n", name="x.png")
    with pytest.raises(DecodeError, match=r"upload: 224x224 image \(50,176 pixels\) is above the limit of 50,000"):
        decode_bytes(data, max_pixels=50_000)
    with pytest.raises(DecodeError, match=r"upload: 40x25 image \(1,000 pixels\) is above the limit of 999"):
        decode_bytes(_dicom(tmp_path / "big.dcm", RAMP).read_bytes(), max_pixels=999)
    with pytest.raises(DecodeError, match="upload: image of 50,176 pixels is above"):
        with pytest.MonkeyPatch.context() as mp:  # Pillow's own bomb check, far below ours
            mp.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
            decode_bytes(data, max_pixels=20_000)


def test_dicom_patient_fields_are_never_quoted(tmp_path, caplog):
    """pydicom warns about invalid values quoting them; the patient group is dropped before any is read."""
    import logging

    from pydicom import config, dcmread

    from xraylens.data.decode import decode_bytes

    path = _dicom(tmp_path / "p.dcm", RAMP)
    ds = dcmread(path)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own warnings about the invalid values written here
        mp.setattr(config.settings, "writing_validation_mode", config.IGNORE)
        ds.PatientName = "SECRETNAME^" + "X" * 80  # over PN's 64 characters: pydicom would warn, quoting
        ds.PatientBirthDate = "SECRETDATE"  # not a DA value: pydicom's warning quotes it
        ds.save_as(path)
    caplog.clear()  # the warnings of writing the test file itself
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        out = decode_bytes(path.read_bytes())
        assert out.shape == (25, 40)
        decode_image(path)
    said = " ".join(str(w.message) for w in caught) + caplog.text
    assert "SECRET" not in said
