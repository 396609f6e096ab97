"""Map-style Dataset: decode one image, apply one transform. Batching and workers are the
DataLoader's job (see ``loader.py``); bad files were found before (``sources.prepare``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, get_worker_info

from feedtune.sources.imageio import BadImageError
from feedtune.sources.items import FILES, ItemReader

log = logging.getLogger(__name__)


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch ops on one thread inside the block (the previous count is restored).

    Per-sample transforms work on small tensors: on a shared 2-core machine torch's intra-op
    pool made them 3-15x slower in the main process (measured; workers already use 1 thread).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ImageDataset(Dataset):
    """Images listed in ``table`` (columns path, label) -> ``(tensor, class_index)``; each
    ``path`` is read through ``reader`` (the source's: files, Arrow rows, a user's Dataset).

    With ``on_bad_image='skip'`` a file that fails to decode at run time yields ``None``,
    which ``loader.collate_skipping_none`` drops; with ``'raise'`` the error names the file.
    ``max_pixels`` and ``max_bytes`` are ``decode_image``'s limits (None: its defaults), so a
    file that grew or changed after ``scan_images`` is still refused before it is decoded.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        classes: Sequence[str],
        transform: Callable[[np.ndarray], torch.Tensor] | None,
        *,
        decoder: str = "pil",
        on_bad_image: str = "skip",
        min_decode_size: int | None = None,
        max_pixels: int | None = None,
        max_bytes: int | None = None,
        reader: ItemReader = FILES,
    ) -> None:
        self.reader = reader
        self.paths: list[str] = [str(p) for p in table["path"]]
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(table["label"]) - set(index))
        if unknown:
            raise ValueError(f"labels not in the class list: {', '.join(map(str, unknown[:5]))}")
        # numpy arrays rather than Python lists: forked workers then share them copy-on-write.
        self.targets = np.array([index[x] for x in table["label"]], dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform
        self.decoder = decoder
        self.on_bad_image = on_bad_image
        self.min_decode_size = min_decode_size
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.cache = None  # set by cache.attach_cache for the decoded-image cache

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> np.ndarray:
        if self.cache is not None:
            return self.cache.get(index)
        return self.reader.decode(
            self.paths[index],
            backend=self.decoder,
            min_size=self.min_decode_size,
            max_pixels=self.max_pixels,
            max_bytes=self.max_bytes,
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        try:
            image = self.load_image(index)
        except BadImageError:
            if self.on_bad_image == "raise":
                raise
            log.warning("skipping bad image %s", self.paths[index])
            return None
        out = self.transform(image) if self.transform is not None else torch.from_numpy(image)
        return out, int(self.targets[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int] | None]:
        """One batch of samples (the DataLoader calls this when it exists). In the main process
        (``num_workers=0``) the transforms run on one torch thread, as they do in workers."""
        if get_worker_info() is not None:
            return [self[i] for i in indices]
        with single_torch_thread():
            return [self[i] for i in indices]
