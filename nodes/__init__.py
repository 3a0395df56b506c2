"""The IMTalker ComfyUI nodes (classic node API).

Import relatively only: ComfyUI has a top-level module named `nodes` too.
"""
from __future__ import annotations

from . import bridge, examples
from .controls import (IMTalkerCombineControls, IMTalkerControlsConstant, IMTalkerControlsKeyframes,
                       IMTalkerIdleMotion, IMTalkerLoadControls, IMTalkerSaveControls)
from .encode import IMTalkerEncodeIdentity, IMTalkerEncodeMotion
from .face import IMTalkerCropFace, IMTalkerPasteBack
from .generate import IMTalkerAudioToMotion
from .landmark_controls import LANDMARK_CONTROL_DISPLAY_NAMES, LANDMARK_CONTROL_NODES
from .loaders import IMTalkerLoadGenerator, IMTalkerLoadRenderer
from .motion_edit import MOTION_EDIT_DISPLAY_NAMES, MOTION_EDIT_NODES
from .render import IMTalkerRender, IMTalkerRenderToVideo
from .video import IMTalkerVideoToMotion
from .talking_head import IMTalkerTalkingHead

NODE_CLASS_MAPPINGS = {
    "IMTalkerLoadRenderer": IMTalkerLoadRenderer,
    "IMTalkerLoadGenerator": IMTalkerLoadGenerator,
    "IMTalkerCropFace": IMTalkerCropFace,
    "IMTalkerPasteBack": IMTalkerPasteBack,
    "IMTalkerEncodeIdentity": IMTalkerEncodeIdentity,
    "IMTalkerEncodeMotion": IMTalkerEncodeMotion,
    "IMTalkerVideoToMotion": IMTalkerVideoToMotion,
    "IMTalkerAudioToMotion": IMTalkerAudioToMotion,
    "IMTalkerRender": IMTalkerRender,
    "IMTalkerRenderToVideo": IMTalkerRenderToVideo,
    "IMTalkerTalkingHead": IMTalkerTalkingHead,
    "IMTalkerControlsConstant": IMTalkerControlsConstant,
    "IMTalkerControlsKeyframes": IMTalkerControlsKeyframes,
    "IMTalkerIdleMotion": IMTalkerIdleMotion,
    "IMTalkerLoadControls": IMTalkerLoadControls,
    "IMTalkerSaveControls": IMTalkerSaveControls,
    "IMTalkerCombineControls": IMTalkerCombineControls,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "IMTalkerLoadRenderer": "IMTalker Load Renderer",
    "IMTalkerLoadGenerator": "IMTalker Load Generator",
    "IMTalkerCropFace": "IMTalker Crop Face",
    "IMTalkerPasteBack": "IMTalker Paste Back",
    "IMTalkerEncodeIdentity": "IMTalker Encode Identity",
    "IMTalkerEncodeMotion": "IMTalker Encode Motion (video)",
    "IMTalkerVideoToMotion": "IMTalker Video To Motion",
    "IMTalkerAudioToMotion": "IMTalker Audio To Motion",
    "IMTalkerRender": "IMTalker Render",
    "IMTalkerRenderToVideo": "IMTalker Render To Video",
    "IMTalkerTalkingHead": "IMTalker Talking Head",
    "IMTalkerControlsConstant": "IMTalker Controls (constant)",
    "IMTalkerControlsKeyframes": "IMTalker Controls (keyframes)",
    "IMTalkerIdleMotion": "IMTalker Idle Motion",
    "IMTalkerLoadControls": "IMTalker Load Controls",
    "IMTalkerSaveControls": "IMTalker Save Controls",
    "IMTalkerCombineControls": "IMTalker Combine Controls",
}

NODE_CLASS_MAPPINGS.update(MOTION_EDIT_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(MOTION_EDIT_DISPLAY_NAMES)
NODE_CLASS_MAPPINGS.update(LANDMARK_CONTROL_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(LANDMARK_CONTROL_DISPLAY_NAMES)

if bridge.inside_comfyui():
    # Before any INPUT_TYPES call, so the dropdowns list models/imtalker (and extra_model_paths.yaml).
    bridge.register_model_folder()
    # The templates' example inputs, into input/imtalker_examples/ (missing files only; never fails the pack).
    examples.install_examples(bridge.input_directory())

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
