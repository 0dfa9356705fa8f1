"""dlm: a Diffusion-LM workbench (learned embeddings, learned rounding) on tiny_shakespeare."""

__version__ = "0.1.0"
