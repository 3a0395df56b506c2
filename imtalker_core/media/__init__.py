"""Media I/O for IMTalker: images, face crops, audio and video (no ComfyUI imports).

* `images`: `load_image` (any Pillow image -> float32 [H, W, 3] in [0, 1]), `to_model_input`.
* `face`: Haar-cascade face detection, `crop_face`, `stable_video_box`, `paste_back`.
* `face_device`: the same crop and paste-back in torch on the tensor's device (`crop`, `paste` pick the path).
* `audio`: `load_audio` (soundfile, then PyAV), `to_mono_16k` (soxr), `frame_count`, `check_audio`.
* `video`: `read_video`, `video_info`, `VideoWriter` / `write_video` (H.264 MP4 + AAC via PyAV).
"""
from __future__ import annotations

from ..timing import frame_count
from .audio import check_audio, load_audio, to_mono_16k
from .face import (CropBox, box_around, center_box, crop_box, crop_face, detect_faces, paste_back,
                   paste_mask, stable_video_box)
from .images import load_image, to_float, to_model_input, to_uint8
from .video import OutputWriteError, VideoInfo, VideoWriter, read_video, video_info, write_video

__all__ = [
    "CropBox", "OutputWriteError", "VideoInfo", "VideoWriter", "box_around", "center_box", "check_audio",
    "crop_box", "crop_face", "detect_faces", "frame_count", "load_audio", "load_image", "paste_back",
    "paste_mask", "read_video", "stable_video_box", "to_float", "to_mono_16k", "to_model_input", "to_uint8",
    "video_info", "write_video",
]
