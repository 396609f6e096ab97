"""feedtune: find how to feed a PyTorch image classifier."""

__version__ = "0.1.0"
