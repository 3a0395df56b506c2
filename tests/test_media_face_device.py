"""Tests for imtalker_core.media.face_device: the torch crop / paste-back against the numpy/OpenCV path.

Runs on the CPU (and also on CUDA where available). Agreement with `imtalker_core.media.face` is
checked on the vendored portraits and on synthetic boxes; the "meta" device stands in for a
non-CPU device where only the dispatch is tested.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from imtalker_core.errors import InputError
from imtalker_core.media import face_device
from imtalker_core.media.face import (
    CropBox,
    box_around,
    crop_box,
    detect_faces,
    paste_back,
    paste_mask,
)
from imtalker_core.media.face_device import (
    area_weights,
    crop,
    crop_on_device,
    iter_paste_back_on_device,
    paste,
    paste_back_on_device,
    paste_mask_on_device,
)
from imtalker_core.media.images import load_image

DATA = Path(__file__).parent / "data" / "media"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# One 8-bit step: the agreement the device path promises on any device (TF32 matmuls included).
ONE_STEP = 1 / 255
# On the CPU the two paths differ only by float32 rounding of the resampling sums (at most 3e-6 measured).
CPU_CROP_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def portraits() -> dict[str, np.ndarray]:
    photo = load_image(DATA / "photo_512.png")
    canvas = np.full((720, 840, 3), 0.5, dtype=np.float32)  # non-square, face against the left edge
    canvas[104:616, :512] = photo
    return {
        "photo_512": photo,  # the same file as example_inputs/photo_512.png
        "statue_256": load_image(DATA / "statue_256.png"),
        "painting_rgba": load_image(DATA / "painting_rgba.png"),  # 510x506, not square
        # Enlarged by a non-integer factor, so its crops shrink by a non-integer ratio.
        "photo_1131": np.clip(cv2.resize(photo, (1131, 1131), interpolation=cv2.INTER_CUBIC), 0.0, 1.0),
        "canvas_840x720": canvas,
    }


def face_boxes(image: np.ndarray) -> dict[str, CropBox]:
    """The boxes the nodes make for this image: slid inside, padded, and a tight one that is enlarged."""
    height, width = image.shape[:2]
    face = detect_faces(image)[0]
    return {"shift": box_around(face, height, width), "pad": box_around(face, height, width, border="pad"),
            "small": box_around(face, height, width, scale=0.5)}


def channels_first(image: np.ndarray, device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].to(device)


def cpu_crop(image: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    return crop_box(image, box, size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["photo_512", "statue_256", "painting_rgba", "photo_1131", "canvas_840x720"])
def test_crop_matches_the_cpu_path_on_the_portraits(portraits, name: str, device: str) -> None:
    image = portraits[name]
    tolerance = CPU_CROP_TOLERANCE if device == "cpu" else ONE_STEP
    boxes = face_boxes(image)
    # The set covers shrinking, enlarging, and the pad box leaving the image (except where it fits).
    sizes = {box.size for box in boxes.values()}
    assert min(sizes) < 512, name
    for kind, box in boxes.items():
        want = cpu_crop(image, box, 512)
        got = crop_on_device(channels_first(image, device), box, 512)
        assert got.shape == (1, 3, 512, 512) and got.dtype == torch.float32 and got.device.type == device
        difference = np.abs(got[0].permute(1, 2, 0).cpu().numpy() - want)
        assert difference.max() <= tolerance, (name, kind, box, difference.max())
        assert difference.mean() <= tolerance / 10, (name, kind, box, difference.mean())


def test_the_portrait_boxes_cover_every_case(portraits) -> None:
    # Guards the test above against losing its interesting cases if detection changes.
    boxes = {(name, kind): box for name, image in portraits.items() for kind, box in face_boxes(image).items()}
    assert any(box.size > 512 and box.size % 512 for box in boxes.values())  # non-integer shrink
    assert any(box.size < 512 for box in boxes.values())  # enlarge
    assert any(box.size == 512 for box in boxes.values())  # no resize
    assert any(box.x0 < 0 or box.y0 < 0 or box.x1 > box.image_w or box.y1 > box.image_h
               for box in boxes.values())  # padded with black
    assert boxes[("canvas_840x720", "shift")].x0 == 0  # slid against the image edge


@pytest.mark.parametrize("box, size", [
    (CropBox(0, 10, 100, 120, 100), 50),       # integer shrink (OpenCV's fast area path)
    (CropBox(-40, 30, 150, 120, 100), 64),     # past the left and bottom edges
    (CropBox(20, -70, 90, 120, 100), 90),      # no resize, past the top
    (CropBox(70, 90, 60, 120, 100), 200),      # enlarged, past the right and bottom
    (CropBox(95, 115, 40, 120, 100), 7),       # mostly outside the image
    (CropBox(200, 0, 30, 120, 100), 16),       # entirely outside: black
    (CropBox(10, 10, 97, 120, 100), 96),       # shrink by one pixel
])
def test_crop_matches_the_cpu_path_on_synthetic_boxes(box: CropBox, size: int) -> None:
    image = np.random.default_rng(5).random((120, 100, 3), dtype=np.float32)
    got = crop_on_device(torch.from_numpy(image)[None], box, size)  # channels-last input
    want = cpu_crop(image, box, size)
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), want, rtol=0, atol=CPU_CROP_TOLERANCE)
    if box.inside()[2] <= box.inside()[0]:
        assert not got.any()


def test_uint8_crop_matches_crop_face_conversion(portraits) -> None:
    image = np.round(portraits["painting_rgba"] * 255).astype(np.uint8)
    for box in face_boxes(image).values():
        # crop_face's rule for uint8: cut, convert to float, then resize.
        want = crop_box(crop_box(image, box).astype(np.float32) / np.float32(255),
                        CropBox(0, 0, box.size, box.size, box.size), 512)
        got = crop_on_device(torch.from_numpy(image)[None], box, 512)
        np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), want, rtol=0, atol=CPU_CROP_TOLERANCE)


def test_area_weights_equal_opencv_inter_area() -> None:
    rng = np.random.default_rng(6)
    for source, target in [(542, 512), (1131, 512), (64, 16), (97, 96), (50, 1)]:
        weights = area_weights(source, target)
        assert weights.shape == (target, source) and weights.dtype == np.float32
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
        column = rng.random((source, 1), dtype=np.float32)
        want = cv2.resize(column, (1, target), interpolation=cv2.INTER_AREA)
        np.testing.assert_allclose(weights @ column[:, 0], want[:, 0], rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="0 < target <= source.*20 and 10"):
        area_weights(10, 20)


def test_crop_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.rand(5, 3, 90, 80, generator=torch.Generator().manual_seed(7))
    for box, size in [(CropBox(-5, 10, 70, 90, 80), 48), (CropBox(10, 20, 30, 90, 80), 64)]:
        whole = crop_on_device(images, box, size)
        # A budget of one image per chunk.
        monkeypatch.setattr(face_device, "RESIZE_BUDGET_BYTES", max(box.size, size) ** 2 * 3 * 4)
        chunked = crop_on_device(images, box, size)
        monkeypatch.undo()
        assert torch.equal(whole, chunked)
        for index in range(5):
            want = cpu_crop(images[index].permute(1, 2, 0).numpy(), box, size)
            np.testing.assert_allclose(whole[index].permute(1, 2, 0).numpy(), want, atol=CPU_CROP_TOLERANCE)


def test_crop_dispatch_keeps_layout_kind_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    box = CropBox(-10, 5, 60, 80, 100)
    nhwc = torch.rand(2, 80, 100, 3, generator=torch.Generator().manual_seed(8))
    nchw = nhwc.permute(0, 3, 1, 2).contiguous()
    cpu_path = crop(nhwc, box, 32)
    device_path = crop(nhwc, box, 32, device_path=True)
    assert cpu_path.shape == device_path.shape == (2, 32, 32, 3) and device_path.is_contiguous()
    torch.testing.assert_close(cpu_path, device_path, rtol=0, atol=CPU_CROP_TOLERANCE)
    first = crop(nchw, box, 32, device_path=False)
    assert first.shape == (2, 3, 32, 32)
    torch.testing.assert_close(first, cpu_path.permute(0, 3, 1, 2), rtol=0, atol=0)
    as_numpy = crop(nhwc.numpy(), box, 32)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    np.testing.assert_array_equal(as_numpy, cpu_path.numpy())
    uint8 = crop((nhwc * 255).round().to(torch.uint8), box, 32)
    assert uint8.dtype == torch.float32 and uint8.max() <= 1.0
    # A tensor on a non-CPU device takes the device path and stays there ("meta" has no values).
    calls = []
    monkeypatch.setattr(face_device, "crop_box", lambda *a, **k: calls.append(a))
    on_meta = crop(nhwc.to("meta"), box, 32)
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 32, 32, 3) and not calls


@pytest.mark.parametrize("bad, message", [
    (torch.rand(80, 100, 3), r"\[N, 3, 80, 100\] or \[N, 80, 100, 3\].*got \[80, 100, 3\]"),
    (torch.rand(1, 80, 99, 3), r"the size the crop box was made for.*got \[1, 80, 99, 3\]"),
    (torch.rand(1, 80, 100, 4), r"got \[1, 80, 100, 4\]"),
    (torch.zeros(1, 80, 100, 3, dtype=torch.int32), "float in \\[0, 1\\] or uint8, got torch.int32"),
    (np.zeros((1, 80, 100, 3), np.float32), "must be a torch tensor.*ndarray"),
])
def test_crop_errors_name_the_problem(bad, message: str) -> None:
    with pytest.raises(InputError, match=message):
        crop_on_device(bad, CropBox(0, 0, 40, 80, 100), 32)


def test_crop_rejects_a_bad_size() -> None:
    images = torch.rand(1, 80, 100, 3)
    for device_path in (True, False):
        with pytest.raises(InputError, match="size must be a positive number of pixels, got 0"):
            crop(images, CropBox(0, 0, 40, 80, 100), 0, device_path=device_path)


PASTE_BOXES = [
    CropBox(30, 20, 90, 140, 160),     # inside
    CropBox(-40, 80, 150, 140, 160),   # past the left, right and bottom edges
    CropBox(0, 0, 140, 140, 160),      # flush with the top, left and bottom edges
    CropBox(130, -20, 64, 140, 160),   # past the top and right
    CropBox(170, 0, 30, 140, 160),     # misses the image
]


@pytest.mark.parametrize("box", PASTE_BOXES)
@pytest.mark.parametrize("feather", [0.0, 0.1, 0.5])
def test_mask_equals_paste_mask(box: CropBox, feather: float) -> None:
    mask = paste_mask_on_device(box, (140, 160), feather)
    assert mask.dtype == torch.float32 and mask.shape == (140, 160)
    np.testing.assert_array_equal(mask.numpy(), paste_mask(box, (140, 160), feather))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("box", PASTE_BOXES)
def test_paste_back_matches_the_cpu_path(box: CropBox, device: str) -> None:
    rng = np.random.default_rng(9)
    original = rng.random((140, 160, 3), dtype=np.float32)
    for side in (48, box.size):  # resized, and already at the crop's size
        frames = rng.random((3, side, side, 3), dtype=np.float32)
        want = paste_back(frames, box, original, feather=0.1)
        got = paste_back_on_device(torch.from_numpy(frames).permute(0, 3, 1, 2).to(device), box,
                                   torch.from_numpy(original).to(device), feather=0.1)
        assert got.shape == (3, 3, 140, 160) and got.dtype == torch.float32 and got.device.type == device
        got_hw3 = got.permute(0, 2, 3, 1).cpu().numpy()
        if device == "cpu":
            np.testing.assert_array_equal(got_hw3, want)  # the same operations in the same order
        else:
            assert np.abs(got_hw3 - want).max() <= ONE_STEP
        outside = paste_mask(box, (140, 160), 0.1) == 0
        assert np.array_equal(got_hw3[1][outside], original[outside])


def test_paste_back_uint8_and_per_frame_originals() -> None:
    rng = np.random.default_rng(10)
    box = CropBox(-20, 30, 100, 120, 90)
    originals = (rng.random((4, 120, 90, 3)) * 255).round().astype(np.uint8)
    frames = rng.random((4, 64, 64, 3), dtype=np.float32)
    got = paste_back_on_device(torch.from_numpy(frames), box, torch.from_numpy(originals), feather=0.2)
    assert got.shape == (4, 120, 90, 3)  # channels-last in, channels-last out
    for index in range(4):
        want = paste_back(frames[index], box, originals[index], feather=0.2)
        np.testing.assert_array_equal(got[index].numpy(), want)
    # One [1, H, W, 3] original serves every frame.
    single = paste_back_on_device(torch.from_numpy(frames), box, torch.from_numpy(originals[:1]), feather=0.2)
    np.testing.assert_array_equal(single.numpy(), paste_back(frames, box, originals[0], feather=0.2))


def test_paste_back_chunked_equals_unchunked_and_iterates(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(11)
    frames = torch.rand(5, 3, 40, 40, generator=generator)
    original = torch.rand(70, 60, 3, generator=generator)
    box = CropBox(10, -5, 50, 70, 60)
    whole = paste_back_on_device(frames, box, original, chunk=16)
    assert torch.equal(paste_back_on_device(frames, box, original, chunk=1), whole)
    monkeypatch.setattr(face_device, "RESIZE_BUDGET_BYTES", 2 * 50 * 50 * 3 * 4)  # two frames per chunk
    assert torch.equal(paste_back_on_device(frames, box, original, chunk=16), whole)
    streamed = list(iter_paste_back_on_device(frames, box, original, chunk=2))
    assert len(streamed) == 5 and all(frame.shape == (3, 70, 60) for frame in streamed)
    assert torch.equal(torch.stack(streamed), whole)
    # Channels-last frames come out channels-last, with the same values.
    streamed_last = list(iter_paste_back_on_device(frames.permute(0, 2, 3, 1), box, original))
    assert torch.equal(torch.stack(streamed_last), whole.permute(0, 2, 3, 1))


def test_paste_back_into_out() -> None:
    generator = torch.Generator().manual_seed(12)
    frames = torch.rand(2, 32, 32, 3, generator=generator)
    original = torch.rand(41, 51, 3, generator=generator)
    box = CropBox(5, 5, 30, 41, 51)
    canvas = torch.full((2, 42, 52, 3), -1.0)  # one padding row and column, as the node's even canvas
    returned = paste_back_on_device(frames, box, original, out=canvas[:, :41, :51])
    assert torch.equal(canvas[:, :41, :51], paste_back_on_device(frames, box, original))
    assert returned.data_ptr() == canvas.data_ptr() and torch.all(canvas[:, 41] == -1.0)
    with pytest.raises(InputError, match=r"out must be shaped \[2, 41, 51, 3\].*\[2, 42, 52, 3\]"):
        paste_back_on_device(frames, box, original, out=canvas)
    with pytest.raises(InputError, match="out must be a float32 tensor on cpu, got torch.float64"):
        paste_back_on_device(frames, box, original, out=canvas[:, :41, :51].double())
    shared = torch.rand(2, 41, 51, 3, generator=generator)
    with pytest.raises(InputError, match="must not share memory with the original"):
        paste_back_on_device(frames, box, shared[0], out=shared)


def test_paste_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(13)
    frames = torch.rand(3, 24, 24, 3, generator=generator)
    originals = torch.rand(3, 50, 40, 3, generator=generator)
    box = CropBox(-4, 10, 36, 50, 40)
    cpu_path = paste(frames, box, originals)  # one original per frame, CPU path
    device_path = paste(frames, box, originals, device_path=True)
    assert cpu_path.shape == (3, 50, 40, 3)
    assert torch.equal(cpu_path, device_path)
    first = paste(frames.permute(0, 3, 1, 2), box, originals[0].numpy(), device_path=False)
    assert first.shape == (3, 3, 50, 40)
    assert torch.equal(first, paste(frames, box, originals[0]).permute(0, 3, 1, 2))
    as_numpy = paste(frames.numpy(), box, originals[0].numpy(), feather=0.3)
    assert isinstance(as_numpy, np.ndarray)
    np.testing.assert_array_equal(as_numpy, paste_back(frames.numpy(), box, originals[0].numpy(), feather=0.3))
    with pytest.raises(InputError, match="2 original images for 3 frames"):
        paste(frames, box, originals[:2])
    calls = []
    monkeypatch.setattr(face_device, "paste_back", lambda *a, **k: calls.append(a))
    on_meta = paste(frames.to("meta"), box, originals)
    assert on_meta.device.type == "meta" and on_meta.shape == (3, 50, 40, 3) and not calls


@pytest.mark.parametrize("frames, original, message", [
    (torch.rand(2, 3, 32, 16), torch.rand(64, 64, 3), r"\[T, 3, S, S\] or \[T, S, S, 3\].*\[2, 3, 32, 16\]"),
    (torch.rand(32, 32, 3), torch.rand(64, 64, 3), r"square crops.*got \[32, 32, 3\]"),
    (torch.rand(2, 32, 32, 3), torch.rand(32, 32, 3), "64x64 image, but the original is 32x32"),
    (torch.rand(2, 32, 32, 3), torch.rand(3, 64, 64), r"\[H, W, 3\] or \[T, H, W, 3\], got \[3, 64, 64\]"),
    (torch.rand(2, 32, 32, 3), torch.rand(3, 64, 64, 3), "3 original images for 2 frames"),
])
def test_paste_back_errors_name_the_problem(frames, original, message: str) -> None:
    with pytest.raises(InputError, match=message):
        paste_back_on_device(frames, CropBox(0, 0, 32, 64, 64), original)


def test_paste_back_rejects_bad_feather_and_chunk() -> None:
    frames, original, box = torch.rand(1, 8, 8, 3), torch.rand(16, 16, 3), CropBox(0, 0, 8, 16, 16)
    with pytest.raises(InputError, match="feather.*0.7"):
        paste_back_on_device(frames, box, original, feather=0.7)
    with pytest.raises(InputError, match="chunk must be at least 1 frame, got 0"):
        iter_paste_back_on_device(frames, box, original, chunk=0)


def test_paste_back_node_keeps_device_frames_on_their_device():
    """Paste Back (nodes/face.py `paste_into`) hands frames that live on a device to the torch path and
    returns them there; CPU frames keep the OpenCV path. The `meta` device stands for a GPU here."""
    import importlib

    from tests.test_nodes import PACK_NAME, load_pack

    load_pack()
    node_face = importlib.import_module(f"{PACK_NAME}.nodes.face")
    pack_box = importlib.import_module(f"{PACK_NAME}.imtalker_core.media.face").CropBox
    box = pack_box(x0=10, y0=20, size=64, image_h=100, image_w=120)
    originals = torch.rand(3, 100, 120, 3)
    out = node_face.paste_into(torch.empty(2, 64, 64, 3, device="meta"), box, originals, 0.1, first_index=1)
    assert out.device.type == "meta" and tuple(out.shape) == (2, 100, 120, 3)
    cpu = node_face.paste_into(torch.rand(2, 64, 64, 3), box, originals, 0.1, first_index=1)
    assert cpu.device.type == "cpu" and tuple(cpu.shape) == (2, 100, 120, 3)
