"""srgan.images: decoding of every mode, EXIF, corrupt files, the project bicubic, atomic PNG."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from srgan import images
from srgan.images import ImageError


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random RGB (bicubic-enlarged noise): structure at every position."""
    small = np.random.default_rng(seed).integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def png_rgb16(path: Path, arr: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def mode_of(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


def test_truncated_loading_stays_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_rgb_png_round_trip(tmp_path):
    arr = texture(20, 30)
    images.save_png(tmp_path / "a.png", arr)
    out = images.load_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, arr)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind


def test_grey_and_bilevel(tmp_path):
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(g).save(tmp_path / "g.png")
    out = images.load_rgb(tmp_path / "g.png")
    assert out.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)
    Image.fromarray(g > 127).save(tmp_path / "b.png")  # mode 1
    b = images.load_rgb(tmp_path / "b.png")
    assert set(np.unique(b)) == {0, 255}


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish everywhere, hidden where transparent
    rgba[0, :, 3] = [0, 255, 128]
    rgba[1, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = images.load_rgb(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [200, 0, 0])
    np.testing.assert_allclose(out[0, 2], [200 * 128 / 255 + 127, 127, 127], atol=1)
    la = np.stack([np.full((2, 2), 50, np.uint8), np.array([[0, 255], [255, 255]], np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = images.load_rgb(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[1, 1], [50, 50, 50])


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    im.putdata([0, 1, 1, 1, 1, 1, 1, 0])
    im.save(tmp_path / "p.png", transparency=0)
    out = images.load_rgb(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent index -> white
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    im.save(tmp_path / "p2.gif")  # opaque palette
    assert images.load_rgb(tmp_path / "p2.gif").shape == (2, 4, 3)
    rgba_pal = Image.new("P", (2, 1))
    rgba_pal.putpalette([1, 2, 3, 0, 9, 9, 9, 255], rawmode="RGBA")
    rgba_pal.putdata([0, 1])
    rgba_pal.save(tmp_path / "p3.png")
    np.testing.assert_array_equal(images.load_rgb(tmp_path / "p3.png")[0], [[255, 255, 255], [9, 9, 9]])
    # a tRNS colour key on grey and RGB PNGs
    Image.fromarray(np.array([[10, 20]], np.uint8)).save(tmp_path / "lt.png", transparency=20)
    np.testing.assert_array_equal(images.load_rgb(tmp_path / "lt.png")[0, :, 0], [10, 255])
    rgb = np.zeros((1, 2, 3), np.uint8)
    rgb[0, 1] = [1, 2, 3]
    Image.fromarray(rgb).save(tmp_path / "rt.png", transparency=(1, 2, 3))
    np.testing.assert_array_equal(images.load_rgb(tmp_path / "rt.png")[0], [[0, 0, 0], [255, 255, 255]])


def test_cmyk_jpeg(tmp_path):
    rgb = texture(32, 32)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert mode_of(tmp_path / "c.jpg") == "CMYK"
    out = images.load_rgb(tmp_path / "c.jpg")
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 6  # not inverted, not garbage


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257 * 100, 32768, 65535]], np.uint16)
    im = Image.fromarray(v)
    assert im.mode == "I;16"
    im.save(tmp_path / "g16.png")
    out = images.load_rgb(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 128, 255])
    # big-endian variant
    Image.frombytes("I;16B", (4, 1), v.astype(">u2").tobytes()).save(tmp_path / "g16b.tiff")
    np.testing.assert_array_equal(images.load_rgb(tmp_path / "g16b.tiff")[0, :, 1], [0, 100, 128, 255])


def test_16bit_rgb_png(tmp_path):
    v = np.random.default_rng(1).integers(0, 65536, (5, 6, 3)).astype(np.uint16)
    v[0, 0] = [65535, 257 * 7, 0]
    png_rgb16(tmp_path / "rgb16.png", v)
    out = images.load_rgb(tmp_path / "rgb16.png")
    assert out.shape == (5, 6, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 7, 0])
    assert np.abs(out.astype(int) - np.rint(v / 257.0)).max() <= 1


