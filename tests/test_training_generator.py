"""Generator training on HF Accelerate (CPU, tiny configs, synthetic data): the flow-matching objective, condition
dropout, resuming, export through the project's loader, the engine's data order and schedule, and data
preparation from the vendored driving video."""
from __future__ import annotations

import dataclasses
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imtalker_core.checkpoints import load_generator
from imtalker_core.config import tiny_generator_config
from imtalker_core.errors import CheckpointError
from imtalker_core.generator import MotionGenerator
from imtalker_core.training import data, engine
from imtalker_core.training.generator_train import (
    GeneratorTrainConfig,
    build_generator,
    generator_loss,
    train_generator,
)
from tests.helpers.standin import PARITY
from tests.helpers.training import StandInMotionEncoder, one_thread  # noqa: F401 (one_thread: autouse fixture)

AUDIO_DIM = 16




def _tiny_cfg():
    return dataclasses.replace(tiny_generator_config(), audio_dim=AUDIO_DIM)


def _synthetic_data(folder, clips=3, seed=0):
    """Prepared clips of smooth random motion and random features; clip 0 has no controls."""
    g = torch.Generator().manual_seed(seed)
    for i in range(clips):
        frames = 70 + 10 * i
        phase = torch.randn(1, 32, generator=g)
        motion = torch.randn(1, 32, generator=g) + 0.3 * torch.sin(torch.arange(frames)[:, None] * 0.2 + phase)
        controls = {} if i == 0 else {"pose": 0.1 * torch.randn(frames, 3, generator=g),
                                      "cam": 0.1 * torch.randn(frames, 3, generator=g),
                                      "gaze": 0.1 * torch.randn(frames, 2, generator=g)}
        data.add_clip(folder, f"clip{i}", motion, torch.randn(frames, AUDIO_DIM, generator=g), controls)
    return folder


def _config(tmp_path, **overrides):
    settings = {"data": str(tmp_path / "data"), "output": str(tmp_path / "run"), "architecture": "tiny",
                "steps": 6, "batch_size": 4, "lr": 1e-3, "cpu": True, "num_workers": 0, "log_every": 1,
                "checkpoint_every": 3, "keep_checkpoints": 0, "preview_every": 0}
    settings.update(overrides)
    return GeneratorTrainConfig(**settings)


def _losses(run):
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    return data.GeneratorWindows(_synthetic_data(tmp_path_factory.mktemp("windows")), 50, 10)


def _batch(windows, seed=0, batch=3):
    items = list(data.iterate_windows(windows, batch, seed))
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_loss_goes_down_on_a_tiny_overfit_set(tmp_path):
    _synthetic_data(tmp_path / "data")
    result = train_generator(_config(tmp_path, steps=40, batch_size=8, lr=3e-3, checkpoint_every=0))
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 41)) and result["steps"] == 40
    first, last = np.mean([losses[s] for s in range(1, 11)]), np.mean([losses[s] for s in range(31, 41)])
    assert last < 0.85 * first, (first, last)
    assert all(np.isfinite(list(losses.values())))


def test_resume_gives_the_same_next_steps_and_weights(tmp_path):
    _synthetic_data(tmp_path / "data")
    train_generator(_config(tmp_path))
    full = _losses(tmp_path / "run")
    # A second run folder that holds only the step-3 checkpoint of the first run.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-00000003", resumed_dir / "checkpoints" / "step-00000003")
    train_generator(_config(tmp_path, output=str(resumed_dir)))
    again = _losses(resumed_dir)
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(full[step], abs=1e-6), step
    from safetensors.torch import load_file

    for name in ("generator.safetensors", "generator_ema.safetensors"):
        a, b = load_file(tmp_path / "run" / name), load_file(resumed_dir / name)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
    # The EMA export differs from the trained weights (it has moved, slowly).
    trained, ema = load_file(tmp_path / "run" / "generator.safetensors"), load_file(
        tmp_path / "run" / "generator_ema.safetensors")
    assert any(not torch.equal(trained[k], ema[k]) for k in trained)
    # Resuming the finished run with more steps stretches the rest of the cosine decay (it had reached 1e-5).
    train_generator(_config(tmp_path, output=str(resumed_dir), steps=8))
    lines = [json.loads(line) for line in (resumed_dir / "log.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr/generator"] for r in lines if "lr/generator" in r}
    assert lr[6] == pytest.approx(1e-5) and lr[7] == pytest.approx(1e-5 + 0.99e-3 * 0.5 * (1 + np.cos(np.pi * 7 / 8)))


