"""Renderer training (issue 12): discriminator, perceptual loss, the objective, data pairs and the run.

Everything runs on the CPU with the tiny 128² renderer, a thin discriminator and a thin random VGG19
(same structure, 1/16 of the channels), on synthetic clips written to a temp folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imtalker_core.checkpoints import load_renderer
from imtalker_core.config import tiny_renderer_config
from imtalker_core.errors import CheckpointError, InputError
from imtalker_core.renderer import IMTRenderer
from imtalker_core.training import engine
from imtalker_core.training import renderer_train as rt
from imtalker_core.training.discriminator import (
    PatchDiscriminator,
    discriminator_loss,
    generator_adversarial_loss,
    load_discriminator_state,
    minibatch_stddev,
    tiny_discriminator_config,
)
from imtalker_core.training.perceptual import (
    FEATURE_TAPS,
    PerceptualLoss,
    VGG19Features,
    eye_mouth_masks,
    fixed_region_masks,
    gaussian_downsample,
    load_vgg19,
)
from tests.helpers.training import one_thread  # noqa: F401 (autouse fixture: one torch thread)

SIZE = 128
THIN = 16  # VGG channel divisor in these tests




# --- fixtures --------------------------------------------------------------------------------------------------


def _frame(clip: int, t: int) -> np.ndarray:
    """A 128² uint8 frame: a per-clip background with a bright square that moves with t."""
    rng = np.random.default_rng(clip)
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = rng.integers(40, 200, 3, dtype=np.uint8)
    y, x = 40 + 6 * t, 30 + 10 * clip
    image[y:y + 24, x:x + 24] = (250, 240, 230)
    image[70:80, 44:84] = (120, 30, 30)  # a "mouth" band
    return image


def write_prepared(folder: Path, clips: int = 2, frames: int = 3, fmt: str = "tensor",
                   landmarks: bool = False) -> Path:
    """A prepared folder in `training.data`'s layout (manifest, clip files, frames) with synthetic clips."""
    from PIL import Image
    from safetensors.torch import save_file

    (folder / "clips").mkdir(parents=True)
    (folder / "frames").mkdir()
    entries = {}
    for c in range(clips):
        cid = f"clip{c}"
        tensors = {"motion": torch.zeros(frames, 32), "audio": torch.zeros(frames, 4)}
        if landmarks:
            tensors["landmarks"] = torch.from_numpy(_landmarks(30.0 + c)).float()[None].repeat(frames, 1, 1)
        save_file(tensors, str(folder / "clips" / f"{cid}.safetensors"))
        images = np.stack([_frame(c, t) for t in range(frames)])
        if fmt == "tensor":
            frames_file = f"frames/{cid}.safetensors"
            save_file({"frames": torch.from_numpy(images)}, str(folder / frames_file))
        else:
            frames_file = f"frames/{cid}"
            (folder / frames_file).mkdir()
            for t, image in enumerate(images):
                Image.fromarray(image).save(folder / frames_file / f"{t:06d}.png")
        entries[cid] = {"source": f"{cid}.mp4", "size": 1, "mtime_ns": 1, "status": "ok", "problems": [],
                        "frames": frames, "clip_file": f"clips/{cid}.safetensors", "frames_file": frames_file}
    entries["broken"] = {"source": "broken.mp4", "size": 1, "mtime_ns": 1, "status": "rejected",
                         "problems": ["no face"]}
    manifest = {"format": 1, "fps": 25, "image_size": SIZE, "crop_scale": 1.6, "frames_format": fmt,
                "motion_dim": 32, "audio_dim": 4, "encoders": {}, "clips": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _landmarks(eye_y: float) -> np.ndarray:
    """68 points: two eye hexagons around (40, eye_y) and (88, eye_y), an outer lip ring around (64, 96)."""
    points = np.full((68, 2), 64.0)
    angles = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    for first, cx in ((36, 40.0), (42, 88.0)):
        points[first:first + 6] = np.stack([cx + 8 * np.cos(angles), eye_y + 3 * np.sin(angles)], 1)
    lip = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    points[48:60] = np.stack([64 + 14 * np.cos(lip), 96 + 6 * np.sin(lip)], 1)
    return points


def thin_vgg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG19 state dict with 1/16 of the channels, all layers and a classifier."""
    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in VGG19Features(THIN).features.state_dict().items()}
    state.update({"features.30.weight": torch.randn(32, 32, 3, 3), "features.30.bias": torch.zeros(32),
                  "classifier.0.weight": torch.randn(8, 32), "classifier.0.bias": torch.zeros(8)})
    return state


@pytest.fixture()
def vgg_file(tmp_path):
    path = tmp_path / "vgg19_thin.pth"
    torch.save(thin_vgg_state(), path)
    return path


def tiny_config(tmp_path: Path, data: Path, vgg: Path, **overrides) -> rt.RendererTrainConfig:
    settings = {"data": str(data), "output": str(tmp_path / "run"), "vgg_weights": str(vgg), "architecture": "tiny",
                "steps": 4, "batch_size": 2, "lr": 1e-3, "final_lr": 1e-3, "num_workers": 0, "cpu": True,
                "log_every": 1, "checkpoint_every": 0, "preview_every": 0}
    settings.update(overrides)
    return rt.RendererTrainConfig(**settings)


def _batch(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(3, batch, 3, SIZE, SIZE, generator=g)
    eyes, mouth = fixed_region_masks(SIZE)
    mask = torch.from_numpy(eyes + mouth)[None, None].repeat(batch, 1, 1, 1)
    return {"source": images[0], "target": images[1], "negative": images[2], "mask": mask}


# --- discriminator ---------------------------------------------------------------------------------------------


def test_official_discriminator_has_the_reference_layout():
    disc = PatchDiscriminator()  # 192 MB for a moment; the meta device would import torch's refs (4 s)
    state = disc.state_dict()
    # Measured from the reference's PatchDiscriminator (renderer/discriminator.py): 107 entries, 48,031,842
    # parameters, the same names and shapes.
    assert len(state) == 107
    assert sum(p.numel() for p in disc.parameters()) == 48_031_842
    expected = {"scale1.convs.0.0.weight": (32, 3, 1, 1), "scale1.convs.0.1.bias": (1, 32, 1, 1),
                "scale1.convs.1.conv1.0.weight": (32, 32, 3, 3), "scale1.convs.1.conv2.0.kernel": (4, 4),
                "scale1.convs.1.conv2.1.weight": (64, 32, 3, 3), "scale1.convs.1.skip.1.weight": (64, 32, 1, 1),
                "scale1.convs.7.conv2.1.weight": (512, 512, 3, 3), "scale1.final_conv.0.weight": (512, 513, 3, 3),
                "scale1.final_linear.0.weight": (512, 8192), "scale1.final_linear.1.weight": (1, 512),
                "scale2.convs.0.0.weight": (64, 3, 1, 1), "scale2.convs.6.skip.1.weight": (512, 512, 1, 1)}
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert "scale2.convs.7.conv1.0.weight" not in state


def test_gan_losses_on_known_logits():
    def softplus(x):
        return math.log1p(math.exp(x))

    real = [torch.tensor([[2.0], [-1.0]]), torch.tensor([[0.0], [3.0]])]
    fake = [torch.tensor([[0.5], [-3.0]]), torch.tensor([[1.0], [-2.0]])]
    expected_d = ((softplus(-2.0) + softplus(1.0)) / 2 + (softplus(0.5) + softplus(-3.0)) / 2
                  + (softplus(0.0) + softplus(-3.0)) / 2 + (softplus(1.0) + softplus(-2.0)) / 2)
    expected_g = (softplus(-0.5) + softplus(3.0)) / 2 + (softplus(-1.0) + softplus(2.0)) / 2
    assert discriminator_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert generator_adversarial_loss(fake).item() == pytest.approx(expected_g, rel=1e-6)
    zero = torch.zeros(4, 1)
    assert discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_minibatch_stddev_groups():
    x = torch.tensor([1.0, 3.0, 10.0, 14.0]).view(4, 1, 1, 1)
    out = minibatch_stddev(x)
    # Batch 4 = group size: one subgroup holding all four images, population standard deviation.
    assert out.shape == (4, 2, 1, 1)
    assert torch.allclose(out[:, 1].flatten(), torch.full((4,), float(np.std([1, 3, 10, 14]))), atol=1e-5)
    pairs = minibatch_stddev(torch.tensor([1.0, 5.0, 2.0, 9.0, 4.0, 6.0, 3.0, 7.0]).view(8, 1, 1, 1))
    # Batch 8, group 4: subgroup k holds images k, k+2, k+4, k+6.
    assert torch.allclose(pairs[:, 1].flatten(), torch.tensor([float(np.std([1, 2, 4, 3])),
                                                               float(np.std([5, 9, 6, 7]))] * 4), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        minibatch_stddev(torch.zeros(6, 1, 4, 4))


def test_discriminator_state_loads_strictly():
    torch.manual_seed(0)
    cfg = tiny_discriminator_config(SIZE)
    source, target = PatchDiscriminator(cfg), PatchDiscriminator(cfg)
    params = {k: v for k, v in source.state_dict().items() if not k.endswith("kernel")}
    load_discriminator_state(target, params, "test")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(CheckpointError, match="1 missing"):
        load_discriminator_state(target, {k: v for k, v in params.items() if k != "scale2.final_linear.1.bias"},
                                 "test")


# --- perceptual loss -------------------------------------------------------------------------------------------


def test_vgg19_loads_torchvision_and_checkpoint_layouts(tmp_path, vgg_file):
    state = thin_vgg_state()
    vgg = load_vgg19(vgg_file)
    assert vgg.channel_divisor == THIN and not any(p.requires_grad for p in vgg.parameters())
    assert [k for k in vgg.state_dict()][-1] == "features.28.bias"
    assert torch.equal(vgg.state_dict()["features.28.weight"], state["features.28.weight"])
    # An official training checkpoint's loss network: criterion_vgg.vgg.slice<k>.<N>.*
    slices = {1: range(2), 2: range(2, 7), 3: range(7, 12), 4: range(12, 21), 5: range(21, 30)}
    official = {f"criterion_vgg.vgg.slice{k}.{n}.{w}": state[f"features.{n}.{w}"]
                for k, ns in slices.items() for n in ns for w in ("weight", "bias") if f"features.{n}.{w}" in state}
    official.update({"criterion_vgg.vgg.mean": torch.zeros(1, 3, 1, 1), "gen.x": torch.zeros(1)})
    from_ckpt = load_vgg19({"state_dict": official}, "renderer.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(vgg.state_dict().values(), from_ckpt.state_dict().values()))
    del state["features.10.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="1 missing .*features.10.weight"):
        load_vgg19(tmp_path / "broken.pth")


def test_perceptual_loss_terms():
    torch.manual_seed(0)
    vgg = VGG19Features(THIN).eval()
    loss = PerceptualLoss(vgg)
    pred, target = torch.rand(2, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    ones = torch.ones(2, 1, SIZE, SIZE)
    whole, region = loss(pred, target, ones)
    # Recompute by hand: with a full mask the region term is, per layer, a per-pixel sum over channels,
    # i.e. C_layer × the whole-frame mean.
    expected_whole = expected_region = 0.0
    for scale in (1.0, 0.5, 0.25, 0.125):
        def taps(x, scale=scale):
            x = gaussian_downsample(x, scale).clamp(-1, 1) / 2 + 0.5
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            return vgg((x - mean) / std)
        for fp, ft in zip(taps(pred), taps(target)):
            expected_whole += (fp - ft).abs().mean().item()
            expected_region += (fp - ft).abs().mean().item() * fp.shape[1]
    assert whole.item() == pytest.approx(expected_whole, rel=1e-5)
    assert region.item() == pytest.approx(expected_region, rel=1e-5)
    same = loss(target, target, ones)
    assert same[0].item() == 0.0 and same[1].item() == 0.0
    empty = loss(pred, target, torch.zeros(2, 1, SIZE, SIZE))
    assert empty[1].item() == 0.0 and empty[0].item() == pytest.approx(whole.item(), rel=1e-6)
    assert len(FEATURE_TAPS) == 5


def test_gaussian_downsample_keeps_flat_images_flat():
    image = torch.full((1, 3, 64, 64), 0.25)
    for scale, size in ((0.5, 32), (0.25, 16), (0.125, 8)):
        out = gaussian_downsample(image, scale)
        assert out.shape == (1, 3, size, size)
        # Zero padding darkens only the border; the kernel sums to 1 inside.
        assert torch.allclose(out[..., 2:-2, 2:-2], torch.tensor(0.25), atol=1e-6)
    assert gaussian_downsample(image, 1.0) is image


def test_eye_mouth_masks_from_landmarks():
    points = _landmarks(40.0)
    eyes, mouth = eye_mouth_masks(points, SIZE)
    assert eyes.dtype == np.float32 and set(np.unique(eyes)) == {0.0, 1.0}
    # Eye hexagon: x 32–48 at y 40; two 7×7 dilations grow it by 6 pixels.
    assert eyes[40, 32 - 6] == 1 and eyes[40, 32 - 7] == 0 and eyes[40, 48 + 6] == 1 and eyes[40, 48 + 7] == 0
    assert eyes[40, 64] == 0 and eyes[40, 88] == 1
    assert mouth[96, 64] == 1 and mouth[96, 50 - 6] == 1 and mouth[96, 50 - 7] == 0 and mouth[40, 40] == 0
    with pytest.raises(InputError, match="68 finite"):
        eye_mouth_masks(points[:60], SIZE)


# --- objective -------------------------------------------------------------------------------------------------


def test_distance_loss_formula():
    motion = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    own = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    other = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    # |5 − 4| and |0 − 2| → mean 1.5
    assert rt.distance_loss(motion, own, other).item() == pytest.approx(1.5)


def test_distance_loss_is_zero_when_phi_ignores_identity():
    torch.manual_seed(0)
    renderer = IMTRenderer(tiny_renderer_config()).train()
    batch = _batch()
    with torch.no_grad():
        before = rt.render_pair(renderer, batch["source"], batch["target"], batch["negative"])
        assert rt.distance_loss(before["motion"], before["adapted_own"], before["adapted_other"]).item() > 1e-4
        # Φ's first layer sees cat(motion, identity): zero its identity columns and Φ ignores identity.
        renderer.adapt.in_layer.weight[:, renderer.cfg.latent_dim:] = 0
        after = rt.render_pair(renderer, batch["source"], batch["target"], batch["negative"])
    assert torch.equal(after["adapted_own"], after["adapted_other"])
    assert rt.distance_loss(after["motion"], after["adapted_own"], after["adapted_other"]).item() == 0.0


def test_renderer_losses_are_finite_and_reach_every_trainable_parameter():
    torch.manual_seed(0)
    renderer = IMTRenderer(tiny_renderer_config()).train()
    frozen = rt.freeze_never_used(renderer)
    disc = PatchDiscriminator(tiny_discriminator_config(SIZE))
    vgg = PerceptualLoss(VGG19Features(THIN))
    weights = rt.LossWeights()
    terms = rt.renderer_losses(renderer, disc, vgg, _batch(), weights)
    assert set(terms) == {"l1", "vgg", "vgg_face", "distance", "gan", "total", "discriminator"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in terms.values())
    weighted = (terms["l1"] + 10 * terms["vgg"] + 100 * terms["vgg_face"] + terms["distance"] + terms["gan"])
    assert terms["total"].item() == pytest.approx(weighted.item(), rel=1e-6)
    terms["total"].backward()
    no_grad = sorted(n for n, p in renderer.named_parameters() if p.grad is None)
    assert no_grad == sorted(frozen) and len(frozen) == 2 + 13  # equalconv weight/bias, 13 noise strengths
    assert all(p.grad is None for p in disc.parameters())  # the discriminator was frozen for the generator


# --- data ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tensor", "png"])
def test_renderer_pairs(tmp_path, fmt):
    folder = write_prepared(tmp_path / "data", clips=3, frames=4, fmt=fmt)
    pairs = rt.RendererPairs(folder, image_size=SIZE)
    assert len(pairs) == 3 and pairs.clips == ["clip0", "clip1", "clip2"]
    for seed in range(6):
        item = pairs[engine.SampleKey(1, seed)]
        assert item["source"].shape == item["negative"].shape == (3, SIZE, SIZE)
        assert item["mask"].shape == (1, SIZE, SIZE)
        frames = [torch.from_numpy(_frame(c, t)).permute(2, 0, 1).float() / 255 for c in range(3) for t in range(4)]
        match = [next(i for i, f in enumerate(frames) if torch.equal(f, item[k]))
                 for k in ("source", "target", "negative")]
        assert match[0] // 4 == match[1] // 4 == 1 and match[0] != match[1]  # two frames of clip 1
        assert match[2] // 4 != 1  # another identity
    again = pairs[engine.SampleKey(1, 3)]
    assert all(torch.equal(again[k], pairs[engine.SampleKey(1, 3)][k]) for k in again)
    eyes, mouth = fixed_region_masks(SIZE)
    assert torch.equal(item["mask"][0], torch.from_numpy(eyes + mouth))
    with pytest.raises(InputError, match="512"):
        rt.RendererPairs(folder, image_size=512)


def test_renderer_pairs_masks_from_landmarks(tmp_path):
    folder = write_prepared(tmp_path / "data", clips=2, frames=2, landmarks=True)
    item = rt.RendererPairs(folder)[engine.SampleKey(0, 0)]
    eyes, mouth = eye_mouth_masks(_landmarks(30.0).astype(np.float32), SIZE)  # as stored in the clip file
    assert torch.equal(item["mask"][0], torch.from_numpy(eyes + mouth))


def test_renderer_pairs_need_two_clips_with_frames(tmp_path):
    folder = write_prepared(tmp_path / "data", clips=1, frames=3)
    with pytest.raises(InputError, match="at least 2 clips"):
        rt.RendererPairs(folder)


# --- the run ---------------------------------------------------------------------------------------------------


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_objective_overfits_one_pair():
    torch.manual_seed(0)
    renderer = IMTRenderer(tiny_renderer_config()).train()
    rt.freeze_never_used(renderer)

    def frame(clip, t):
        return torch.from_numpy(_frame(clip, t)).permute(2, 0, 1).float()[None] / 255

    batch = {"source": frame(0, 0), "target": frame(0, 2), "negative": frame(1, 1),
             "mask": torch.ones(1, 1, SIZE, SIZE)}
    weights = rt.LossWeights(vgg=0, vgg_face=0, gan=0)
    optimizer = torch.optim.Adam([p for p in renderer.parameters() if p.requires_grad], lr=3e-3, betas=(0.5, 0.999))
    l1 = []
    for _ in range(12):
        terms = rt.renderer_losses(renderer, None, None, batch, weights)
        assert all(torch.isfinite(v) for v in terms.values())
        optimizer.zero_grad()
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(renderer.parameters(), 1.0)
        optimizer.step()
        l1.append(terms["l1"].item())
    assert np.mean(l1[-3:]) < 0.5 * np.mean(l1[:3]), l1


def test_training_run_previews_and_exports(tmp_path, vgg_file):
    data = write_prepared(tmp_path / "data", clips=2, frames=2)
    torch.manual_seed(0)
    official = IMTRenderer(tiny_renderer_config())
    disc = PatchDiscriminator(tiny_discriminator_config(SIZE))
    init = tmp_path / "renderer.ckpt"
    torch.save({"state_dict": {**{"gen." + k: v for k, v in official.state_dict().items()},
                               **{"disc." + k: v for k, v in disc.state_dict().items()}}}, init)
    config = tiny_config(tmp_path, data, vgg_file, init=str(init), steps=2, batch_size=1, preview_every=2,
                         ema_decay=0.5)
    result = rt.train_renderer(config)
    records = [r for r in _log(Path(config.output)) if "l1" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in records
               for k in ("l1", "vgg", "vgg_face", "gan", "discriminator", "total"))
    # The discriminator started from the file's disc.* entries: its first loss is the one of those weights.
    with torch.no_grad():
        item = rt.RendererPairs(data)[engine.StepSampler(2, 1).batch_keys(0)[0]]
        pred = rt.render_pair(official.train(), *(item[k][None] for k in ("source", "target", "negative")))["pred"]
        expected_d = discriminator_loss(disc(item["target"][None]), disc(pred)).item()
    assert records[0]["discriminator"] == pytest.approx(expected_d, rel=1e-5)
    preview = Path(config.output) / "previews" / "step-00000002.png"
    from PIL import Image
    assert Image.open(preview).size == (3 * SIZE, rt.PREVIEW_PAIRS * SIZE)
    # The exports load strictly into the tiny architecture and hold the trained (and averaged) weights.
    checkpoint = result["checkpoint"]
    trained = load_file(checkpoint / "part-renderer.safetensors")
    loaded = load_renderer(result["exports"]["trained"], cfg=tiny_renderer_config())
    assert all(torch.equal(v, trained["gen." + k]) for k, v in loaded.state_dict().items())
    assert not torch.equal(loaded.state_dict()["adapt.in_layer.weight"], official.state_dict()["adapt.in_layer.weight"])
    ema = load_renderer(result["exports"]["ema"], cfg=tiny_renderer_config())
    averaged = load_file(checkpoint / "part-renderer.ema.safetensors")
    assert torch.equal(ema.state_dict()["adapt.in_layer.weight"], averaged["gen.adapt.in_layer.weight"])
    assert not torch.equal(ema.state_dict()["adapt.in_layer.weight"], loaded.state_dict()["adapt.in_layer.weight"])
    saved = json.loads((Path(config.output) / "config.json").read_text())
    assert rt.RendererTrainConfig(**saved) == config


def test_resume_gives_the_same_next_step(tmp_path, vgg_file):
    data = write_prepared(tmp_path / "data", clips=2, frames=3)
    full = tiny_config(tmp_path, data, vgg_file, output=str(tmp_path / "full"), steps=3, batch_size=1,
                       checkpoint_every=2, keep_checkpoints=3)
    rt.train_renderer(full)
    # A second run folder holding only the step-2 checkpoint continues to step 3.
    resumed = dataclasses.replace(full, output=str(tmp_path / "resumed"))
    src = Path(full.output) / "checkpoints" / "step-00000002"
    import shutil
    shutil.copytree(src, Path(resumed.output) / "checkpoints" / src.name)
    result = rt.train_renderer(resumed)
    assert result["steps"] == 3
    last_full = next(r for r in _log(Path(full.output)) if r["step"] == 3)
    last_resumed = next(r for r in _log(Path(resumed.output)) if r["step"] == 3)
    for key in ("l1", "vgg", "vgg_face", "distance", "gan", "discriminator", "total"):
        assert last_resumed[key] == last_full[key], key
    a = load_file(Path(full.output) / "checkpoints" / "step-00000003" / "part-renderer.safetensors")
    b = load_file(Path(resumed.output) / "checkpoints" / "step-00000003" / "part-renderer.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="already holds"):
        rt.train_renderer(dataclasses.replace(full, steps=4, resume=False))


def test_missing_vgg_weights_is_an_input_error(tmp_path):
    data = write_prepared(tmp_path / "data", clips=2, frames=2)
    config = rt.RendererTrainConfig(data=str(data), output=str(tmp_path / "run"), architecture="tiny", cpu=True)
    with pytest.raises(InputError, match="--vgg-weights"):
        rt.build_models(config)
    with pytest.raises(InputError, match="multiple of 4"):
        dataclasses.replace(config, batch_size=6)


def test_register_adds_train_renderer():
    parser = argparse.ArgumentParser()
    rt.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-renderer", "data", "run", "--architecture", "tiny", "--loss-vgg-face", "50",
                              "--loss-gan", "0", "--batch-size", "8", "--vgg-weights", "vgg.pth"])
    assert args.handler is rt.main_train_renderer
    assert (args.loss_vgg_face, args.loss_gan, args.loss_l1, args.batch_size) == (50.0, 0.0, 1.0, 8)
    assert args.lr == 1e-4 and args.final_lr == 1e-4 and args.steps == 7_000_000


def test_train_renderer_command_line(tmp_path, vgg_file):
    """`python -m imtalker_core train-renderer …` (the package's own command line) on tiny synthetic clips; the
    exported renderer loads at its own size without naming its configuration."""
    from imtalker_core import load_renderer
    from imtalker_core.cli import main

    data = write_prepared(tmp_path / "data", clips=2, frames=2)
    run = tmp_path / "run"
    assert main(["train-renderer", str(data), str(run), "--architecture", "tiny", "--steps", "1", "--batch-size", "1",
                 "--cpu", "--num-workers", "0", "--vgg-weights", str(vgg_file), "--preview-every", "0"]) == 0
    assert load_renderer(run / "renderer.safetensors").cfg == tiny_renderer_config()
