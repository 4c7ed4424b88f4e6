from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xraylens.data.decode import decode_image
from xraylens.errors import DecodeError


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


def test_16bit_png_minmax(tmp_path):
    arr = np.array([[1000, 1800], [3000, 5000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = decode_image(tmp_path / "deep.png")
    # (v - 1000) / 4000 * 255: 0, 51, 127.5 -> 128, 255
    np.testing.assert_array_equal(out, [[0, 51], [128, 255]])
    Image.fromarray(np.full((3, 3), 777, np.uint16)).save(tmp_path / "flat.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "flat.png"), np.zeros((3, 3), np.uint8))


def test_rgba_alpha_is_discarded(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 50
    rgba[:2, :, 3] = 0  # fully transparent top half keeps its grey value (no compositing on black)
    rgba[2:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png")
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert out.shape == (4, 5) and np.all(np.abs(out.astype(int) - expected) <= 1)
    la = np.stack([np.full((3, 3), 90, np.uint8), np.zeros((3, 3), np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "la.png"), np.full((3, 3), 90))


# ----------------------------------------------------------------------------------------------- DICOM


def _dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", window=None,
           slope=2.0, intercept=-100.0, with_pixels=True) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    if with_pixels:
        ds.set_pixel_data(pixels.astype(np.uint16), photometric_interpretation=photometric, bits_stored=16)
        ds.PhotometricInterpretation = photometric
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