def test_int32_and_float_modes(tmp_path):
    i = np.array([[0, 257 * 3, 65535]], np.int32)
    Image.fromarray(i).save(tmp_path / "i.tiff")
    assert mode_of(tmp_path / "i.tiff") == "I"
    np.testing.assert_array_equal(images.load_rgb(tmp_path / "i.tiff")[0, :, 0], [0, 3, 255])
    f = np.array([[0.0, 0.5, 1.0]], np.float32)
    Image.fromarray(f).save(tmp_path / "f.tiff")
    assert mode_of(tmp_path / "f.tiff") == "F"
    np.testing.assert_array_equal(images.load_rgb(tmp_path / "f.tiff")[0, :, 2], [0, 128, 255])


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[..., 2] = 255  # blue
    arr[:16, :16] = [255, 0, 0]  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = images.load_rgb(tmp_path / "r.jpg")
    assert out.shape == (60, 40, 3)
    assert out[:10, -10:, 0].mean() > 200 and out[:10, -10:, 2].mean() < 60  # now top-right
    assert out[:10, :10, 2].mean() > 200


def test_corrupt_truncated_missing(tmp_path):
    bad = tmp_path / "noise.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match=r"noise\.png.*corrupt"):
        images.load_rgb(bad)
    Image.fromarray(texture(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg.*truncated"):
        images.load_rgb(tmp_path / "cut.jpg")
    Image.fromarray(texture(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png.*truncated"):
        images.load_rgb(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="missing.png"):
        images.load_rgb(tmp_path / "missing.png")
    assert isinstance(ImageError("x"), ValueError)


def test_bicubic_is_pil_float_bicubic_rounded_once():
    img = texture(37, 41)
    out = images.bicubic_resize(img, (13, 9))  # (width, height)
    assert out.shape == (9, 13, 3) and out.dtype == np.uint8
    for c in range(3):
        ref = Image.fromarray(img[..., c].astype(np.float32)).resize((13, 9), Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(out[..., c], np.clip(np.rint(np.asarray(ref)), 0, 255))
    flat = np.full((16, 16, 3), 77, np.uint8)
    np.testing.assert_array_equal(images.bicubic_resize(flat, (5, 7)), 77)


def test_downscale_is_antialiased():
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    lr = images.downscale(np.repeat(checker[..., None], 3, 2), 4)
    assert lr.shape == (16, 16, 3)
    assert np.abs(lr.astype(int) - 128).max() <= 2  # a 1-px checkerboard averages out, no aliasing


def test_mod_crop_downscale_upscale():
    img = texture(30, 45)
    m = images.mod_crop(img, 4)
    assert m.shape == (28, 44, 3)
    np.testing.assert_array_equal(m, img[:28, :44])
    lr = images.downscale(m, 4)
    assert lr.shape == (7, 11, 3)
    assert images.upscale_bicubic(lr, 4).shape == (28, 44, 3)
    with pytest.raises(ValueError, match="multiple"):
        images.downscale(img, 4)
    with pytest.raises(ImageError):
        images.mod_crop(img[:3], 4)


def test_save_png_atomic_cleans_up_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "x.png"
    images.save_png(target, texture(8, 8))
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        images.save_png(target, texture(8, 8, seed=1))
    assert target.read_bytes() == before  # the old file is intact
    assert [p.name for p in target.parent.iterdir()] == ["x.png"]


def test_pairs_need_both_halves(tmp_path):
    hr = np.zeros((16, 16, 3), np.uint8)
    images.save_png(tmp_path / "hr" / "a.png", hr)
    with pytest.raises(FileNotFoundError, match="lr/a.png is missing"):
        images.load_pairs(tmp_path)
    images.save_png(tmp_path / "lr" / "a.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="not an integer multiple"):
        images.load_pairs(tmp_path)
    with pytest.raises(FileNotFoundError, match="no validation images"):
        images.load_pairs(tmp_path / "empty")
