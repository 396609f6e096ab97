"""Augmentation: per-sample and batch policies, working squares, batch mixing."""