def test_exports_load_strictly_and_keep_the_init_files_wav2vec2_copy(tmp_path):
    _synthetic_data(tmp_path / "data")
    torch.manual_seed(3)
    start = MotionGenerator(_tiny_cfg())
    averaged = {k: v + 0.5 for k, v in start.state_dict().items() if k != "fmt.rotary_emb.inv_freq"}
    init = tmp_path / "generator.ckpt"
    # The official layout: Lightning state_dict with `model.` keys, a wav2vec2 copy, an EMA, loop extras.
    torch.save({"state_dict": {**{"model." + k: v for k, v in start.state_dict().items()},
                               "model.audio_encoder.wav2vec2.marker": torch.arange(3.0)},
                "ema_state_dict": averaged, "global_step": 7}, init)
    model, copy = build_generator(_config(tmp_path, init=str(init), init_ema=True), AUDIO_DIM)
    assert torch.equal(model.state_dict()["fmt.blocks.0.attn.qkv.weight"], averaged["fmt.blocks.0.attn.qkv.weight"])
    assert list(copy) == ["marker"] and all(p.requires_grad for p in model.parameters())

    train_generator(_config(tmp_path, init=str(init), steps=2, checkpoint_every=0))
    run = tmp_path / "run"
    trained = load_generator(run / "generator.safetensors", cfg=_tiny_cfg())
    ema = load_generator(run / "generator_ema.safetensors", cfg=_tiny_cfg())
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(run / "generator.safetensors"), "pt") as f:
        assert "audio_encoder.wav2vec2.marker" in f.keys()  # noqa: SIM118 (a safe_open handle is not a mapping)
        assert f.metadata()["imtalker_kind"] == "generator"
    saved_ema = load_file(run / "checkpoints" / "step-00000002" / "part-generator.ema.safetensors")
    for name, param in ema.named_parameters():
        assert torch.equal(param, saved_ema[name]), name
    assert not torch.equal(trained.fmt.c_embedder.weight, ema.fmt.c_embedder.weight)
    # The export records its configuration: it loads at its own size without naming it ...
    assert load_generator(run / "generator_ema.safetensors").cfg == _tiny_cfg()
    # ... and an explicit official configuration is refused (every shape differs).
    from imtalker_core.config import GeneratorConfig
    with pytest.raises(CheckpointError, match="does not match"):
        load_generator(run / "generator.safetensors", cfg=GeneratorConfig())


def test_condition_dropout_one_is_the_null_conditioned_loss(windows):
    torch.manual_seed(0)
    model = MotionGenerator(_tiny_cfg())
    batch = _batch(windows)
    changed = dict(batch)
    for name in ("audio", "pose", "cam", "gaze"):
        changed[name] = batch[name].clone()
        changed[name][:, 10:] += torch.randn_like(changed[name][:, 10:])

    def loss(b, p):
        return generator_loss(model, b, condition_dropout=p, context_dropout=0.0,
                              rng=torch.Generator().manual_seed(5))["loss"].item()

    assert loss(batch, 1.0) == loss(changed, 1.0)
    assert abs(loss(batch, 0.0) - loss(changed, 0.0)) > 1e-4

    # The same loss computed by hand: zero embeddings for the window's conditions, full context.
    rng = torch.Generator().manual_seed(5)
    prev_x, target = batch["motion"][:, :10], batch["motion"][:, 10:]
    noise = torch.randn(target.shape, generator=rng)
    t = torch.rand(target.shape[0], generator=rng)
    noised = t[:, None, None] * target + (1 - t[:, None, None]) * noise
    context = torch.zeros(target.shape[0], 60, model.cfg.cond_dim)
    for name, proj in (("pose", model.pose_projection), ("cam", model.cam_projection),
                       ("gaze", model.gaze_projection)):
        context[:, :10] += proj(batch[name][:, :10]) * batch[f"has_{name}"][:, None, None]
    with torch.no_grad():
        pred = model.velocity(t, noised, batch["reference"], prev_x, torch.zeros(3, 50, model.cfg.cond_dim),
                              model.audio_projection(batch["audio"][:, :10]), context)
    flow = target - noise
    by_hand = F.l1_loss(pred, flow) + F.l1_loss(pred[:, 1:] - pred[:, :-1], flow[:, 1:] - flow[:, :-1])
    assert loss(batch, 1.0) == pytest.approx(by_hand.item(), abs=1e-6)


