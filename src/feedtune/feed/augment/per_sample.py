"""Image transforms: ``build_transform`` turns an ``AugmentConfig`` into a callable.

Input: an RGB ``(H, W, 3)`` uint8 array from the decoder. Output: a float32 ``(3, S, S)`` tensor
normalised with ``cfg.mean``/``cfg.std``. The same policies exist for torchvision (v2, on uint8
tensors) and albumentations (on uint8 arrays); see ``augment.policies`` for what each contains.

Randomness: both libraries draw from torch's global RNG. torchvision does so natively; for
albumentations, whose ``Compose`` keeps its own generators that ignore global seeds, the first
step of the pipeline reseeds those generators from torch's RNG on every call. So seeding torch
(what a DataLoader does in every worker, differently per worker and per epoch) makes either
library reproducible, and forked workers never repeat each other's augmentations.
"""

from __future__ import annotations

import copy
import enum
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torchvision
import yaml
from torchvision.transforms import v2

from feedtune.config import AugmentConfig
from feedtune.feed.augment.albumentations_lazy import A
from feedtune.feed.augment.policies import AlbumentationsOps, TorchvisionOps, build_stages

Step = Callable[[Any], Any]

__all__ = ["Transform", "build_transform", "save_sample_grid"]


class _AlbumentationsStage:
    """Applies albumentations transforms to an array, outside ``Compose`` (one profiler step)."""

    def __init__(self, transforms: list[Any]):
        self.transforms = transforms

    def __call__(self, image: np.ndarray) -> Any:
        for t in self.transforms:
            image = t(image=image)["image"]
        return image


class _TorchvisionStage:
    """Applies torchvision transforms in order (one profiler step)."""

    def __init__(self, transforms: list[Any]):
        self.transforms = transforms

    def __call__(self, image: Any) -> Any:
        for t in self.transforms:
            image = t(image)
        return image


class _SeedFromTorch:
    """Reseeds the albumentations generators from two 63-bit draws of torch's global RNG.

    One numpy and one python generator are shared by every transform of the ``Compose``:
    albumentations' own ``set_random_seed`` would give each transform an identically seeded
    generator, which correlates their decisions (e.g. flip whenever the crop's first draw is
    small). The numpy state is set directly (~5 us) rather than through ``SeedSequence`` (~25 us).
    """

    def __init__(self, compose: A.Compose):
        self.compose = compose
        self.np_random = np.random.Generator(np.random.PCG64(0))
        self.py_random = random.Random(0)
        self._draw = torch.empty(2, dtype=torch.int64)

    def _share(self) -> None:
        # Every call, so a user's pipeline.set_random_seed() cannot detach the transforms.
        self.compose.set_random_state(self.np_random, self.py_random)

    def reseed(self, seed: int) -> None:
        self.np_random.bit_generator.state = np.random.PCG64(seed).state
        self.py_random.seed(seed)
        self._share()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        high, low = self._draw.random_().tolist()  # uniform in [0, 2**63)
        self.np_random.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": (high << 64) | low, "inc": _PCG_STREAM},
            "has_uint32": 0,
            "uinteger": 0,
        }
        self.py_random.seed(high ^ low)
        self._share()
        return image


# Any odd 128-bit constant: one PCG64 stream, entered at a torch-chosen 126-bit position.
_PCG_STREAM = 0xDA3E39CB94B95BDB_A9A4D3C5D5B8E1E5


