"""Training data: preparing a folder of talking-head videos, and the generator's training windows.

`prepare_clips(videos, out, renderer, audio_encoder)` turns every video under `videos` (searched
recursively: .mp4 .mov .m4v .mkv .avi .webm) into one prepared clip:

1. the video is read at 25 fps (other rates are resampled by timestamp: output frame i is the source frame on
   screen at i/25 s) and cropped with one steady square for the whole clip (`media.face.stable_video_box`, the
   pack's 1.6x crop, slid inside the frame), resized to the renderer's size S (512 for the official renderer);
2. motion latents come from the renderer's motion encoder on those crops (`pipeline.encode_motion`);
3. wav2vec2 features come from the clip's sound track (or a sidecar `<stem>.wav/.flac/.mp3` when the video has
   none), 16 kHz mono, at 25 fps (`generator.audio.AudioEncoder`, as at inference);
4. the video must have as many 25 fps frames as the audio has (`ceil(samples·25/16000)`), within
   `max_frame_mismatch` (1); both are cut to the shorter. A clip failing this, without a face, without audio,
   or unreadable is recorded as rejected with its problems and never used;
5. optional per-frame controls beside the video, same stem: `<stem>.pose.*` `[T, 3]`, `<stem>.cam.*` `[T, 3]`,
   `<stem>.gaze.*` `[T, 2]` (`.npy`, `.txt`, `.csv` or `.pt`), or a SMIRK `<stem>.smirk.pt` (`pose_params`,
   `cam`), as the reference's data holds them. They count frames of the source video (resampled with it);
   one whose length differs from the video's by more than `max_frame_mismatch` is dropped with a problem;
6. `labels` decides where pose and gaze come from. "auto" (default) and "landmarks": a part without a usable
   sidecar (pose or gaze) is measured on the clip's 25 fps crops by `controls.landmarks.PoseGazeEstimator`
   (dlib's 68 landmarks, default `PoseGazeOptions`: pose as SMIRK's axis-angle, gaze in L2CS's convention),
   in the same pass as the motion encoding, and the crops' 68 landmarks are kept for the renderer's eye and
   mouth masks; sidecars always win over measured values. The camera is never measured. "auto" without dlib
   (or its landmark model) installed goes on with sidecars only, logs a warning and writes why into each
   clip's `labels_note`; "landmarks" then raises `InputError` naming the pip command. A clip where the
   landmark pass finds no face keeps its sidecars and says so in `labels_note`. "sidecar": sidecar files
   only, no landmark pass (the fastest; no landmarks). "none": no pose, cam or gaze at all, sidecars ignored.

Layout of a prepared folder (the renderer trainer reads the same)::

    manifest.json               settings and one entry per source video (below)
    clips/<id>.safetensors      "motion" [T, 32] float32 motion latents; "audio" [T, D] float32 wav2vec2
                                features (D = 768 official); optional "pose" [T, 3], "cam" [T, 3], "gaze" [T, 2]
                                float32; optional "landmarks" [T, 68, 2] float32, dlib's 68 points as (x, y)
                                pixels of the S² crop (what `renderer_train.RendererPairs` draws its masks
                                from); all at 25 fps, frame t of each is the same instant
    frames/<id>.safetensors     frames="tensor": "frames" uint8 [T, S, S, 3] RGB, the crops the latents came
                                from (read single frames with `safetensors.safe_open(...).get_slice("frames")[t]`)
    frames/<id>/<t:06d>.png     frames="png": the same crops as RGB PNG files, t = 0 … T-1

`<id>` is the video's path under `videos` without its suffix, with `/` replaced by `__`. manifest.json::

    {"format": 1, "fps": 25, "image_size": S, "crop_scale": 1.6, "frames_format": "none"|"png"|"tensor",
     "motion_dim": 32, "audio_dim": D, "encoders": {...},
     "clips": {"<id>": {"source": "<path under videos>", "size": bytes, "mtime_ns": int,
                        "status": "ok"|"rejected", "problems": [str, ...],
                        "frames": T, "video_frames": n, "audio_frames": n, "source_fps": float,
                        "crop": {"x0", "y0", "size", "image_h", "image_w"}, "controls": ["pose", ...],
                        "label_mode": "landmarks"|"sidecar"|"none", "labels": {"pose": "sidecar"|"landmarks",
                        "gaze": ..., "cam": "sidecar"} (the parts present), "landmarks": bool,
                        "faces_found": fraction of frames where the landmark pass found a face (0-1),
                        "labels_note": why labels were not measured (only then),
                        "clip_file": "clips/<id>.safetensors", "frames_file": "frames/<id>.safetensors"|
                        "frames/<id>"|null}}}

`label_mode` is what was done ("landmarks": the landmark pass ran; "sidecar": sidecars only, also when
"auto" found no dlib; "none"); entries written before labels existed count as "sidecar".

Preparation is resumable: a video whose manifest entry has the same size and modification time (and whose
files exist) is skipped; the manifest is rewritten after every clip. A changed sidecar file alone is not
noticed: delete the clip's file under `clips/` to prepare it again. Nor is a clip prepared again for another
`labels` mode (e.g. prepared before dlib was installed): such clips are counted in a warning, and
`relabel=True` (`--relabel`) prepares them again (every step, motion and audio included). frames="tensor"
holds a clip's crops in memory until it is written (S²·3 bytes a frame: 0.75 MB at 512², 1.1 GB for a
minute); "png" streams them. The landmark pass costs 25–45 ms per 512² frame on one CPU core.

`GeneratorWindows` samples the generator's training windows from a prepared folder, as the reference does:
`context + window` (10 + 50) consecutive frames from a random start, the first `context` frames being the
previous window's ground truth, and the reference motion is a random frame of those 60.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import IMTalkerError, InputError
from .engine import SampleKey

log = logging.getLogger(__name__)

FORMAT = 1
FPS = 25
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm")
AUDIO_SIDECARS = (".wav", ".flac", ".mp3", ".m4a", ".ogg")
CONTROL_SUFFIXES = (".npy", ".txt", ".csv", ".pt")
CONTROLS = {"pose": 3, "cam": 3, "gaze": 2}
FRAME_FORMATS = ("none", "png", "tensor")
#: Where pose and gaze labels come from (`prepare_clips(labels=...)`, module docstring item 6).
LABEL_MODES = ("auto", "landmarks", "sidecar", "none")
#: The parts the landmark pass measures (the camera is not).
MEASURED_CONTROLS = ("pose", "gaze")
LANDMARK_POINTS = 68
MANIFEST = "manifest.json"


@dataclass
class PrepareReport:
    """What `prepare_clips` did: clip ids prepared now, skipped (already prepared), and rejected now
    (`{id: [problems]}`)."""

    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)


def clip_id(video: Path, root: Path) -> str:
    """`<path under root without suffix>` with `/` replaced by `__` (unique per video in the folder)."""
    return "__".join(video.relative_to(root).with_suffix("").parts)


def find_videos(root: str | os.PathLike) -> list[Path]:
    """Every video file under `root` (recursively), sorted; `InputError` when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"video folder {root} does not exist or is not a folder")
    videos = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                    and not p.name.startswith("."))
    if not videos:
        raise InputError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under {root}")
    return videos


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """A prepared folder's manifest (see the module docstring); `InputError` when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder} is not a prepared data folder (no {MANIFEST}); run prepare-data first")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path} has format {manifest.get('format')}, this version reads {FORMAT}; prepare again")
    return manifest


def _write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    tmp = folder / (MANIFEST + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, folder / MANIFEST)


def _fps_fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001 * 1000)


def _resampled_indices(source_fps: Fraction, source_index: int) -> range:
    """Output (25 fps) frame indices whose instant i/25 s falls while source frame `source_index` is on screen."""
    # Output frame i shows source frame floor(i · fps / 25); these are the i mapping to source_index.
    first = -(-source_index * FPS // source_fps)
    stop = -(-(source_index + 1) * FPS // source_fps)
    return range(int(first), int(stop))


def _find_controls(video: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The control files beside `video` (see the module docstring), as `{name: [n, width]}`, and problems."""
    from ..runner import load_controls

    found, problems = {}, []
    smirk = video.with_name(video.stem + ".smirk.pt")
    for name, width in CONTROLS.items():
        paths = [video.with_name(f"{video.stem}.{name}{s}") for s in CONTROL_SUFFIXES]
        path = next((p for p in paths if p.is_file()), None)
        if path is None and name in ("pose", "cam") and smirk.is_file():
            path = smirk
        if path is None:
            continue
        try:
            found[name] = load_controls(path, width, name)
        except InputError as err:
            problems.append(f"{name} ignored: {err}")
    return found, problems