def test_loss_options_and_context_dropout(windows):
    torch.manual_seed(0)
    model = MotionGenerator(_tiny_cfg())
    batch = _batch(windows, seed=4)
    def terms(**options):
        return generator_loss(model, batch, condition_dropout=0.0, rng=torch.Generator().manual_seed(1), **options)

    l1, mse = terms(context_dropout=0.0), terms(context_dropout=0.0, loss="mse")
    assert l1["loss"].item() == pytest.approx(l1["flow"].item() + l1["velocity"].item(), rel=1e-6)
    assert mse["flow"].item() != pytest.approx(l1["flow"].item(), rel=1e-3)
    weighted = terms(context_dropout=0.0, velocity_weight=0.0)
    assert weighted["loss"].item() == pytest.approx(l1["flow"].item(), rel=1e-6)
    # Context dropout 1 equals the first window at inference: zero context motion and embeddings.
    dropped = terms(context_dropout=1.0)
    zeroed = dict(batch)
    zeroed["motion"] = batch["motion"].clone()
    zeroed["motion"][:, :10] += 5.0
    again = generator_loss(model, zeroed, condition_dropout=0.0, context_dropout=1.0,
                           rng=torch.Generator().manual_seed(1))
    assert again["loss"].item() == dropped["loss"].item()
    kept = generator_loss(model, zeroed, condition_dropout=0.0, context_dropout=0.0,
                          rng=torch.Generator().manual_seed(1))
    assert abs(kept["loss"].item() - l1["loss"].item()) > 1e-5


def test_step_sampler_is_a_pure_function_of_the_step():
    sampler = engine.StepSampler(5, 3, seed=9)
    batches = [keys for _, keys in zip(range(5), iter(sampler))]
    # Resuming at step 3 yields exactly the uninterrupted run's batches 3 and 4.
    later = engine.StepSampler(5, 3, seed=9, start_step=3)
    assert [keys for _, keys in zip(range(2), iter(later))] == batches[3:5]
    # Every epoch (5 samples) visits every item once.
    flat = [k.index for keys in batches for k in keys]
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4] and sorted(flat[5:10]) == [0, 1, 2, 3, 4]
    # Two processes read disjoint samples of the same step.
    rank0, rank1 = (engine.StepSampler(5, 2, 9, rank=r, world=2).batch_keys(0) for r in (0, 1))
    assert not {k.seed for k in rank0} & {k.seed for k in rank1}


def test_cosine_schedule_and_ema():
    layer = nn.Linear(2, 2)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-4)
    schedule = engine.cosine_schedule(optimizer, total_steps=10, warmup=2, final_lr=1e-5)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(5e-5) and lrs[2] == pytest.approx(1e-4)
    assert lrs[10] == pytest.approx(1e-5) and lrs[11] == pytest.approx(1e-5)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))

    ema = engine.EMA(layer, decay=0.9)
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.state_dict()["weight"], before + 0.1, atol=1e-6)
    fresh = nn.Linear(2, 2)
    ema.copy_to(fresh)
    assert torch.equal(fresh.weight, ema.state_dict()["weight"])