class Transform:
    """A train or eval transform: ``transform(image) -> tensor``.

    Attributes:
        library, policy, train, magnitude, order, image_size: what was built.
        steps: ``(name, callable)`` stages in order; applying them in sequence *is* ``__call__``,
            so a profiler can time each one. The first albumentations step (``seed_rng``)
            reseeds albumentations from torch's RNG; torchvision's first (``to_image``) wraps
            the array as a tensor.
        pipeline: the library object: an ``A.Compose`` or a ``v2.Compose``.
    """

    def __init__(self, cfg: AugmentConfig, *, train: bool):
        if cfg.library not in ("torchvision", "albumentations"):
            raise ValueError(
                f"augment.library: got {cfg.library!r}, allowed: torchvision, albumentations"
            )
        self.cfg = copy.deepcopy(cfg)
        self.library = cfg.library
        self.policy = cfg.policy
        self.magnitude = cfg.magnitude
        self.order = cfg.order
        self.image_size = cfg.image_size
        self.train = train
        ops = TorchvisionOps() if cfg.library == "torchvision" else AlbumentationsOps()
        stages = build_stages(
            ops,
            policy=cfg.policy,
            magnitude=cfg.magnitude,
            order=cfg.order,
            image_size=cfg.image_size,
            mean=cfg.mean,
            std=cfg.std,
            train=train,
        )
        flat = [t for _, ts in stages for t in ts]
        self.steps: list[tuple[str, Step]] = []
        self._seeder: _SeedFromTorch | None = None
        if cfg.library == "torchvision":
            self.pipeline: Any = v2.Compose(flat)
            self.steps = [(name, _TorchvisionStage(ts)) for name, ts in stages]
        else:
            self.pipeline = A.Compose(flat)
            if train and cfg.policy != "none":  # deterministic pipelines need no RNG
                self._seeder = _SeedFromTorch(self.pipeline)
                self.steps.append(("seed_rng", self._seeder))
            self.steps += [(name, _AlbumentationsStage(ts)) for name, ts in stages]

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            got = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"expected an RGB (H, W, 3) uint8 array, got {got}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got {image.dtype}")
        x: Any = image
        for _, step in self.steps:
            x = step(x)
        return x

    def reseed(self, seed: int) -> None:
        """Seed the albumentations generators directly (no-op for torchvision).

        Not needed in a DataLoader ``worker_init_fn``: every call reseeds albumentations from
        torch's RNG, which the DataLoader already seeds per worker. Use it when driving
        ``pipeline`` (the ``A.Compose``) yourself.
        """
        if self._seeder is not None:
            self._seeder.reseed(seed)

    def to_dict(self) -> dict[str, Any]:
        """Serializable description: ``transform`` plus what it was built from.

        albumentations: ``A.to_dict(pipeline)`` (so ``A.from_dict`` rebuilds the pipeline);
        torchvision: ``{"name": "Compose", "transforms": [{"name", "params"}, ...]}``.
        """
        if self.library == "albumentations":
            described = A.to_dict(self.pipeline)
        else:
            described = {
                "__version__": torchvision.__version__,
                "transform": _describe_torchvision(self.pipeline),
            }
        meta = {
            "library": self.library,
            "policy": self.policy,
            "magnitude": self.magnitude,
            "order": self.order,
            "image_size": self.image_size,
            "mean": list(self.cfg.mean),
            "std": list(self.cfg.std),
            "train": self.train,
        }
        return _plain({**meta, **described})

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as YAML (albumentations files load with ``A.load(.., "yaml")``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def __repr__(self) -> str:
        names = ", ".join(name for name, _ in self.steps)
        return (
            f"Transform(library={self.library!r}, policy={self.policy!r}, "
            f"magnitude={self.magnitude}, order={self.order!r}, image_size={self.image_size}, "
            f"train={self.train}, steps=[{names}])"
        )


def build_transform(cfg: AugmentConfig, *, train: bool) -> Transform:
    """The train (random) or eval (deterministic) transform described by ``cfg``.

    Eval, and train with policy ``none``: resize the shorter side to ``round(S / 0.875)``, then
    centre-crop ``S x S``, identical in both libraries up to interpolation differences.
    """
    return Transform(cfg, train=train)


def _plain(value: Any) -> Any:
    """Plain YAML/JSON types: tuples -> lists, enums -> their value, other objects -> str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _describe_torchvision(t: Any) -> dict[str, Any]:
    """``{"name", "params"[, "transforms"]}`` from a transform's public attributes."""
    out: dict[str, Any] = {"name": type(t).__name__}
    params = {
        k: _plain(v)
        for k, v in vars(t).items()
        if not k.startswith("_") and k not in ("training", "transforms")
    }
    out["params"] = params
    children = getattr(t, "transforms", None)
    if children is not None:
        out["transforms"] = [_describe_torchvision(c) for c in children]
    return out


# Grid layout: one square cell per image, plus a title band; pixel size is exact (no tight bbox).
_CELL_PX, _TITLE_PX, _DPI = 120, 40, 100


def save_sample_grid(
    images: list[np.ndarray],
    transform: Transform,
    path: str | Path,
    *,
    n_augmentations: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """PNG grid: one row per source image, the original then ``n_augmentations`` outputs.

    Outputs are un-normalised with ``mean``/``std`` (default: the transform's). The file is
    ``(1 + n_augmentations) * 120`` px wide and ``len(images) * 120 + 40`` px tall.
    """
    from matplotlib.figure import Figure  # local: only this helper needs matplotlib

    mean_ = np.asarray(transform.cfg.mean if mean is None else mean, dtype=np.float32)
    std_ = np.asarray(transform.cfg.std if std is None else std, dtype=np.float32)
    rows, cols = len(images), 1 + n_augmentations
    width, height = cols * _CELL_PX, rows * _CELL_PX + _TITLE_PX
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    fig.suptitle(
        f"{transform.library} / {transform.policy} / magnitude {transform.magnitude:.2f}"
        f" / {transform.order}",
        fontsize=8,
    )
    top = 1 - _TITLE_PX / height
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.04)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, image in enumerate(images):
        scale = 2 * transform.image_size / max(image.shape[:2])
        shown = image
        if scale < 1:  # shrink big originals for display only
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            shown = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        axes[r][0].imshow(shown)
        for c in range(1, cols):
            out = transform(image).detach().cpu().numpy().transpose(1, 2, 0)
            axes[r][c].imshow(np.clip(out * std_ + mean_, 0.0, 1.0))
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0][0].set_title("original", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path
