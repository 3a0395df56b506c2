"""The IMTalker renderer (paper §3.2): one module per box of the paper's figure."""
from .model import IMTRenderer, SourceCache

__all__ = ["IMTRenderer", "SourceCache"]