def test_prepare_data_on_the_driving_video_and_resume(tmp_path, media_dir):
    from imtalker_core.generator.audio import AudioEncoder
    from imtalker_core.media.video import write_video

    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    shutil.copy(media_dir / "driving_short.mp4", videos / "sub" / "talk.mp4")
    np.save(videos / "sub" / "talk.pose.npy", np.arange(300, dtype=np.float32).reshape(100, 3) / 300)
    np.save(videos / "sub" / "talk.gaze.npy", np.zeros((40, 2), dtype=np.float32))  # wrong length: dropped
    write_video(videos / "blank.mp4", np.full((8, 64, 64, 3), 128, np.uint8), fps=25)  # no face, no audio
    encoder = AudioEncoder.from_folder(PARITY / "tiny-wav2vec2").eval()
    renderer = StandInMotionEncoder()
    out = tmp_path / "prepared"

    # Sidecars only (the landmark pass is tested in tests/test_training_labels.py).
    report = data.prepare_clips(videos, out, renderer, encoder, frames="tensor", labels="sidecar")
    assert report.prepared == ["sub__talk"] and list(report.rejected) == ["blank"]
    manifest = data.read_manifest(out)
    clip = manifest["clips"]["sub__talk"]
    assert clip["status"] == "ok" and clip["video_frames"] == 100
    assert abs(clip["video_frames"] - clip["audio_frames"]) <= 1
    assert clip["frames"] == min(clip["video_frames"], clip["audio_frames"])
    assert clip["controls"] == ["pose"] and any("gaze" in p for p in clip["problems"])
    assert clip["label_mode"] == "sidecar" and clip["labels"] == {"pose": "sidecar"} and clip["landmarks"] is False
    assert manifest["audio_dim"] == 32 and manifest["clips"]["blank"]["status"] == "rejected"
    from safetensors.torch import load_file

    tensors = load_file(out / clip["clip_file"])
    frames = clip["frames"]
    assert tensors["motion"].shape == (frames, 32) and tensors["audio"].shape == (frames, 32)
    assert sorted(tensors) == ["audio", "motion", "pose"]
    assert torch.equal(tensors["pose"][:, 0], torch.arange(frames, dtype=torch.float32) * 3 / 300)
    crops = load_file(out / clip["frames_file"])["frames"]
    assert crops.shape == (frames, 64, 64, 3) and crops.dtype == torch.uint8
    # The latents are the encoder's output on the saved crops.
    first = crops[:2].permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(tensors["motion"][:2], renderer.encode_motion(first), atol=1e-5)

    clip_mtime = (out / clip["clip_file"]).stat().st_mtime_ns
    again = data.prepare_clips(videos, out, renderer, encoder, frames="tensor", labels="sidecar")
    assert again.prepared == [] and sorted(again.skipped) == ["blank", "sub__talk"]
    assert (out / clip["clip_file"]).stat().st_mtime_ns == clip_mtime

    windows = data.GeneratorWindows(out, 50, 10)
    item = windows[engine.SampleKey(0, 11)]
    assert item["motion"].shape == (60, 32) and item["has_pose"].item() == 1.0 and item["has_gaze"].item() == 0.0
    start = int(np.random.default_rng(11).integers(0, frames - 60 + 1))
    assert torch.equal(item["audio"], tensors["audio"][start:start + 60])


def test_resampling_to_25_fps_maps_each_output_frame_once():
    from fractions import Fraction

    for fps, source_frames in ((Fraction(30), 60), (Fraction(50), 50), (Fraction(24000, 1001), 48)):
        outputs = [i for j in range(source_frames) for i in data._resampled_indices(fps, j)]
        assert outputs == list(range(len(outputs)))
        assert abs(len(outputs) - source_frames * 25 / fps) <= 1