def _load_audio(video: Path, has_track: bool) -> tuple[np.ndarray, str]:
    """16 kHz mono float32 samples of the clip's sound track (or sidecar), and where they came from."""
    from ..media import audio as media_audio

    source = video if has_track else next((video.with_suffix(s) for s in AUDIO_SIDECARS
                                           if video.with_suffix(s).is_file()), None)
    if source is None:
        raise InputError("no sound track and no sidecar audio file (" + ", ".join(AUDIO_SIDECARS) + ")")
    wave, rate = media_audio.load_audio(source)
    return media_audio.to_mono_16k(wave, rate), source.name


class _FrameSink:
    """Keeps the crops of one clip as PNG files or for one uint8 tensor file (or drops them)."""

    def __init__(self, kind: str, folder: Path, cid: str):
        self.kind, self.frames, self.count = kind, [], 0
        self.png_dir = folder / "frames" / cid
        self.tensor_file = folder / "frames" / f"{cid}.safetensors"
        if kind == "png":
            self.png_dir.mkdir(parents=True, exist_ok=True)
        elif kind == "tensor":
            self.tensor_file.parent.mkdir(parents=True, exist_ok=True)

    def add(self, crop: np.ndarray) -> None:
        if self.kind == "png":
            import cv2

            if not cv2.imwrite(str(self.png_dir / f"{self.count:06d}.png"), crop[:, :, ::-1]):
                raise OSError(f"could not write {self.png_dir / f'{self.count:06d}.png'}")
        elif self.kind == "tensor":
            self.frames.append(crop)
        self.count += 1

    def finish(self, keep: int, folder: Path) -> str | None:
        """Keep the first `keep` frames (0: a rejected clip leaves no frames); returns the manifest's
        `frames_file`."""
        if self.kind == "png":
            for t in range(keep, self.count):
                (self.png_dir / f"{t:06d}.png").unlink(missing_ok=True)
            if keep == 0:
                self.png_dir.rmdir()
                return None
            return self.png_dir.relative_to(folder).as_posix()
        if self.kind == "tensor" and keep == 0:
            return None
        if self.kind == "tensor":
            from safetensors.torch import save_file

            part = self.tensor_file.with_name(self.tensor_file.name + ".part")
            save_file({"frames": torch.from_numpy(np.stack(self.frames[:keep]))}, str(part))
            os.replace(part, self.tensor_file)
            return self.tensor_file.relative_to(folder).as_posix()
        return None


