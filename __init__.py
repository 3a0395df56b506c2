"""ComfyUI-IMTalker: talking-face video from one portrait and speech (or a driving video).

ComfyUI's entry point. Importing does no torch work and downloads nothing; the nodes package is
imported relatively because ComfyUI has its own top-level `nodes` module.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
