"""Tests for imtalker_core.media.face: detection, crop geometry, stable video boxes, paste-back."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import imtalker_core.media.face as face_module
from imtalker_core.errors import InputError
from imtalker_core.media.face import (CropBox, box_around, center_box, crop_box, crop_face, detect_faces,
                                      iter_paste_back, paste_back, paste_mask, paste_mask_inside,
                                      stable_video_box)
from imtalker_core.media.images import load_image
from imtalker_core.media.video import read_video

DATA = Path(__file__).parent / "data" / "media"
PORTRAITS = ["photo_512.png", "statue_256.png", "painting_rgba.png"]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return load_image(DATA / "photo_512.png")


@pytest.mark.parametrize("name", PORTRAITS)
def test_face_found_in_each_portrait(name: str) -> None:
    image = load_image(DATA / name)
    faces = detect_faces(image)
    assert faces, f"no face detected in {name}"
    x, y, w, h = faces[0]
    height, width = image.shape[:2]
    # The vendored portraits are head shots: the face is big and roughly central.
    assert 0.2 * width < w < 0.95 * width
    assert abs((x + w / 2) - width / 2) < 0.25 * width
    assert abs((y + h / 2) - height / 2) < 0.3 * height
    crop, box = crop_face(image, size=128, name=name)
    assert crop.shape == (128, 128, 3) and crop.dtype == np.float32
    assert box.size == min(2 * int(max(w, h) * 1.6 / 2), height, width)


def test_detection_is_scale_invariant(photo: np.ndarray) -> None:
    # Detection runs on a downscaled copy; boxes must come back in source pixels.
    big = np.repeat(np.repeat(photo, 2, axis=0), 2, axis=1)
    (x, y, w, _), (bx, by, bw, _) = detect_faces(photo)[0], detect_faces(big)[0]
    assert abs(bw - 2 * w) <= 0.1 * bw and abs(bx - 2 * x) <= 0.1 * bw and abs(by - 2 * y) <= 0.1 * bw


def test_largest_face_wins(photo: np.ndarray) -> None:
    canvas = np.full((600, 1200, 3), 0.5, dtype=np.float32)
    canvas[50:562, 640:1152] = photo
    small = photo[::2, ::2]
    canvas[300:556, 40:296] = small
    faces = detect_faces(canvas)
    assert len(faces) >= 2
    x, _, w, _ = faces[0]
    assert x >= 640 and w > faces[1][2]


def test_box_geometry_matches_reference() -> None:
    # Reference: centre = (x1 + x2) // 2, half side = int(max(w, h) * 0.8).
    box = box_around((100, 50, 81, 101), image_h=400, image_w=300)
    half = int(101 * 0.8)
    assert box == CropBox(140 - half, 100 - half, 2 * half, 400, 300)
    assert box.x1 == box.x0 + box.size and box.y1 == box.y0 + box.size


def test_crop_box_validates() -> None:
    with pytest.raises(InputError, match="positive side.*size=0"):
        CropBox(0, 0, 0, 10, 10)
    with pytest.raises(InputError, match="image 10x0"):
        CropBox(0, 0, 5, 0, 10)


def test_pad_border_keeps_the_square_centred_and_pads_black() -> None:
    image = np.full((100, 80, 3), 0.75, dtype=np.float32)
    box = box_around((50, 0, 30, 30), image_h=100, image_w=80, scale=2.0, border="pad")  # past top and right
    assert box == CropBox(35, -15, 60, 100, 80)
    assert box.y0 < 0 and box.x1 > 80
    crop = crop_box(image, box)
    assert crop.shape == (box.size, box.size, 3)
    assert np.all(crop[: -box.y0] == 0.0) and np.all(crop[:, 80 - box.x0:] == 0.0)
    assert np.all(crop[-box.y0:, : 80 - box.x0] == 0.75)
    # Exact crop pixels, not just a constant: compare against a manual slice.
    ramp = np.random.default_rng(1).random((100, 80, 3), dtype=np.float32)
    inner = CropBox(10, 20, 40, 100, 80)
    np.testing.assert_array_equal(crop_box(ramp, inner), ramp[20:60, 10:50])


# Face (x, y, 20, 20) in a 100x120 image, scale 2: a 40 px square centred on the face. Where that
# crosses an edge the default slides it back inside (the reference app); "pad" keeps it centred.
@pytest.mark.parametrize("face, shifted, centred", [
    ((2, 40, 20, 20), (0, 30), (-8, 30)),      # left edge
    ((100, 40, 20, 20), (80, 30), (90, 30)),   # right edge
    ((50, 3, 20, 20), (40, 0), (40, -7)),      # top edge
    ((50, 85, 20, 20), (40, 60), (40, 75)),    # bottom edge
    ((100, 85, 20, 20), (80, 60), (90, 75)),   # bottom-right corner
    ((40, 30, 20, 20), (30, 20), (30, 20)),    # well inside: both agree
])
def test_box_slides_inside_the_image_like_the_reference(face, shifted, centred) -> None:
    assert box_around(face, image_h=100, image_w=120, scale=2.0) == CropBox(*shifted, 40, 100, 120)
    assert box_around(face, image_h=100, image_w=120, scale=2.0, border="pad") == CropBox(*centred, 40, 100, 120)


def reference_app_square(x0: int, y0: int, side: int, h: int, w: int) -> tuple[int, int, int]:
    """The reference app's placement, edge by edge as its process_img does it: (x0, y0, side)."""
    x1, y1, x2, y2 = x0, y0, x0 + side, y0 + side
    if x1 < 0:
        x2, x1 = x2 - x1, 0
    if y1 < 0:
        y2, y1 = y2 - y1, 0
    if x2 > w:
        x1, x2 = x1 - (x2 - w), w
    if y2 > h:
        y1, y2 = y1 - (y2 - h), h
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    return x1, y1, min(x2 - x1, y2 - y1)