class _LandmarkPass:
    """Pose, gaze and 68 landmarks of one clip's 25 fps crops, measured as they stream by (or nothing when
    disabled). A failure (the landmark model cannot load, no face in any crop) leaves the clip without
    measured labels and is kept in `note`; `ran` is False when the pass could not run at all (the model)."""

    def __init__(self, enabled: bool):
        from ..controls import landmarks as lm

        self.estimator = lm.PoseGazeEstimator(FPS, keep_landmarks=True) if enabled else None
        self.ran = enabled
        self.note: str | None = None

    def add(self, crop: np.ndarray, repeats: int) -> None:
        """Measure `crop [S, S, 3]` uint8 RGB once for `repeats` output frames."""
        if self.estimator is None:
            return
        try:
            self.estimator.add(crop, repeats)
        except InputError as err:
            self.estimator, self.ran, self.note = None, False, f"pose/gaze not measured: {err}"

    def finish(self):
        """The `PoseGazeResult` (with landmarks) of every crop added, or None (see `note`)."""
        if self.estimator is None:
            return None
        try:
            return self.estimator.result()
        except InputError as err:
            self.note = f"pose/gaze not measured: {err}"
            return None


def _resolve_labels(labels: str) -> tuple[str, str | None]:
    """The label mode to apply ("landmarks", "sidecar" or "none") for `labels`, and the note explaining why
    "auto" could not measure (None otherwise). `InputError` for an unknown mode or "landmarks" without dlib."""
    from ..controls import landmarks as lm

    if labels not in LABEL_MODES:
        raise InputError(f"labels={labels!r}: use one of {', '.join(LABEL_MODES)}")
    if labels in ("sidecar", "none"):
        return labels, None
    if lm.landmarks_available():
        return "landmarks", None
    if labels == "landmarks":
        raise InputError(f"labels='landmarks' measures pose and gaze with dlib's 68-point landmarks, which are not "
                         f"installed: run `{lm.INSTALL_HINT}`, or use labels 'auto' or 'sidecar'")
    return "sidecar", (f"pose/gaze not measured: dlib or its landmark model is not installed (`{lm.INSTALL_HINT}`"
                       "); sidecar files only. Install it and prepare again with --relabel to measure them")


