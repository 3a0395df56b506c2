"""Tests for imtalker_core.media.images: decoding every common image flavour, and clear errors."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from imtalker_core.errors import InputError
from imtalker_core.media.images import MAX_SIDE, load_image, to_float, to_model_input, to_uint8

DATA = Path(__file__).parent / "data" / "media"


def _gradient_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    """A uint8 image whose every pixel differs, so flips and rotations are detectable."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=-1).astype(np.uint8)


def _check_float_rgb(image: np.ndarray, shape: tuple[int, int]) -> None:
    assert image.dtype == np.float32
    assert image.shape == (*shape, 3)
    assert image.min() >= 0.0 and image.max() <= 1.0


@pytest.mark.parametrize("name, shape", [("photo_512.png", (512, 512)), ("statue_256.png", (256, 256)),
                                         ("painting_rgba.png", (510, 506))])
def test_vendored_portraits_load(name: str, shape: tuple[int, int]) -> None:
    image = load_image(DATA / name)
    _check_float_rgb(image, shape)
    assert image.std() > 0.05  # real content, not a blank decode


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    pixels = _gradient_rgb()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_array_equal(to_uint8(load_image(tmp_path / "a.png")), pixels)


def test_rgba_is_composited_over_black(tmp_path: Path) -> None:
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :20, 3] = 255      # opaque half keeps its colour
    rgba[:, 20:30, 3] = 0      # transparent pixels become black, whatever colour they store
    rgba[:, 30:, 3] = 128      # half transparent: colour * alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = load_image(tmp_path / "rgba.png")
    _check_float_rgb(image, (40, 40))
    np.testing.assert_allclose(image[0, 0], np.array([200, 100, 50]) / 255, atol=1e-6)
    np.testing.assert_array_equal(image[:, 20:30], 0.0)
    np.testing.assert_allclose(image[0, 35], np.array([200, 100, 50]) / 255 * 128 / 255, atol=1e-6)


def test_la_and_palette_transparency(tmp_path: Path) -> None:
    la = np.zeros((40, 40, 2), dtype=np.uint8)
    la[..., 0] = 180
    la[:20, :, 1] = 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    image = load_image(tmp_path / "la.png")
    np.testing.assert_allclose(image[0, 0], [180 / 255] * 3, atol=1e-6)
    np.testing.assert_array_equal(image[30], 0.0)

    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette.paste(2, (0, 0, 20, 40))
    palette.save(tmp_path / "p.png", transparency=2)  # index 2 (green) is transparent
    image = load_image(tmp_path / "p.png")
    np.testing.assert_array_equal(image[:, :20], 0.0)
    np.testing.assert_allclose(image[:, 20:], np.broadcast_to([1.0, 0.0, 0.0], (40, 20, 3)))


def test_grayscale_8_and_16_bit(tmp_path: Path) -> None:
    gray8 = _gradient_rgb()[..., 0]
    Image.fromarray(gray8, "L").save(tmp_path / "g8.png")
    image = load_image(tmp_path / "g8.png")
    _check_float_rgb(image, gray8.shape)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    np.testing.assert_allclose(image[..., 1], gray8 / 255, atol=1e-6)

    gray16 = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image = load_image(tmp_path / "g16.png")
    _check_float_rgb(image, gray16.shape)
    # Full 16-bit precision is kept, not truncated to 8 bits.
    np.testing.assert_allclose(image[..., 0], gray16 / 65535, atol=1e-6)


