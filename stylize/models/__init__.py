"""The model stack: stock diffusers/transformers classes, loaded from real weights or built random."""

from .loading import ModelStack, load_stack

__all__ = ["ModelStack", "load_stack"]