def _prepare_one(video: Path, root: Path, out: Path, cid: str, renderer, audio_encoder, *, frames: str,
                 crop_scale: float, batch_size: int, max_frame_mismatch: int, device_audio, label_mode: str,
                 label_note: str | None) -> dict[str, Any]:
    """Prepare one video; returns its manifest entry (status "ok" or "rejected" with problems).

    label_mode: "landmarks", "sidecar" or "none" (`_resolve_labels`); label_note: why "auto" measures nothing."""
    from ..media import face
    from ..media import video as media_video
    from ..pipeline import encode_motion
    from ..timing import frame_count

    stat = video.stat()
    entry: dict[str, Any] = {"source": video.relative_to(root).as_posix(), "size": stat.st_size,
                             "mtime_ns": stat.st_mtime_ns, "status": "rejected", "problems": []}
    problems = entry["problems"]
    size = renderer.cfg.image_size
    try:
        info = media_video.video_info(video)
        box = face.stable_video_box(media_video.read_video(video), scale=crop_scale, on_no_face="error",
                                    no_face_hint="the clip is left out")
        wave, audio_source = _load_audio(video, info.has_audio)
    except InputError as err:
        problems.append(str(err))
        return entry
    source_fps = _fps_fraction(info.fps)
    entry.update(source_fps=float(info.fps), audio_source=audio_source,
                 crop={"x0": box.x0, "y0": box.y0, "size": box.size, "image_h": box.image_h,
                       "image_w": box.image_w})
    if source_fps != FPS:
        log.info("%s: resampling %s fps to %d fps", video.name, info.fps, FPS)
    controls, control_problems = _find_controls(video) if label_mode != "none" else ({}, [])
    problems.extend(control_problems)

    sink = _FrameSink(frames, out, cid)
    landmark_pass = _LandmarkPass(label_mode == "landmarks")
    latents, pending, source_of = [], [], []

    def flush() -> None:
        batch = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).float().div_(255)
        latents.append(encode_motion(renderer, batch, batch_size=batch_size).cpu())
        pending.clear()

    source_frames = 0
    try:
        for j, frame in enumerate(media_video.read_video(video)):
            source_frames = j + 1
            repeats = range(1) if source_fps == FPS else _resampled_indices(source_fps, j)
            if len(repeats) == 0:
                continue
            crop = face.crop_box(frame, box, size)
            landmark_pass.add(crop, len(repeats))
            for _ in repeats:
                source_of.append(j)
                sink.add(crop)
                pending.append(crop)
                if len(pending) == batch_size:
                    flush()
        if pending:
            flush()
    except InputError as err:
        problems.append(str(err))
        sink.finish(0, out)
        return entry
    video_frames = len(source_of)
    audio_frames = frame_count(len(wave))
    entry.update(video_frames=video_frames, audio_frames=audio_frames)
    if abs(video_frames - audio_frames) > max_frame_mismatch:
        problems.append(f"the video has {video_frames} frames at {FPS} fps but its audio covers {audio_frames} "
                        f"(more than {max_frame_mismatch} apart)")
        sink.finish(0, out)
        return entry
    total = min(video_frames, audio_frames)
    features = audio_encoder(torch.from_numpy(wave).to(device_audio), num_frames=audio_frames)[0, :total]
    tensors = {"motion": torch.cat(latents)[:total].float().contiguous(),
               "audio": features.float().cpu().contiguous()}
    index = torch.tensor(source_of[:total])
    labels: dict[str, str] = {}
    for name, seq in controls.items():
        if abs(seq.shape[0] - source_frames) > max_frame_mismatch:
            problems.append(f"{name} has {seq.shape[0]} frames, the video {source_frames}; {name} ignored")
            continue
        tensors[name] = seq[index.clamp(max=seq.shape[0] - 1)].contiguous()
        labels[name] = "sidecar"
    measured = landmark_pass.finish()
    if measured is not None:
        for name in MEASURED_CONTROLS:
            if name not in tensors:  # a sidecar wins over the measurement
                tensors[name] = getattr(measured, name)[:total].float().contiguous()
                labels[name] = "landmarks"
        tensors["landmarks"] = measured.landmarks[:total].float().contiguous()
        entry["faces_found"] = round(measured.detection_rate, 4)
    elif landmark_pass.note:
        log.warning("%s: %s", video.name, landmark_pass.note)
    note = label_note or landmark_pass.note
    # A pass that could not run (the model failed to load) counts as sidecars only, so --relabel retries it.
    applied = "sidecar" if label_mode == "landmarks" and not landmark_pass.ran else label_mode
    entry.update(label_mode=applied, labels=labels, landmarks="landmarks" in tensors)
    if note:
        entry["labels_note"] = note
    from safetensors.torch import save_file

    clip_file = out / "clips" / f"{cid}.safetensors"
    part = clip_file.with_name(clip_file.name + ".part")
    save_file(tensors, str(part), metadata={"source": entry["source"], "fps": str(FPS)})
    os.replace(part, clip_file)
    entry.update(status="ok", frames=total, controls=sorted(set(tensors) & set(CONTROLS)),
                 clip_file=clip_file.relative_to(out).as_posix(), frames_file=sink.finish(total, out))
    return entry