def test_train_generator_command_line(tmp_path):
    """`python -m imtalker_core train-generator …` (the package's own command line) on a tiny synthetic set."""
    from imtalker_core.cli import build_parser, main

    _synthetic_data(tmp_path / "data")
    parser = build_parser()
    assert main(["train-generator", str(tmp_path / "data"), str(tmp_path / "run"), "--architecture",
                 "tiny", "--steps", "2", "--cpu", "--num-workers", "0", "--preview-every", "0",
                 "--log-every", "1", "--loss", "mse", "--condition-dropout", "0.2"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["loss"] == "mse" and saved["condition_dropout"] == 0.2 and saved["steps"] == 2
    assert sorted(_losses(tmp_path / "run")) == [1, 2]
    assert load_generator(tmp_path / "run" / "generator_ema.safetensors").cfg == _tiny_cfg()
    with pytest.raises(SystemExit):
        parser.parse_args(["train-generator", "d", "o", "--loss", "huber"])


# --- the rendered preview ------------------------------------------------------------------------------------


def _tiny_renderer_file(path):
    """A random tiny renderer (128²) as `.safetensors` whose configuration rides in its metadata."""
    from safetensors.torch import save_file

    from imtalker_core.checkpoints import config_metadata
    from imtalker_core.config import tiny_renderer_config
    from imtalker_core.renderer import IMTRenderer

    torch.manual_seed(0)
    renderer = IMTRenderer(tiny_renderer_config())
    save_file({k: v.contiguous() for k, v in renderer.state_dict().items()}, str(path),
              metadata=config_metadata(renderer.cfg))
    return path


def _decode(path):
    """Every frame of a video file as float32 `[T, H, W, 3]` in [0, 1]."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32) / 255


def test_preview_video_renders_the_ema_motion_and_leaves_training_alone(tmp_path, media_dir, monkeypatch):
    """`train-generator --preview-renderer … --preview-image … --preview-clip …` writes previews/step-*.mp4: the EMA
    weights' motion for the clip's features and controls, rendered onto the cropped portrait; the losses, the
    validation losses and the exported weights are exactly those of the same run without the video."""
    from safetensors.torch import load_file

    from imtalker_core import pipeline
    from imtalker_core.checkpoints import load_renderer
    from imtalker_core.cli import main
    from imtalker_core.media.face import crop_face
    from imtalker_core.media.images import load_image, to_model_input
    from imtalker_core.media.video import write_video

    _synthetic_data(tmp_path / "data")
    renderer_file = _tiny_renderer_file(tmp_path / "renderer_tiny.safetensors")
    portrait = media_dir / "statue_256.png"
    calls = []
    real_generate = pipeline.generate_motion

    def spy(generator, features, reference, **options):
        motion = real_generate(generator, features, reference, **options)
        calls.append({"weights": {k: v.clone() for k, v in generator.state_dict().items()}, "features": features,
                      "reference": reference.clone(), "options": options, "motion": motion})
        return motion

    monkeypatch.setattr(pipeline, "generate_motion", spy)
    # Preview at step 2 (and a step after it, which a disturbed random state or weight would change).
    settings = {"steps": 3, "preview_every": 2, "checkpoint_every": 2}
    assert main(["train-generator", str(tmp_path / "data"), str(tmp_path / "run"), "--architecture", "tiny",
                 "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--cpu", "--num-workers", "0", "--log-every",
                 "1", "--checkpoint-every", "2", "--keep-checkpoints", "0", "--preview-every", "2",
                 "--preview-renderer", str(renderer_file), "--preview-image", str(portrait),
                 "--preview-clip", "clip1", "--preview-seconds", "0.4"]) == 0
    train_generator(_config(tmp_path, output=str(tmp_path / "plain"), **settings))

    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "previews").iterdir()) == ["step-00000002.mp4"]
    video = _decode(run / "previews" / "step-00000002.mp4")
    assert video.shape == (10, 128, 128, 3)  # 0.4 s at 25 fps, the tiny renderer's 128² frames

    def records(folder):
        return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]

    with_video, without = records(run), records(tmp_path / "plain")
    drop_time = lambda r: {k: v for k, v in r.items() if k not in ("time_s", "steps_per_s")}  # noqa: E731
    assert [drop_time(r) for r in with_video] == [drop_time(r) for r in without]
    assert any("preview/ema_train_windows_loss" in r for r in with_video)
    for name in ("generator.safetensors", "generator_ema.safetensors"):
        a, b = load_file(run / name), load_file(tmp_path / "plain" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # The motion came from the EMA weights at step 2 (not the trained ones), clip1's first 10 frames of features
    # and controls, and the portrait's own latent, as inference samples it (cfg 3, 10 steps, the run's seed).
    assert len(calls) == 1
    call = calls[0]
    step2 = run / "checkpoints" / "step-00000002"
    ema = load_file(step2 / "part-generator.ema.safetensors")
    trained = {k.removeprefix("generator."): v for k, v in load_file(step2 / "part-generator.safetensors").items()}
    assert all(torch.equal(call["weights"][k], v) for k, v in ema.items())
    assert any(not torch.equal(trained[k], v) for k, v in ema.items())
    clip = load_file(tmp_path / "data" / "clips" / "clip1.safetensors")
    assert torch.equal(call["features"], clip["audio"][:10])
    for name in ("pose", "cam", "gaze"):
        assert torch.equal(call["options"][name], clip[name][:10]), name
    assert (call["options"]["cfg_scale"], call["options"]["steps"], call["options"]["seed"]) == (3.0, 10, 0)
    renderer = load_renderer(renderer_file)
    face, _ = crop_face(load_image(portrait), 1.6, 128, on_no_face="center")
    identity = pipeline.encode_identity(renderer, to_model_input(face, 128))
    assert torch.allclose(call["reference"], identity.motion, atol=1e-6)
    assert call["motion"].shape == (10, 32)
    # ... and the video holds the renderer's frames of that motion (the same frames through the same encoder).
    frames = pipeline.render_frames(renderer, identity, call["motion"]).permute(0, 2, 3, 1)
    write_video(tmp_path / "by_hand.mp4", frames, fps=25)
    assert np.abs(_decode(tmp_path / "by_hand.mp4") - video).max() <= 2 / 255


def test_preview_settings_are_checked_before_training(tmp_path, media_dir):
    from imtalker_core.cli import main
    from imtalker_core.errors import InputError

    _synthetic_data(tmp_path / "data")
    with pytest.raises(InputError, match=r"needs a portrait.*--preview-image"):
        _config(tmp_path, preview_renderer="models/imtalker/renderer.ckpt")
    with pytest.raises(InputError, match=r"preview_image only matter.*--preview-renderer"):
        _config(tmp_path, preview_image=str(media_dir / "statue_256.png"))
    with pytest.raises(InputError, match="preview_seconds must be positive"):
        _config(tmp_path, preview_seconds=0.0)
    # The command line says so too (exit status 2) and starts nothing.
    assert main(["train-generator", str(tmp_path / "data"), str(tmp_path / "run"), "--architecture", "tiny",
                 "--cpu", "--preview-renderer", str(tmp_path / "renderer.safetensors")]) == 2
    renderer_file = _tiny_renderer_file(tmp_path / "renderer.safetensors")
    preview = {"preview_every": 1, "preview_renderer": str(renderer_file),
               "preview_image": str(media_dir / "statue_256.png")}
    with pytest.raises(InputError, match=r"preview clip 'nope' is not in .*clip0, clip1, clip2"):
        train_generator(_config(tmp_path, preview_clip="nope", **preview))
    with pytest.raises(InputError, match="Renderer file not found"):
        train_generator(_config(tmp_path, **{**preview, "preview_renderer": str(tmp_path / "missing.ckpt")}))
    with pytest.raises(InputError, match="Image file not found"):
        train_generator(_config(tmp_path, **{**preview, "preview_image": str(tmp_path / "missing.png")}))
    assert not (tmp_path / "run").exists()


def test_a_preview_renderer_that_does_not_load_turns_the_videos_off_not_the_training(tmp_path, media_dir, caplog):
    import logging

    from safetensors.torch import save_file

    from imtalker_core.checkpoints import config_metadata
    from imtalker_core.config import tiny_renderer_config

    _synthetic_data(tmp_path / "data")
    broken = tmp_path / "not_a_renderer.safetensors"  # a tiny renderer's configuration, none of its weights
    save_file({"x": torch.zeros(1)}, str(broken), metadata=config_metadata(tiny_renderer_config()))
    with caplog.at_level(logging.ERROR, logger="imtalker_core.training.generator_train"):
        result = train_generator(_config(tmp_path, steps=2, preview_every=1, checkpoint_every=0,
                                         preview_renderer=str(broken), preview_image=str(media_dir / "statue_256.png")))
    assert result["steps"] == 2 and result["exports"]["ema"].is_file()
    failures = [r for r in caplog.records if "preview video failed" in r.getMessage()]
    assert len(failures) == 1 and str(broken) in failures[0].getMessage()  # reported once, then off
    assert not list((tmp_path / "run").glob("previews/*.mp4"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "preview/ema_train_windows_loss" in r] == [1, 2]  # the losses go on
