"""The IMTalker flow-matching motion generator (paper §3.3) and its audio encoder."""
from .model import MotionGenerator

__all__ = ["MotionGenerator"]