def _label_mode(entry: Mapping[str, Any]) -> str:
    """The label mode a clip was prepared with ("sidecar" for entries from before label modes existed)."""
    return entry.get("label_mode", "sidecar")


def _is_done(entry: Mapping[str, Any] | None, video: Path, out: Path, frames: str) -> bool:
    if not entry:
        return False
    stat = video.stat()
    if entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
        return False
    if entry.get("status") == "rejected":
        return True
    files = [entry.get("clip_file")] + ([entry.get("frames_file")] if frames != "none" else [])
    return all(f and (out / f).exists() for f in files)


def prepare_clips(videos: str | os.PathLike, out: str | os.PathLike, renderer, audio_encoder, *,
                  frames: str = "none", crop_scale: float = 1.6, batch_size: int = 16, max_frame_mismatch: int = 1,
                  labels: str = "auto", relabel: bool = False, encoders: Mapping[str, str] | None = None,
                  callback: Callable[[int, int], None] | None = None) -> PrepareReport:
    """Prepare every video under `videos` into `out` (layout and rules in the module docstring).

    renderer: an `IMTRenderer` (its motion encoder and image size are used); audio_encoder: an `AudioEncoder`
    (its output width becomes the clips' audio dimension). frames: "none", "png" or "tensor" (keep the crops
    for renderer training). labels: "auto", "landmarks", "sidecar" or "none", where pose and gaze come from
    (module docstring, item 6). relabel: prepare again the clips prepared with another label mode (otherwise
    they are kept and counted in a warning). encoders: free text recorded in the manifest (which weights were
    used). callback(done, total) after each video. Videos already prepared with the same size and
    modification time are skipped; settings that differ from the folder's manifest raise `InputError`.
    """
    if frames not in FRAME_FORMATS:
        raise InputError(f"frames={frames!r}: use one of {', '.join(FRAME_FORMATS)}")
    if max_frame_mismatch < 0:
        raise InputError(f"max_frame_mismatch cannot be negative, got {max_frame_mismatch}")
    label_mode, label_note = _resolve_labels(labels)
    if label_note:
        log.warning("labels=%r: %s", labels, label_note)
    root, out = Path(videos), Path(out)
    found = find_videos(root)
    settings = {"format": FORMAT, "fps": FPS, "image_size": renderer.cfg.image_size, "crop_scale": crop_scale,
                "frames_format": frames, "motion_dim": renderer.cfg.latent_dim}
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        differ = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
        if differ:
            raise InputError(f"{out} was prepared with other settings ({differ}: (folder, now)); "
                             "use another output folder or the same settings")
    else:
        manifest = {**settings, "audio_dim": None, "encoders": dict(encoders or {}), "clips": {}}
    (out / "clips").mkdir(parents=True, exist_ok=True)
    device_audio = next(audio_encoder.parameters()).device
    report, other_labels = PrepareReport(), []
    for n, video in enumerate(found):
        cid = clip_id(video, root)
        previous = manifest["clips"].get(cid)
        done = _is_done(previous, video, out, frames)
        if done and previous.get("status") == "ok" and _label_mode(previous) != label_mode:
            if relabel:
                done = False
            else:
                other_labels.append(cid)
        if done:
            report.skipped.append(cid)
        else:
            log.info("preparing %s (%d of %d)", video.name, n + 1, len(found))
            try:
                entry = _prepare_one(video, root, out, cid, renderer, audio_encoder, frames=frames,
                                     crop_scale=crop_scale, batch_size=batch_size,
                                     max_frame_mismatch=max_frame_mismatch, device_audio=device_audio,
                                     label_mode=label_mode, label_note=label_note)
            except IMTalkerError as err:  # a model producing NaN on this clip: record it, go on
                stat = video.stat()
                entry = {"source": video.relative_to(root).as_posix(), "size": stat.st_size,
                         "mtime_ns": stat.st_mtime_ns, "status": "rejected", "problems": [str(err)]}
            if entry["status"] == "ok":
                report.prepared.append(cid)
                manifest["audio_dim"] = manifest["audio_dim"] or _clip_audio_dim(out / entry["clip_file"])
            else:
                report.rejected[cid] = entry["problems"]
                log.warning("%s rejected: %s", video.name, "; ".join(entry["problems"]))
            for problem in entry["problems"] if entry["status"] == "ok" else ():
                log.warning("%s: %s", video.name, problem)
            manifest["clips"][cid] = entry
            _write_manifest(out, manifest)
        if callback is not None:
            callback(n + 1, len(found))
    _write_manifest(out, manifest)
    if other_labels:
        log.warning("%d clips were prepared earlier with other labels than %r (e.g. %s: %r) and are kept as they "
                    "are; prepare again with relabel=True (--relabel) to give them %s labels", len(other_labels),
                    label_mode, other_labels[0], _label_mode(manifest["clips"][other_labels[0]]), label_mode)
    log.info("prepared %d clips, skipped %d already prepared, rejected %d", len(report.prepared),
             len(report.skipped), len(report.rejected))
    return report


