"""Data: sources, decoding, the embedded datasets, split, Dataset, cache, sampling, loader,
augmentation, and the pipeline that assembles them. Imports only ``feedtune.config``."""