def test_box_placement_equals_the_reference_app_rule() -> None:
    rng = np.random.default_rng(3)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(20, 300, 2))
        fw, fh = (int(v) for v in rng.integers(4, 200, 2))
        x, y = int(rng.integers(-fw // 2, w)), int(rng.integers(-fh // 2, h))
        scale = float(rng.uniform(1.0, 3.0))
        box = box_around((x, y, fw, fh), h, w, scale)
        half = max(1, int(max(fw, fh) * scale / 2))
        want = reference_app_square(x + fw // 2 - half, y + fh // 2 - half, 2 * half, h, w)
        assert (box.x0, box.y0, box.size) == want, (h, w, x, y, fw, fh, scale)
        assert 0 <= box.x0 and box.x1 <= w and 0 <= box.y0 and box.y1 <= h  # never any black


def test_square_larger_than_the_image_is_cut_to_fit_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    # Side 60 in a 40-row image: rows are clamped to the image, then the square is cut to 40 px
    # from its top-left corner, as the reference does.
    with caplog.at_level(logging.INFO, logger="imtalker_core.media.face"):
        box = box_around((50, 0, 30, 30), image_h=40, image_w=200, scale=2.0)
    assert box == CropBox(35, 0, 40, 40, 200)
    assert "the 60 px face crop is larger than the 200x40 image; using 40 px at (35, 0)" in caplog.text
    # No message when the square fits.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imtalker_core.media.face"):
        box_around((0, 0, 10, 10), image_h=40, image_w=200, scale=2.0)
    assert caplog.text == ""
    with pytest.raises(InputError, match="border must be 'shift'.*got 'clamp'"):
        box_around((0, 0, 10, 10), 40, 200, border="clamp")  # type: ignore[arg-type]


EDGES = ["left", "right", "top", "bottom"]
CANVAS_H, CANVAS_W = 720, 840


def edge_canvas(photo: np.ndarray, edge: str) -> np.ndarray:
    """The test portrait on a grey 720x840 canvas, against one edge so its 1.6x square crosses it."""
    canvas = np.full((CANVAS_H, CANVAS_W, 3), 0.5, dtype=np.float32)
    if edge == "left":
        canvas[104:616, :512] = photo
    elif edge == "right":
        canvas[104:616, -512:] = photo
    elif edge == "top":
        canvas[:512, 164:676] = photo
    else:
        # The face sits high in the photo, with 112 px below the chin: drop the lowest 72 rows.
        canvas[-440:, 164:676] = photo[:440]
    return canvas


@pytest.mark.parametrize("edge", EDGES)
def test_face_near_an_edge_is_cropped_inside_the_image(photo: np.ndarray, edge: str) -> None:
    canvas = edge_canvas(photo, edge)
    x, y, w, h = detect_faces(canvas)[0]
    side = 2 * int(max(w, h) * 0.8)  # the reference's square
    centred = CropBox(x + w // 2 - side // 2, y + h // 2 - side // 2, side, CANVAS_H, CANVAS_W)
    crosses = {"left": centred.x0 < 0, "right": centred.x1 > CANVAS_W,
               "top": centred.y0 < 0, "bottom": centred.y1 > CANVAS_H}
    assert crosses[edge], f"the centred square does not cross the {edge} edge: {centred}"

    crop, box = crop_face(canvas, size=side)  # native size: no resampling
    assert box.size == side
    assert 0 <= box.x0 and box.x1 <= CANVAS_W and 0 <= box.y0 and box.y1 <= CANVAS_H
    flush = {"left": box.x0 == 0, "right": box.x1 == CANVAS_W, "top": box.y0 == 0, "bottom": box.y1 == CANVAS_H}
    assert flush[edge], box
    # Only the axis that crossed moves; the other stays centred on the face.
    if edge in ("left", "right"):
        assert box.y0 == centred.y0
    else:
        assert box.x0 == centred.x0
    np.testing.assert_array_equal(crop, canvas[box.y0:box.y1, box.x0:box.x1])
    # No black padding: the side at the image edge shows the photo, the opposite side the grey canvas.
    edge_line = {"left": crop[:, 0], "right": crop[:, -1], "top": crop[0], "bottom": crop[-1]}[edge]
    far_line = {"left": crop[:, -1], "right": crop[:, 0], "top": crop[-1], "bottom": crop[0]}[edge]
    assert edge_line.max(axis=-1).min() > 0.0
    np.testing.assert_array_equal(far_line, 0.5)


@pytest.mark.parametrize("edge", EDGES)
def test_paste_back_of_a_shifted_crop(photo: np.ndarray, edge: str) -> None:
    canvas = edge_canvas(photo, edge)
    crop, box = crop_face(canvas, size=512)  # resized, as the renderer sees it
    out = paste_back(crop, box, canvas, feather=0.0)
    outside = np.ones((CANVAS_H, CANVAS_W), dtype=bool)
    outside[box.y0:box.y1, box.x0:box.x1] = False
    assert np.array_equal(out[outside], canvas[outside])
    # Inside, the round trip through 512 px only costs resampling error (a misplaced paste costs far more).
    error = np.abs(out - canvas)[~outside]
    assert error.mean() < 0.01
    # A feathered paste keeps full weight at the image edge the crop is flush with (no seam there).
    mask = paste_mask(box, (CANVAS_H, CANVAS_W), feather=0.1)
    edge_line = {"left": mask[box.y0:box.y1, 0], "right": mask[box.y0:box.y1, -1],
                 "top": mask[0, box.x0:box.x1], "bottom": mask[-1, box.x0:box.x1]}[edge]
    assert edge_line[len(edge_line) // 2] == 1.0


def test_paste_back_of_a_shifted_crop_is_exact() -> None:
    # Crop flush with the right and bottom edges, pasted back unchanged with a hard edge.
    original = np.random.default_rng(4).random((100, 120, 3), dtype=np.float32)
    box = box_around((100, 85, 20, 20), image_h=100, image_w=120, scale=2.0)
    assert box == CropBox(80, 60, 40, 100, 120)
    restored = paste_back(crop_box(original, box), box, original, feather=0.0)
    np.testing.assert_allclose(restored, original, atol=1e-6)
    gray = paste_back(np.full((40, 40, 3), 0.5, np.float32), box, original, feather=0.0)
    np.testing.assert_array_equal(gray[60:, 80:], 0.5)
    assert np.array_equal(gray[:60], original[:60]) and np.array_equal(gray[:, :80], original[:, :80])


def test_too_large_square_on_a_real_photo(photo: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    x, y, w, h = detect_faces(photo)[0]
    side = 2 * int(max(w, h) * 0.8)
    assert side > 512  # the vendored head shot is tight: its 1.6x square cannot fit
    with caplog.at_level(logging.INFO, logger="imtalker_core.media.face"):
        crop, box = crop_face(photo, size=512)
    assert f"the {side} px face crop is larger than the 512x512 image" in caplog.text
    # The whole photo, no black: exactly what the reference app feeds the model.
    assert (box.x0, box.y0, box.size) == (0, 0, 512)
    np.testing.assert_array_equal(crop, photo)


def test_crop_resizes_and_keeps_range() -> None:
    image = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)[..., None].repeat(3, -1)  # checkerboard
    box = CropBox(0, 0, 64, 64, 64)
    down = crop_box(image, box, 16)
    np.testing.assert_allclose(down, 0.5, atol=1e-6)  # area averaging, no aliasing
    up = crop_box(image, box, 200)
    assert up.shape == (200, 200, 3) and up.min() >= 0.0 and up.max() <= 1.0


def test_crop_face_accepts_torch_and_uint8(photo: np.ndarray) -> None:
    crop_np, box_np = crop_face(photo, size=64)
    crop_t, box_t = crop_face(torch.from_numpy(photo), size=64)
    assert isinstance(crop_t, torch.Tensor) and box_t == box_np
    np.testing.assert_allclose(crop_t.numpy(), crop_np)
    crop_u8, _ = crop_face(np.round(photo * 255).astype(np.uint8), size=64)
    assert crop_u8.dtype == np.float32 and crop_u8.max() <= 1.0
    np.testing.assert_allclose(crop_u8, crop_np, atol=2 / 255)


def test_no_face_error_and_center_fallback(caplog: pytest.LogCaptureFixture) -> None:
    blank = np.full((120, 200, 3), 0.3, dtype=np.float32)
    # The default hint speaks the API's language; callers (CLI, node) pass their own.
    with pytest.raises(InputError, match=r"No face found in wall\.png; pass on_no_face='center' to use the "
                                         r"centred square, or crop the image around the face yourself$"):
        crop_face(blank, name="wall.png")
    with pytest.raises(InputError) as caught:
        crop_face(blank, name="wall.png", no_face_hint="add --center-crop-if-no-face, or crop it yourself")
    assert str(caught.value) == "No face found in wall.png; add --center-crop-if-no-face, or crop it yourself"
    with caplog.at_level(logging.WARNING, logger="imtalker_core.media.face"):
        crop, box = crop_face(blank, size=32, on_no_face="center")
    assert box == center_box(120, 200) == CropBox(40, 0, 120, 120, 200)
    assert crop.shape == (32, 32, 3)
    assert "no face found" in caplog.text
    with pytest.raises(InputError, match="on_no_face must be 'error' or 'center', got 'skip'"):
        crop_face(blank, on_no_face="skip")  # type: ignore[arg-type]


def test_stable_box_on_driving_video() -> None:
    box = stable_video_box(read_video(DATA / "driving_short.mp4"), sample_every=10)
    assert (box.image_h, box.image_w) == (512, 512)
    # A talking head fills most of the 512 px frame; the box is large and roughly centred.
    assert 200 < box.size < 900
    assert abs(box.x0 + box.size / 2 - 256) < 100 and abs(box.y0 + box.size / 2 - 256) < 120
    # The median is robust: sampling different frames gives nearly the same box.
    other = stable_video_box(read_video(DATA / "driving_short.mp4"), sample_every=7)
    assert abs(other.size - box.size) < 0.1 * box.size and abs(other.x0 - box.x0) < 0.1 * box.size


def test_stable_box_uses_the_median(photo: np.ndarray) -> None:
    blank = np.zeros_like(photo)
    shifted = np.zeros_like(photo)
    shifted[:, 40:] = photo[:, :-40]
    # Two frames with the face at the same place, one shifted, two without a face (ignored).
    frames = [photo, blank, photo, shifted, blank]
    box = stable_video_box(frames, sample_every=1)
    single = box_around(detect_faces(photo)[0], 512, 512)
    assert abs(box.x0 - single.x0) <= 1 and abs(box.size - single.size) <= 2
    # Every-2nd sampling sees photo, photo, blank: still the same box; also from a torch batch.
    assert stable_video_box(torch.from_numpy(np.stack(frames)), sample_every=2) == box


def test_stable_box_without_faces_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    frames = (np.zeros((90, 160, 3), dtype=np.uint8) for _ in range(5))
    with caplog.at_level(logging.WARNING, logger="imtalker_core.media.face"):
        box = stable_video_box(frames, sample_every=2)
    assert box == CropBox(35, 0, 90, 90, 160)
    assert "no face found in any of 3 sampled video frames" in caplog.text
    with pytest.raises(InputError, match="no frames"):
        stable_video_box([])


def test_paste_mask_shape_and_ramp() -> None:
    box = CropBox(20, 10, 100, 150, 200)
    mask = paste_mask(box, (150, 200), feather=0.1)
    assert mask.shape == (150, 200) and mask.dtype == np.float32
    assert mask.min() == 0.0 and mask.max() == 1.0
    inside = np.zeros_like(mask, dtype=bool)
    inside[10:110, 20:120] = True
    assert np.all(mask[~inside] == 0.0) and np.all(mask[inside] > 0.0)
    assert np.all(mask[20:100, 30:110] == 1.0)  # deeper than 10 px from the edge
    row = mask[60, 20:70]
    assert np.all(np.diff(row) >= 0) and row[0] < 0.05  # smooth ramp up from the edge
    hard = paste_mask(box, (150, 200), feather=0.0)
    np.testing.assert_array_equal(hard, inside.astype(np.float32))
    with pytest.raises(InputError, match="feather.*0.7"):
        paste_mask(box, (150, 200), feather=0.7)
    with pytest.raises(InputError, match="200x150 image, but the original is 100x100"):
        paste_mask(box, (100, 100))


def test_paste_mask_box_beyond_the_image() -> None:
    box = CropBox(-50, 60, 200, 200, 120)
    mask = paste_mask(box, (200, 120), feather=0.1)
    assert mask.shape == (200, 120)
    assert np.all(mask[:60] == 0.0)  # above the box
    assert mask[130, 0] == 1.0 and mask[130, 119] == 1.0  # box runs past both side borders: no seam


def test_paste_mask_is_not_feathered_at_image_edges() -> None:
    # Flush with the left and top image edges: full weight up to those edges, a ramp at the others.
    mask = paste_mask(CropBox(0, 0, 100, 150, 200), (150, 200), feather=0.1)
    assert np.all(mask[:90, 0] == 1.0) and np.all(mask[0, :90] == 1.0)
    assert mask[50, 99] < 0.05 and mask[99, 50] < 0.05 and mask[50, 100] == 0.0
    # Flush with the right and bottom edges.
    mask = paste_mask(CropBox(100, 50, 100, 150, 200), (150, 200), feather=0.1)
    assert np.all(mask[60:150, 199] == 1.0) and np.all(mask[149, 110:200] == 1.0)
    assert mask[100, 100] < 0.05 and mask[50, 150] < 0.05 and mask[49, 150] == 0.0
    # Slightly past an edge (less than the ramp): still no fade at the image border.
    mask = paste_mask(CropBox(-5, 20, 100, 150, 200), (150, 200), feather=0.1)
    assert mask[70, 0] == 1.0 and mask[70, 94] < 0.05


@pytest.mark.parametrize("box", [CropBox(30, 20, 90, 140, 160), CropBox(-40, 80, 150, 140, 160)])
def test_paste_back_keeps_everything_outside_the_mask(box: CropBox) -> None:
    rng = np.random.default_rng(2)
    original = rng.random((140, 160, 3), dtype=np.float32)
    frames = rng.random((3, 64, 64, 3), dtype=np.float32)
    out = paste_back(frames, box, original, feather=0.1)
    assert out.shape == (3, 140, 160, 3) and out.dtype == np.float32
    outside = paste_mask(box, (140, 160), 0.1) == 0
    for t in range(3):
        assert np.array_equal(out[t][outside], original[outside])
    changed = ~np.isclose(out[0], original).all(axis=-1)
    assert changed.any() and not changed[outside].any()


def test_paste_back_reproduces_the_crop() -> None:
    # Cropping then pasting back the unmodified crop at full resolution restores the original.
    original = np.random.default_rng(3).random((100, 120, 3), dtype=np.float32)
    box = CropBox(10, 5, 80, 100, 120)
    crop = crop_box(original, box)
    restored = paste_back(crop, box, original, feather=0.2)
    assert restored.shape == original.shape
    np.testing.assert_allclose(restored, original, atol=1e-6)
    # Deep inside the mask the result is the generated frame itself.
    gray = np.full((1, 80, 80, 3), 0.5, dtype=np.float32)
    out = paste_back(gray, box, original, feather=0.1)
    np.testing.assert_allclose(out[0, 30:60, 40:80], 0.5, atol=1e-6)


def test_paste_back_torch_in_torch_out() -> None:
    original = torch.rand(64, 48, 3)
    frames = torch.rand(2, 32, 32, 3)
    box = CropBox(4, 10, 40, 64, 48)
    out = paste_back(frames, box, original)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 64, 48, 3) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), paste_back(frames.numpy(), box, original.numpy()))
    uint8_original = (original * 255).round().to(torch.uint8)
    out_u8 = paste_back(frames, box, uint8_original)
    outside = paste_mask(box, (64, 48), 0.1) == 0
    np.testing.assert_array_equal(out_u8[0].numpy()[outside], uint8_original.numpy()[outside] / np.float32(255))


def test_paste_back_rejects_wrong_shapes() -> None:
    box = CropBox(0, 0, 32, 64, 64)
    with pytest.raises(InputError, match=r"\[T, S, S, 3\].*\(2, 32, 16, 3\)"):
        paste_back(np.zeros((2, 32, 16, 3), np.float32), box, np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InputError, match="64x64 image, but the original is 32x32"):
        paste_back(np.zeros((1, 32, 32, 3), np.float32), box, np.zeros((32, 32, 3), np.float32))


# ------------------------------------------------------------------------------------------------
# Paste-back in bounded memory: the same values as the original full-image algorithm
# ------------------------------------------------------------------------------------------------

def legacy_paste_mask(box: CropBox, original_hw: tuple[int, int], feather: float = 0.1) -> np.ndarray:
    """The full-image mask as first written (float64 outer product over the whole image)."""
    height, width = original_hw
    ramp_px = feather * box.size

    def axis_weights(start: int, count: int) -> np.ndarray:
        centres = np.arange(count, dtype=np.float64) + 0.5
        low = centres - start if start > 0 else np.full(count, np.inf)
        end = start + box.size
        high = end - centres if end < count else np.full(count, np.inf)
        distance = np.minimum(low, high)
        if ramp_px <= 0:
            return (distance > 0).astype(np.float64)
        ramp = np.clip(distance / ramp_px, 0.0, 1.0)
        return ramp * ramp * (3.0 - 2.0 * ramp)

    return np.outer(axis_weights(box.y0, height), axis_weights(box.x0, width)).astype(np.float32)


def legacy_paste_back(frames: np.ndarray, box: CropBox, original: np.ndarray, feather: float = 0.1) -> np.ndarray:
    """The paste-back as first written: T full float32 copies of the original, blended in the box."""
    gen = torch.from_numpy(np.asarray(frames))
    single = gen.ndim == 3
    if single:
        gen = gen.unsqueeze(0)
    base = original.astype(np.float32) / 255.0 if original.dtype == np.uint8 else original.astype(np.float32)
    height, width = base.shape[:2]
    mask = legacy_paste_mask(box, (height, width), feather)
    out = np.empty((gen.shape[0], height, width, 3), dtype=np.float32)
    out[:] = base
    ix0, iy0, ix1, iy1 = box.inside()
    if ix1 > ix0 and iy1 > iy0:
        weight = mask[iy0:iy1, ix0:ix1, None]
        background = base[iy0:iy1, ix0:ix1]
        inside = weight > 0
        part = gen.to(torch.float32).permute(0, 3, 1, 2)
        if part.shape[-1] != box.size:
            part = torch.nn.functional.interpolate(part, size=(box.size, box.size), mode="bilinear",
                                                   antialias=True, align_corners=False)
        region = part.permute(0, 2, 3, 1).numpy()[:, iy0 - box.y0:iy1 - box.y0, ix0 - box.x0:ix1 - box.x0]
        blended = background + weight * (region - background)
        out[:, iy0:iy1, ix0:ix1] = np.where(inside, blended, background)
    return out[0] if single else out


H, W = 70, 90
# Boxes in a 70x90 image: inside, flush with each edge, crossing edges ("pad" crops), larger than
# the image, and entirely outside it.
PASTE_BOXES = {
    "inside": CropBox(20, 10, 40, H, W),
    "flush_top_left": CropBox(0, 0, 50, H, W),
    "flush_bottom_right": CropBox(W - 45, H - 45, 45, H, W),
    "flush_whole_height": CropBox(10, 0, H, H, W),
    "pad_crosses_left_top": CropBox(-12, -7, 48, H, W),
    "pad_crosses_right_bottom": CropBox(60, 41, 44, H, W),
    "pad_larger_than_image": CropBox(-20, -30, 130, H, W),
    "outside": CropBox(W + 5, 0, 30, H, W),
}


@pytest.fixture(params=["float32", "uint8", "float64"])
def original(request: pytest.FixtureRequest) -> np.ndarray:
    rng = np.random.default_rng(11)
    if request.param == "uint8":
        return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    return rng.random((H, W, 3)).astype(request.param)


@pytest.fixture(params=[False, True], ids=["one_band", "small_bands"])
def band_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Optionally force bands of a few rows and resizing one frame at a time, to exercise the seams."""
    if request.param:
        monkeypatch.setattr(face_module, "_BAND_VALUES", 7 * 3 * W)
        monkeypatch.setattr(face_module, "RESIZE_BUDGET_BYTES", 1)
    return request.param


def assert_same_paste(new: np.ndarray, old: np.ndarray, box: CropBox, original: np.ndarray, feather: float) -> None:
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-6)
    # Where the mask is 0 the result is the original, bit for bit (as float32).
    base = original.astype(np.float32) / 255.0 if original.dtype == np.uint8 else original.astype(np.float32)
    zero = legacy_paste_mask(box, (H, W), feather) == 0
    frames = new if new.ndim == 4 else new[None]
    for frame in frames:
        assert np.array_equal(frame[zero].view(np.uint32), base[zero].view(np.uint32))


@pytest.mark.parametrize("name", sorted(PASTE_BOXES))
@pytest.mark.parametrize("feather", [0.0, 0.1, 0.5])
def test_paste_back_equals_the_full_image_algorithm(name: str, feather: float, original: np.ndarray,
                                                     band_size: bool) -> None:
    box = PASTE_BOXES[name]
    rng = np.random.default_rng(5)
    for side in (24, box.size, box.size + 13):  # enlarged, pasted as is, shrunk
        frames = rng.random((3, side, side, 3), dtype=np.float32)
        old = legacy_paste_back(frames, box, original, feather)
        assert_same_paste(paste_back(frames, box, original, feather), old, box, original, feather)
        assert_same_paste(paste_back(frames[1], box, original, feather), old[1], box, original, feather)
        streamed = np.stack(list(iter_paste_back(frames, box, original, feather)))
        assert_same_paste(streamed, old, box, original, feather)


@pytest.mark.parametrize("name", sorted(PASTE_BOXES))
@pytest.mark.parametrize("feather", [0.0, 0.1, 0.5])
def test_paste_masks_equal_the_full_image_mask(name: str, feather: float, band_size: bool) -> None:
    box = PASTE_BOXES[name]
    old = legacy_paste_mask(box, (H, W), feather)
    np.testing.assert_array_equal(paste_mask(box, (H, W), feather), old)
    ix0, iy0, ix1, iy1 = box.inside()
    inside = paste_mask_inside(box, feather)
    assert inside.dtype == np.float32 and inside.shape == (max(iy1 - iy0, 0), max(ix1 - ix0, 0))
    np.testing.assert_array_equal(inside, old[iy0:iy1, ix0:ix1])
    # Nothing outside the box's inside region carries weight, so pasting only there loses nothing.
    rest = old.copy()
    rest[iy0:iy1, ix0:ix1] = 0
    assert not rest.any()


def test_paste_back_into_a_given_buffer() -> None:
    rng = np.random.default_rng(6)
    original = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    frames = rng.random((2, 32, 32, 3), dtype=np.float32)
    box = PASTE_BOXES["pad_crosses_left_top"]
    want = legacy_paste_back(frames, box, original)
    out = np.full((2, H, W, 3), np.nan, dtype=np.float32)
    assert paste_back(frames, box, original, out=out) is out
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    # One frame into one slot of a larger torch batch (as the node does per original).
    batch = torch.full((3, H, W, 3), -1.0)
    slot = batch[2]
    assert paste_back(torch.from_numpy(frames[1]), box, original, out=slot) is slot
    np.testing.assert_allclose(batch[2].numpy(), want[1], rtol=0, atol=1e-6)
    assert torch.all(batch[:2] == -1.0)  # the other slots untouched


def test_paste_back_rejects_a_bad_buffer() -> None:
    original = np.random.default_rng(7).random((H, W, 3), dtype=np.float32)
    frames = np.zeros((2, 32, 32, 3), np.float32)
    box = PASTE_BOXES["inside"]
    with pytest.raises(InputError, match=r"out must be shaped \[2, 70, 90, 3\].*got \[1, 70, 90, 3\]"):
        paste_back(frames, box, original, out=np.empty((1, H, W, 3), np.float32))
    with pytest.raises(InputError, match="writable float32 array, got ndarray float64"):
        paste_back(frames, box, original, out=np.empty((2, H, W, 3)))
    with pytest.raises(InputError, match="float32 CPU tensor, got torch.float16"):
        paste_back(frames, box, original, out=torch.empty((2, H, W, 3), dtype=torch.float16))
    with pytest.raises(InputError, match="must not share memory with the original"):
        paste_back(frames[0], box, original, out=original)
    with pytest.raises(InputError, match="chunk must be at least 1 frame, got 0"):
        paste_back(frames, box, original, chunk=0)


def test_iter_paste_back_streams_into_one_buffer() -> None:
    rng = np.random.default_rng(8)
    original = rng.random((H, W, 3), dtype=np.float32)
    frames = torch.from_numpy(rng.random((4, 40, 40, 3), dtype=np.float32))
    box = PASTE_BOXES["flush_bottom_right"]
    want = legacy_paste_back(frames.numpy(), box, original)
    # Fresh frames: one [H, W, 3] at a time, torch in -> torch out.
    fresh = iter_paste_back(frames, box, original)
    assert isinstance(fresh, Iterator)
    got = list(fresh)
    assert len(got) == 4 and all(isinstance(f, torch.Tensor) and f.shape == (H, W, 3) for f in got)
    assert len({f.data_ptr() for f in got}) == 4  # distinct arrays, safe to keep
    np.testing.assert_allclose(torch.stack(got).numpy(), want, rtol=0, atol=1e-6)
    # One reused buffer: every frame is written into it and it is what is yielded.
    buffer = np.full((H, W, 3), np.nan, dtype=np.float32)
    copies = []
    for frame in iter_paste_back(frames, box, original, out=buffer, chunk=3):
        assert frame is buffer
        copies.append(frame.copy())
    np.testing.assert_allclose(np.stack(copies), want, rtol=0, atol=1e-6)
    # A torch buffer is yielded as itself too.
    tensor_buffer = torch.empty(H, W, 3)
    assert all(f is tensor_buffer for f in iter_paste_back(frames[:2], box, original, out=tensor_buffer))


def test_iter_paste_back_checks_its_arguments_when_called() -> None:
    box = PASTE_BOXES["inside"]
    original = np.zeros((H, W, 3), np.float32)
    # Errors come at the call, before any frame is requested, so a caller fails before rendering on.
    with pytest.raises(InputError, match="90x70 image, but the original is 80x60"):
        iter_paste_back(np.zeros((1, 32, 32, 3), np.float32), box, np.zeros((60, 80, 3), np.float32))
    with pytest.raises(InputError, match=r"\[T, S, S, 3\]"):
        iter_paste_back(np.zeros((1, 32, 31, 3), np.float32), box, original)
    with pytest.raises(InputError, match="feather.*0.9"):
        iter_paste_back(np.zeros((1, 32, 32, 3), np.float32), box, original, feather=0.9)
    with pytest.raises(InputError, match=r"out must be shaped \[70, 90, 3\]"):
        iter_paste_back(np.zeros((2, 32, 32, 3), np.float32), box, original, out=np.empty((2, H, W, 3), np.float32))
    with pytest.raises(InputError, match="chunk must be at least 1"):
        iter_paste_back(np.zeros((1, 32, 32, 3), np.float32), box, original, chunk=0)


def test_crop_face_of_uint8_converts_only_the_crop_with_the_same_values(photo: np.ndarray) -> None:
    photo_u8 = np.round(photo * 255).astype(np.uint8)
    for size in (64, 700):  # shrunk (area) and enlarged (bicubic)
        crop, box = crop_face(photo_u8, size=size)
        np.testing.assert_array_equal(crop, crop_box(photo_u8.astype(np.float32) / 255.0, box, size))
    # A float64 image is cut before it is cast, with the values of casting first.
    wide = np.random.default_rng(9).random((50, 60, 3))
    box = CropBox(-5, 10, 48, 50, 60)
    np.testing.assert_array_equal(crop_box(wide, box, 30), crop_box(wide.astype(np.float32), box, 30))


# ------------------------------------------------------------------------------------------------
# Several faces: a warning names how many and which one was used
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_faces(photo: np.ndarray) -> np.ndarray:
    canvas = np.full((600, 1200, 3), 0.5, dtype=np.float32)
    canvas[50:562, 640:1152] = photo
    canvas[300:556, 40:296] = photo[::2, ::2]
    return canvas


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "imtalker_core.media.face"]


def test_several_faces_warn_once_naming_the_one_used(two_faces: np.ndarray, photo: np.ndarray,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    faces = detect_faces(two_faces)
    assert len(faces) >= 2
    x, y, w, h = faces[0]
    with caplog.at_level(logging.WARNING, logger="imtalker_core.media.face"):
        crop_face(two_faces, size=64, name="pair.png")
    assert warnings_of(caplog) == [(f"{len(faces)} faces found in pair.png; using the largest, {w}x{h} px at "
                                    f"({x}, {y}); crop the image yourself to animate another one")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imtalker_core.media.face"):
        crop_face(photo, size=64)
    assert warnings_of(caplog) == []  # one face: nothing to warn about


def test_several_faces_in_a_video_warn_once(two_faces: np.ndarray, photo: np.ndarray,
                                            caplog: pytest.LogCaptureFixture) -> None:
    count = len(detect_faces(two_faces))
    alone = np.full_like(two_faces, 0.5)
    alone[50:562, 640:1152] = photo  # the same large face without the small one
    frames = [two_faces, alone, two_faces, two_faces]
    with caplog.at_level(logging.WARNING, logger="imtalker_core.media.face"):
        box = stable_video_box(frames, sample_every=1)
    assert warnings_of(caplog) == [(f"3 of 4 sampled video frames show more than one face (up to {count}); the "
                                    f"largest face of each frame was used, giving a {box.size} px crop at "
                                    f"({box.x0}, {box.y0})")]
    # The large face was followed, not the small one on the left.
    assert box.x0 > 600
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imtalker_core.media.face"):
        stable_video_box([alone, alone], sample_every=1)
    assert warnings_of(caplog) == []


def test_stable_box_without_faces_can_refuse() -> None:
    frames = np.full((3, 90, 120, 3), 0.5, dtype=np.float32)
    with pytest.raises(InputError, match=r"No face found in any of the 1 sampled frames.*my hint"):
        stable_video_box(frames, on_no_face="error", no_face_hint="my hint")
    assert stable_video_box(frames) == center_box(90, 120)
    with pytest.raises(InputError, match="on_no_face"):
        stable_video_box(frames, on_no_face="skip")  # type: ignore[arg-type]