def _clip_audio_dim(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(f.get_slice("audio").get_shape()[1])


def add_clip(folder: str | os.PathLike, cid: str, motion: torch.Tensor, audio: torch.Tensor,
             controls: Mapping[str, torch.Tensor] | None = None, *, source: str | None = None,
             image_size: int = 512, landmarks: torch.Tensor | None = None) -> dict[str, Any]:
    """Add one clip of precomputed features to a prepared folder (created when missing); returns its entry.

    motion `[T, M]`, audio `[T, D]`, each control (`pose` `[T, 3]`, `cam` `[T, 3]`, `gaze` `[T, 2]`) and
    `landmarks` `[T, 68, 2]` ((x, y) pixels of the image_size² crops) count the same 25 fps frames. For latents
    and features made elsewhere (`import_reference_layout`, tests); the folder's motion and audio widths must
    agree across clips. The controls are recorded in the entry's `labels` as "given".
    """
    from safetensors.torch import save_file

    out = Path(folder)
    motion, audio = torch.as_tensor(motion, dtype=torch.float32), torch.as_tensor(audio, dtype=torch.float32)
    tensors = {"motion": motion, "audio": audio}
    for name, seq in (controls or {}).items():
        if name not in CONTROLS:
            raise InputError(f"unknown control {name!r}; use {', '.join(CONTROLS)}")
        tensors[name] = torch.as_tensor(seq, dtype=torch.float32)
    for name, t in tensors.items():
        width = CONTROLS.get(name)
        if t.dim() != 2 or t.shape[0] != motion.shape[0] or (width is not None and t.shape[1] != width):
            raise InputError(f"clip {cid}: {name} is {list(t.shape)}; every sequence must be [{motion.shape[0]}, "
                             f"{width or 'width'}] like motion")
    if landmarks is not None:
        points = torch.as_tensor(landmarks, dtype=torch.float32)
        if tuple(points.shape) != (motion.shape[0], LANDMARK_POINTS, 2) or not torch.isfinite(points).all():
            raise InputError(f"clip {cid}: landmarks is {list(points.shape)}; give [{motion.shape[0]}, "
                             f"{LANDMARK_POINTS}, 2] finite (x, y) pixels")
        tensors["landmarks"] = points
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "fps": FPS, "image_size": image_size, "crop_scale": None,
                    "frames_format": "none", "motion_dim": motion.shape[1], "audio_dim": None, "encoders": {},
                    "clips": {}}
    for key, width in (("motion_dim", motion.shape[1]), ("audio_dim", audio.shape[1])):
        if manifest.get(key) not in (None, width):
            raise InputError(f"clip {cid}: {key} {width} differs from the folder's {manifest[key]}")
        manifest[key] = width
    (out / "clips").mkdir(exist_ok=True)
    clip_file = out / "clips" / f"{cid}.safetensors"
    part = clip_file.with_name(clip_file.name + ".part")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(part))
    os.replace(part, clip_file)
    entry = {"source": source or cid, "status": "ok", "problems": [], "frames": motion.shape[0],
             "video_frames": motion.shape[0], "audio_frames": audio.shape[0], "source_fps": float(FPS),
             "controls": sorted(set(tensors) & set(CONTROLS)), "clip_file": clip_file.relative_to(out).as_posix(),
             "frames_file": None, "labels": {name: "given" for name in sorted(set(tensors) & set(CONTROLS))},
             "landmarks": landmarks is not None}
    manifest["clips"][cid] = entry
    _write_manifest(out, manifest)
    return entry


