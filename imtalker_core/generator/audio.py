"""wav2vec2 audio features at the video frame rate, computed as the reference does.

The waveform (16 kHz mono) is normalised like `Wav2Vec2FeatureExtractor` (zero mean, unit
variance), padded by repeating its last sample to `T × 640` samples with `T = ceil(S·25/16000)`,
run through the convolutional feature encoder, and the CNN features are linearly interpolated
(align_corners=True) to T frames *before* the feature projection and the transformer. The output
is the transformer's last hidden state `[B, T, hidden]` (768 for wav2vec2-base-960h).

Long clips, with memory bounded for any length:
- The convolutional encoder runs in chunks of `cnn_chunk_frames` output frames. Its convolutions
  are local, and the first layer's GroupNorm (one statistic per channel over the whole clip) gets
  its statistics from a first pass over all chunks, so chunking changes nothing but the order of
  floating-point sums.
- The transformer's attention is quadratic in T, so above `window_frames` the projected features
  are encoded in overlapping windows and the centre of each window is kept. This is the only
  approximation; clips up to `window_frames` (60 s) are exactly the reference.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import timing
from ..errors import CheckpointError
from ..model_files import WAV2VEC2_FIX, MissingFilesError
from ..precision import model_fp32

log = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "preprocessor_config.json")
# Fields every wav2vec2 settings file written by transformers lists. Without the architecture fields
# transformers would build its default architecture and silently re-initialise what does not fit.
REQUIRED_FIELDS = {
    "config.json": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                    "conv_kernel", "conv_stride"),
    "preprocessor_config.json": ("sampling_rate",),
}
# transformers' preference when a folder holds both.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Entries of a full wav2vec2 checkpoint that belong to heads around the encoder (the official
# wav2vec2-base-960h is a `Wav2Vec2ForCTC`: its `lm_head`), or to pre-training only.
_HEAD_PREFIXES = ("lm_head.", "quantizer.", "project_q.", "project_hid.", "masked_spec_embed")


class AudioEncoder(nn.Module):
    """A stock `transformers.Wav2Vec2Model` (attribute `wav2vec2`) plus the reference's framing.

    Build it with `AudioEncoder.from_folder(path)`; a folder holds `config.json`,
    `preprocessor_config.json` and the weights (`pytorch_model.bin` or `model.safetensors`).
    `AudioEncoder.from_config(path)` reads only the two config files (weights loaded by the caller).
    """

    def __init__(self, wav2vec2: nn.Module, do_normalize: bool = True, sample_rate: int = timing.SAMPLE_RATE,
                 fps: int = timing.FPS):
        super().__init__()
        self.wav2vec2 = wav2vec2
        self.do_normalize = do_normalize
        self.sample_rate = sample_rate
        self.fps = fps

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, fps: int = 25) -> "AudioEncoder":
        """Load from a local Hugging Face folder only (never downloads).

        Every problem with the folder raises one line naming the file and the fix: a missing folder or
        file `MissingFilesError` (an `InputError`), a damaged one `CheckpointError` (unreadable JSON,
        missing architecture fields, truncated weights, weights that do not match `config.json`, NaN/inf
        weights).
        """
        from transformers import Wav2Vec2Model

        from ..checkpoints import check_finite

        folder, extractor = cls._folder_settings(folder)
        config = cls._config(folder)
        weights = _weights_file(folder)
        try:
            # Eager attention: every backend computes the same thing, and eager works on every device.
            # Mismatched shapes are collected (not raised by transformers) so that the error below names them.
            model, info = Wav2Vec2Model.from_pretrained(folder, config=config, local_files_only=True,
                                                        attn_implementation="eager", output_loading_info=True,
                                                        ignore_mismatched_sizes=True)
        except _weights_errors() as err:
            log.debug("%s: transformers could not read it: %s", weights, err)
            raise CheckpointError(f"{weights} is truncated or not a wav2vec2 weights file "
                                  f"({os.path.getsize(weights):,} bytes); {WAV2VEC2_FIX}") from err
        _check_loading_info(info, weights, os.path.join(folder, "config.json"))
        check_finite(dict(model.named_parameters()), weights, fix=WAV2VEC2_FIX)
        model.eval()
        return cls(model, do_normalize=extractor.do_normalize, sample_rate=extractor.sampling_rate, fps=fps)

    @classmethod
    def from_config(cls, folder: str | os.PathLike, fps: int = 25) -> "AudioEncoder":
        """The folder's architecture and audio settings only (`config.json`, `preprocessor_config.json`),
        with freshly initialised weights that the caller overwrites (e.g. with the generator file's
        wav2vec2 copy, `checkpoints.load_audio_encoder(..., weights=...)`). The folder's weights file
        is neither read nor needed. Folder problems raise as in `from_folder`."""
        from transformers import Wav2Vec2Model

        folder, extractor = cls._folder_settings(folder)
        config = cls._config(folder)
        try:
            model = Wav2Vec2Model._from_config(config, attn_implementation="eager")
        except (TypeError, ValueError) as err:  # values transformers accepted but no layer can be built from
            raise CheckpointError(f"{os.path.join(folder, 'config.json')} is not a usable wav2vec2 configuration "
                                  f"({_one_line(err)}); {WAV2VEC2_FIX}") from err
        model.eval()
        return cls(model, do_normalize=extractor.do_normalize, sample_rate=extractor.sampling_rate, fps=fps)

    @staticmethod
    def check_folder(folder: str | os.PathLike) -> str:
        """The folder path after checking that it exists and that its two settings files are complete JSON
        (cheap: no model is built); `MissingFilesError` or `CheckpointError` otherwise."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
            raise MissingFilesError(f"wav2vec2 folder {folder} {what}; {WAV2VEC2_FIX}")
        missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise MissingFilesError(f"wav2vec2 folder {folder} lacks {', '.join(missing)}; {WAV2VEC2_FIX}")
        for name, fields in REQUIRED_FIELDS.items():
            _read_settings(os.path.join(folder, name), fields)
        return folder

    @classmethod
    def _folder_settings(cls, folder: str | os.PathLike):
        """`(folder, Wav2Vec2FeatureExtractor)` after `check_folder`."""
        from transformers import Wav2Vec2FeatureExtractor

        folder = cls.check_folder(folder)
        path = os.path.join(folder, "preprocessor_config.json")
        try:
            return folder, Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
        except _settings_errors() as err:
            raise CheckpointError(f"{path} holds unusable audio settings ({_one_line(err)}); {WAV2VEC2_FIX}") from err

    @staticmethod
    def _config(folder: str):
        """The folder's `Wav2Vec2Config` (after `check_folder`)."""
        from transformers import Wav2Vec2Config

        try:
            return Wav2Vec2Config.from_pretrained(folder, local_files_only=True)
        except _settings_errors() as err:
            raise CheckpointError(f"{os.path.join(folder, 'config.json')} is not a usable wav2vec2 configuration "
                                  f"({_one_line(err)}); {WAV2VEC2_FIX}") from err

    @property
    def samples_per_frame(self) -> int:
        return timing.samples_per_frame(self.fps, self.sample_rate)

    def normalize(self, waveform: torch.Tensor) -> torch.Tensor:
        """Per-clip zero mean, unit variance over the last axis, as the feature extractor does.

        The statistics are taken in float64 on the CPU (MPS has no float64, and a device never
        needs it): only the `[B, 1]` mean and scale travel back to the waveform's device.
        """
        if not self.do_normalize:
            return waveform
        host = waveform.detach().to("cpu", torch.float64)
        mean = host.mean(dim=-1, keepdim=True)
        scale = torch.rsqrt(host.var(dim=-1, unbiased=False, keepdim=True) + 1e-7)
        if waveform.device.type == "cpu":
            return ((host - mean) * scale).float()
        return (waveform.float() - mean.float().to(waveform.device)) * scale.float().to(waveform.device)

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor, num_frames: int | None = None, window_frames: int | None = 1500,
                overlap_frames: int = 100, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Features `[B, T, hidden]` for 16 kHz mono audio `[B, S]` or `[S]` (raw, un-normalised).

        `num_frames` defaults to `ceil(S · fps / 16000)`. `window_frames=None` encodes the whole
        clip at once; otherwise clips longer than `window_frames` (default 60 s) are encoded in
        windows overlapping by `overlap_frames` on each side.
        """
        if waveform.dim() == 1:
            waveform = waveform[None]
        n = waveform.shape[-1]
        if n == 0:
            raise ValueError("the audio clip is empty (0 samples)")
        total = num_frames or timing.frame_count(n, self.fps, self.sample_rate)
        param = next(self.wav2vec2.parameters())
        x = self.normalize(waveform.float()).to(param)
        target = total * self.samples_per_frame
        if n < target:
            log.debug("padding %d audio samples to %d (%d frames) by repeating the last sample", n, target, total)
            x = F.pad(x[:, None], (0, target - n), mode="replicate")[:, 0]
        with model_fp32(self):  # fp32 weights on CUDA: true float32 unless TF32 was allowed for this model
            cnn = self._cnn_features(x).transpose(1, 2)  # [B, L, 512] at ~50 Hz
            cnn = F.interpolate(cnn.transpose(1, 2), size=total, mode="linear", align_corners=True).transpose(1, 2)
            hidden, _ = self.wav2vec2.feature_projection(cnn)
            if window_frames is None or total <= window_frames:
                return self._transformer(hidden)
            return self._windowed(hidden, window_frames, overlap_frames, callback)

    def _cnn_features(self, x: torch.Tensor, chunk_frames: int = 1500) -> torch.Tensor:
        """The convolutional feature encoder on `[B, S]` audio → `[B, C, L]`, in bounded memory."""
        encoder = self.wav2vec2.feature_extractor
        layers = list(encoder.conv_layers)
        convs = [layer.conv for layer in layers]
        hop, field, length = 1, 0, x.shape[-1]
        for conv in convs:
            k, s = conv.kernel_size[0], conv.stride[0]
            field += (k - 1) * hop
            hop *= s
            length = (length - k) // s + 1
        field += 1
        if length <= chunk_frames:
            return encoder(x)
        first = layers[0]
        norm = getattr(first, "layer_norm", None)
        global_norm = isinstance(norm, nn.GroupNorm)
        if global_norm:
            assert norm.num_groups == norm.num_channels, "wav2vec2 normalises each channel on its own"
            mean, inv_std = self._first_layer_stats(x, convs[0], norm.eps, chunk_frames * hop // convs[0].stride[0])
        out = []
        for a in range(0, length, chunk_frames):
            b = min(a + chunk_frames, length)
            h = x[:, None, hop * a: hop * (b - 1) + field]
            if global_norm:
                h = (convs[0](h) - mean) * inv_std
                h = first.activation(h * norm.weight[:, None] + norm.bias[:, None])
                rest = layers[1:]
            else:
                rest = layers
            for layer in rest:
                h = layer(h)
            assert h.shape[-1] == b - a, (h.shape, a, b)
            out.append(h)
        return torch.cat(out, dim=-1)

    @staticmethod
    def _first_layer_stats(x: torch.Tensor, conv: nn.Conv1d, eps: float, chunk: int):
        """Per-sample, per-channel mean and 1/std of the first conv's output over the whole clip.

        Each chunk's mean and sum of squared deviations are computed on the device (float32, no
        cancellation), then merged on the CPU in float64 (Chan et al.'s pairwise update), so no
        float64 tensor is ever created on the device.
        """
        k, s = conv.kernel_size[0], conv.stride[0]
        n = (x.shape[-1] - k) // s + 1
        count, mean, m2 = 0, None, None
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            h = conv(x[:, None, s * a: s * (b - 1) + k]).float()
            part_mean = h.mean(dim=-1)
            part_m2 = (h - part_mean[..., None]).pow(2).sum(dim=-1)
            part_mean, part_m2 = part_mean.to("cpu", torch.float64), part_m2.to("cpu", torch.float64)
            if mean is None:
                count, mean, m2 = b - a, part_mean, part_m2
                continue
            total = count + (b - a)
            delta = part_mean - mean
            mean = mean + delta * ((b - a) / total)
            m2 = m2 + part_m2 + delta.pow(2) * (count * (b - a) / total)
            count = total
        inv_std = torch.rsqrt(m2 / count + eps)
        return mean[..., None].to(x), inv_std[..., None].to(x)

    def _transformer(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.wav2vec2.encoder(hidden).last_hidden_state

    def _windowed(self, hidden: torch.Tensor, window: int, overlap: int,
                  callback: Callable[[int, int], None] | None) -> torch.Tensor:
        if not 0 <= 2 * overlap < window:
            raise ValueError(f"overlap_frames={overlap} must be below half of window_frames={window}")
        total = hidden.shape[1]
        core = window - 2 * overlap
        n_windows = math.ceil(total / core)
        log.info("encoding %d audio frames in %d windows of %d (overlap %d)", total, n_windows, window, overlap)
        out = []
        for i in range(n_windows):
            start, stop = i * core, min((i + 1) * core, total)
            lo, hi = max(0, start - overlap), min(total, stop + overlap)
            enc = self._transformer(hidden[:, lo:hi])
            out.append(enc[:, start - lo:stop - lo])
            if callback is not None:
                callback(i + 1, n_windows)
        return torch.cat(out, dim=1)


def _one_line(err: BaseException) -> str:
    """`err`'s text on one line, shortened (transformers' messages span lines)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _read_settings(path: str, fields: tuple[str, ...]) -> dict:
    """The JSON object in `path`; `CheckpointError` if it is not one or lacks any of `fields`."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({_one_line(err)}); {WAV2VEC2_FIX}") from err
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path} holds a JSON {type(settings).__name__}, not an object of settings; "
                              f"{WAV2VEC2_FIX}")
    missing = [k for k in fields if k not in settings]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} (an incomplete wav2vec2 configuration); "
                              f"{WAV2VEC2_FIX}")
    return settings


def _weights_file(folder: str) -> str:
    """The weights file transformers reads from `folder`; `MissingFilesError` when there is none."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise MissingFilesError(f"wav2vec2 folder {folder} has no weights ({' or '.join(WEIGHT_FILES)}); {WAV2VEC2_FIX}")


def _settings_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for unusable settings files: OSError (unreadable JSON), ValueError and
    TypeError (values of the wrong kind), and huggingface_hub's strict-dataclass validation errors."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError, KeyError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: no strict dataclasses, transformers raises the above
        return errors
    return errors + (StrictDataclassError,)


def _weights_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a truncated or foreign weights file: safetensors' header errors,
    torch.load's (EOFError, RuntimeError from the zip reader, UnpicklingError) and OSError."""
    import pickle

    from safetensors import SafetensorError

    return (SafetensorError, OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError)


def _check_loading_info(info: dict, weights: str, config: str) -> None:
    """`CheckpointError` when the weights transformers read do not cover the architecture of `config`:
    transformers would only warn and leave those parameters randomly initialised."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(_HEAD_PREFIXES))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(_HEAD_PREFIXES))
    mismatched = sorted(k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys", ()))
    parts = [f"{len(keys)} {label} (e.g. {', '.join(keys[:2])})"
             for label, keys in (("missing", missing), ("with another shape", mismatched),
                                 ("unexpected", unexpected)) if keys]
    if parts:
        raise CheckpointError(f"{weights} does not match the architecture in {config}: {'; '.join(parts)}; "
                              f"{WAV2VEC2_FIX}")