def test_16_bit_rgb_png(tmp_path: Path) -> None:
    rgb16 = _gradient_rgb().astype(np.uint16) * 257
    assert cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # Pillow cannot write 16-bit RGB
    image = load_image(tmp_path / "c16.png")
    _check_float_rgb(image, rgb16.shape[:2])
    np.testing.assert_allclose(image, rgb16 / 65535, atol=1 / 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red ink
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = load_image(tmp_path / "cmyk.jpg")
    _check_float_rgb(image, (48, 64))
    np.testing.assert_allclose(image.mean(axis=(0, 1)), [1.0, 0.0, 0.0], atol=0.03)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = _gradient_rgb(48, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    Image.fromarray(pixels).save(tmp_path / "rot.png", exif=exif)
    image = load_image(tmp_path / "rot.png")
    assert image.shape == (64, 48, 3)
    np.testing.assert_array_equal(to_uint8(image), np.rot90(pixels, k=-1))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not found: .*nope\.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="is not a file"):
        load_image(tmp_path)


def test_wrong_extension_and_non_image_content(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt.*not an image type"):
        load_image(tmp_path / "notes.txt")
    (tmp_path / "fake.png").write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(InputError, match=r"fake\.png.*not an image Pillow can read"):
        load_image(tmp_path / "fake.png")


def test_truncated_file(tmp_path: Path) -> None:
    Image.fromarray(_gradient_rgb(256, 256)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match=r"cut\.jpg.*damaged or truncated"):
        load_image(tmp_path / "cut.jpg")


@pytest.mark.parametrize("size", [(1, 1), (31, 200), (200, 20)])
def test_tiny_images_are_rejected(tmp_path: Path, size: tuple[int, int]) -> None:
    Image.new("RGB", size).save(tmp_path / "tiny.png")
    with pytest.raises(InputError, match=rf"tiny\.png.*{size[0]}x{size[1]}.*face is too small"):
        load_image(tmp_path / "tiny.png")


def test_32_px_is_the_smallest_accepted(tmp_path: Path) -> None:
    Image.new("RGB", (32, 40)).save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png").shape == (40, 32, 3)


def test_huge_images_are_rejected(tmp_path: Path) -> None:
    Image.new("L", (MAX_SIDE + 1, 32)).save(tmp_path / "wide.png")
    with pytest.raises(InputError, match=r"wide\.png.*8193x32.*downscale"):
        load_image(tmp_path / "wide.png")


def test_decompression_bomb_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (200, 200)).save(tmp_path / "bomb.png")
    # Between 1x and 2x the limit Pillow only warns; above 2x it raises. Both must be refused.
    for limit in (30_000, 10_000):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(InputError, match=r"bomb\.png.*too large.*downscale"):
            load_image(tmp_path / "bomb.png")


def test_to_model_input_shapes_and_range() -> None:
    image = np.random.default_rng(0).random((300, 200, 3), dtype=np.float32)
    tensor = to_model_input(image, size=64)
    assert tensor.shape == (1, 3, 64, 64) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    # Antialiasing averages the noise; plain bilinear sampling would keep most of its variance.
    assert tensor.std() < 0.1

    same = to_model_input(torch.from_numpy(image[:64, :64]), size=64)
    np.testing.assert_array_equal(same[0].permute(1, 2, 0).numpy(), image[:64, :64])
    as_uint8 = to_model_input(to_uint8(image[:64, :64]), size=64)
    np.testing.assert_allclose(as_uint8, same, atol=0.5 / 255 + 1e-6)


def test_to_model_input_matches_pillow_resize() -> None:
    pixels = _gradient_rgb(200, 200)
    reference = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
    ours = to_model_input(pixels, size=64)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - reference).mean() < 2 / 255


def test_to_model_input_rejects_bad_shapes() -> None:
    with pytest.raises(InputError, match=r"\[H, W, 3\].*\(3, 64, 64\)"):
        to_model_input(np.zeros((3, 64, 64), dtype=np.float32))


def test_uint8_float_helpers() -> None:
    values = np.array([[[-0.5, 0.4 / 255, 0.6 / 255]], [[0.2, 1.0, 7.0]]], dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(values), [[[0, 0, 1]], [[51, 255, 255]]])
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(values)), to_uint8(values))
    pixels = _gradient_rgb()
    assert to_float(pixels).dtype == np.float32
    np.testing.assert_array_equal(to_uint8(to_float(pixels)), pixels)
    assert to_float(torch.from_numpy(pixels)).dtype == torch.float32