def import_reference_layout(source: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Convert data in the reference's training layout into a prepared folder; returns the clip ids added.

    The reference keeps, per clip stem: `motion/<stem>.pt` (tensor `[T, 32]`), `audio/<stem>.npy` (`[T, 768]`
    wav2vec2 features), `smirk/<stem>.pt` (`pose_params` `[T, 3]`, `cam` `[T, 3]`) and `gaze/<stem>.npy`
    (`[T, 2]`). As its loader does, every sequence is cut to the shortest; missing pose/cam/gaze files are
    allowed here. Files are read safely (`weights_only=True`, `allow_pickle=False`).
    """
    src = Path(source)
    motions = sorted((src / "motion").glob("*.pt"))
    if not motions:
        raise InputError(f"no motion/*.pt files under {src}; is it the reference's data layout?")
    added = []
    for motion_path in motions:
        stem = motion_path.stem
        audio_path = src / "audio" / f"{stem}.npy"
        if not audio_path.is_file():
            log.warning("%s has no audio/%s.npy; skipped", stem, stem)
            continue
        motion = torch.as_tensor(torch.load(motion_path, map_location="cpu", weights_only=True)).float()
        audio = torch.from_numpy(np.load(audio_path, allow_pickle=False)).float()
        controls = {}
        smirk_path = src / "smirk" / f"{stem}.pt"
        if smirk_path.is_file():
            smirk = torch.load(smirk_path, map_location="cpu", weights_only=True)
            controls["pose"], controls["cam"] = torch.as_tensor(smirk["pose_params"]), torch.as_tensor(smirk["cam"])
        gaze_path = src / "gaze" / f"{stem}.npy"
        if gaze_path.is_file():
            controls["gaze"] = torch.from_numpy(np.load(gaze_path, allow_pickle=False))
        length = min([motion.shape[0], audio.shape[0], *(c.shape[0] for c in controls.values())])
        add_clip(out, stem, motion[:length], audio[:length], {k: v[:length] for k, v in controls.items()},
                 source=motion_path.relative_to(src).as_posix())
        added.append(stem)
    log.info("imported %d clips from %s", len(added), src)
    return added


# --- training windows ----------------------------------------------------------------------------------------


def clip_ids(folder: str | os.PathLike, min_frames: int = 1) -> list[str]:
    """Ids of the usable clips of a prepared folder (status ok, at least `min_frames` frames), sorted."""
    manifest = read_manifest(folder)
    return sorted(cid for cid, e in manifest["clips"].items() if e.get("status") == "ok"
                  and e.get("frames", 0) >= min_frames)


class GeneratorWindows(torch.utils.data.Dataset):
    """Training windows of the motion generator from a prepared folder, one item per clip.

    An item (`dataset[SampleKey(clip, seed)]`, or `dataset[i]` with seed i) is a dict of float32 tensors over
    N = context + window consecutive frames starting at a uniformly random frame of the clip:
    "motion" `[N, 32]`, "audio" `[N, D]`, "pose" `[N, 3]`, "cam" `[N, 3]`, "gaze" `[N, 2]` (zeros for a clip
    without that control), "has_pose"/"has_cam"/"has_gaze" `[]` (1.0 or 0.0), and "reference" `[32]`, the
    motion of a uniformly random frame among the N (the reference's `m_ref`). The first `context` frames
    are the context the generator sees as the previous window. Clips shorter than N are left out (logged).
    """

    def __init__(self, folder: str | os.PathLike, window_frames: int = 50, context_frames: int = 10,
                 clips: Sequence[str] | None = None):
        self.folder = Path(folder)
        self.length = window_frames + context_frames
        manifest = read_manifest(self.folder)
        usable = clip_ids(self.folder, self.length)
        wanted = list(clips) if clips is not None else usable
        unknown = [c for c in wanted if c not in manifest["clips"]]
        if unknown:
            raise InputError(f"clips {unknown[:3]} are not in {self.folder / MANIFEST}")
        short = [c for c in wanted if c not in usable]
        if short:
            log.info("%d clips are rejected or shorter than %d frames and are left out (e.g. %s)", len(short),
                     self.length, short[0])
        self.clips = [c for c in wanted if c in usable]
        if not self.clips:
            raise InputError(f"no clip in {self.folder} has the {self.length} frames a training window needs")
        self.entries = [manifest["clips"][c] for c in self.clips]
        self.audio_dim = manifest.get("audio_dim")
        self.motion_dim = manifest.get("motion_dim")

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: SampleKey | int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        index, seed = (key.index, key.seed) if isinstance(key, SampleKey) else (int(key), int(key))
        entry = self.entries[index]
        rng = np.random.default_rng(seed)
        start = int(rng.integers(0, entry["frames"] - self.length + 1))
        span = slice(start, start + self.length)
        item: dict[str, torch.Tensor] = {}
        with safe_open(str(self.folder / entry["clip_file"]), "pt") as f:
            names = set(f.keys())
            item["motion"] = f.get_slice("motion")[span].float()
            item["audio"] = f.get_slice("audio")[span].float()
            for name, width in CONTROLS.items():
                present = name in names
                item[name] = f.get_slice(name)[span].float() if present else torch.zeros(self.length, width)
                item[f"has_{name}"] = torch.tensor(float(present))
        item["reference"] = item["motion"][int(rng.integers(0, self.length))].clone()
        return item


def iterate_windows(dataset: GeneratorWindows, count: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """`count` items of `dataset` with seeded keys, cycling over its clips (a fixed validation set)."""
    for i in range(count):
        yield dataset[SampleKey(i % len(dataset), seed + i)]
