"""From images to device-ready batches: augmentation, cache, sampling, loaders, the Feed."""
