"""``feedtune best --emit python``: a configuration's data feeding as a standalone script.

The script needs only torch, torchvision, numpy and pillow (plus albumentations and OpenCV when
that library is chosen), so tuned settings can be pasted into any training code without
depending on feedtune. Its transforms are not a second description of the policies: the ops
classes of ``augment_policies`` run with their library names (``A``, ``v2``, ``cv2``, ...)
bound to recorders, and ``build_stages`` lays the recorded calls out. The script therefore holds
the very constructor calls, arguments and order feedtune trains with, and stays so when the
policies change. Batch mixing (``augment.mix``) is recorded the same way from ``build_mix``.

A run trained under torchrun (``world_size`` > 1) gets each process's share of every epoch:
``DistributedSampler``, or for the weighted sampler feedtune's ``DistributedWeightedSampler``
written out in the script (PyTorch has none).
"""

from __future__ import annotations

import json
import textwrap
import types
from typing import Any, NamedTuple, cast

from feedtune.config import Config, ConfigError, parse_override, with_overrides
from feedtune.feed import loader
from feedtune.feed.augment import mixing
from feedtune.feed.augment import policies as ap
from feedtune.feed.geometry import working_size
from feedtune.tuning.space import inert_settings

__all__ = ["config_from_params", "feeding_snippet", "snippet_from_params"]

_WIDTH = 99  # an emitted line plus its trailing comma stays within ruff's 100


class _Call(NamedTuple):
    """A recorded call: printed on one line when it fits, else one argument per line."""

    func: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Code:
    """Source text, e.g. a library object's name: attributes extend it, calls are recorded."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> _Code:
        return _Code(f"{self.name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> _Call:
        return _Call(self.name, args, kwargs)


# augment_policies' globals that build transforms, and the names the script gives them.
_LIBRARY_NAMES = {
    "A": _Code("A"),
    "v2": _Code("v2"),
    "cv2": _Code("cv2"),
    "torch": _Code("torch"),
    "ToTensorV2": _Code("ToTensorV2"),
    "InterpolationMode": _Code("v2.InterpolationMode"),
    "NumpyToImage": _Code("v2.ToImage"),  # the same HWC array -> CHW uint8 tensor step
    "TrivialAugmentWideUpTo": _Code("TrivialAugmentWideUpTo"),  # defined in the script
}


def _recorder(cls: type, **attributes: Any) -> Any:
    """An instance of ``cls`` whose methods see ``_LIBRARY_NAMES`` instead of the libraries.

    ``attributes`` replace class attributes evaluated at import (real library objects).
    """
    scope = {**vars(ap), **_LIBRARY_NAMES}
    namespace: dict[str, Any] = dict(attributes)
    methods = {k: v for c in reversed(cls.__mro__) for k, v in vars(c).items()}
    for name, value in methods.items():
        if isinstance(value, types.FunctionType):
            fn = types.FunctionType(
                value.__code__, scope, value.__name__, value.__defaults__, value.__closure__
            )
            fn.__kwdefaults__ = value.__kwdefaults__
            namespace[name] = fn
    return type(f"{cls.__name__}Recorder", (), namespace)()


def _wrap(opening: str, items: list[str], closing: str, indent: int, column: int) -> str:
    """``items`` on one line if it ends by ``_WIDTH``, else one per line (ruff's layout)."""
    flat = opening + ", ".join(items) + closing
    if "\n" not in flat and column + len(flat) <= _WIDTH:
        return flat
    pad = " " * (indent + 4)
    closing = closing.lstrip(",")  # a wrapped 1-tuple already ends in a trailing comma
    return f"{opening}\n" + "".join(f"{pad}{item},\n" for item in items) + " " * indent + closing


def _lit(value: Any, indent: int = 0, column: int | None = None) -> str:
    """Python source for ``value`` starting at ``column`` of a line indented by ``indent``.

    Floats keep their exact repr, so the script's parameters are feedtune's to the last bit.
    """
    column = indent if column is None else column
    inner = indent + 4

    def items(pairs: list[tuple[str, Any]]) -> list[str]:
        # Each item is measured as if on its own line (where it lands when the call wraps).
        return [f"{lead}{_lit(v, inner, inner + len(lead))}" for lead, v in pairs]

    if isinstance(value, _Call):
        pairs = [("", a) for a in value.args] + [(f"{k}=", v) for k, v in value.kwargs.items()]
        return _wrap(f"{value.func}(", items(pairs), ")", indent, column)
    if isinstance(value, _Code):
        return value.name
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        pairs = [(f"{_lit(k)}: ", v) for k, v in value.items()]
        return _wrap("{", items(pairs), "}", indent, column)
    if isinstance(value, list):
        return _wrap("[", items([("", v) for v in value]), "]", indent, column)
    if isinstance(value, tuple):
        closing = ",)" if len(value) == 1 else ")"
        return _wrap("(", items([("", v) for v in value]), closing, indent, column)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    # A library object the recorders did not intercept: its repr is not source.
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as source")


_TRIVIAL_CLASS = textwrap.dedent(
    '''
    class TrivialAugmentWideUpTo(v2.TrivialAugmentWide):
        """TrivialAugmentWide whose magnitude bin is drawn from 0..max_bin only: the same
        magnitudes, capped, as torchvision's version has no strength setting."""

        _AUGMENTATION_SPACE = {{  # each op's first n magnitudes of its {b}-bin table
            op: (lambda n, h, w, f=f: None if f({b}, h, w) is None else f({b}, h, w)[:n], s)
            for op, (f, s) in v2.TrivialAugmentWide._AUGMENTATION_SPACE.items()
        }}

        def __init__(self, max_bin, num_magnitude_bins={b}, **kwargs):
            if num_magnitude_bins != {b}:
                raise ValueError("the magnitude tables above have {b} bins")
            super().__init__(num_magnitude_bins=max_bin + 1, **kwargs)
    '''
).format(b=ap.AUTOAUG_BINS)


def _compose(name: str, cfg: Config, *, train: bool) -> str:
    a = cfg.augment
    ops = (
        _recorder(ap.TorchvisionOps, bilinear=_Code("v2.InterpolationMode.BILINEAR"))
        if a.library == "torchvision"
        else _recorder(ap.AlbumentationsOps)
    )
    keys = ("policy", "magnitude", "order", "image_size", "mean", "std")
    stages = ap.build_stages(cast(Any, ops), train=train, **{k: getattr(a, k) for k in keys})
    compose = _Code("v2" if a.library == "torchvision" else "A").Compose
    pipeline = compose([t for _, ts in stages for t in ts])
    return f"{name} = {_lit(pipeline, 0, len(name) + 3)}\n"


# Speed settings of feedtune's own loader, with their plain values: the script feeds the same
# data without them (a cache shared by workers; augmenting whole batches on the device).
_SPEED_ONLY = {"loader.cache": "none", "augment.where": "sample", "loader.cache_limit_mb": None}


def _header(cfg: Config, *, world_size: int) -> str:
    """Comment naming the settings the script reproduces (inert ones left out)."""
    values = cfg.flat()
    # cuda=True keeps pin_memory, which the script applies when the user has a GPU; the script
    # augments per sample, where the library always matters.
    inert = inert_settings({**values, "augment.where": "sample"}, cuda=True) | set(_SPEED_ONLY)
    if cfg.augment.mix == "none":
        inert.add("augment.mix")  # the plain value: nothing to reproduce, nothing to show
    shown = [
        f"{k}={'null' if v is None else str(v).replace(' ', '')}"
        for k, v in values.items()
        if (k == "seed" or k.split(".")[0] in ("augment", "sampler", "loader")) and k not in inert
    ]
    skipped = [
        f"{k}={values[k]}"
        for k, plain in _SPEED_ONLY.items()
        if plain is not None and values.get(k, plain) != plain
    ]
    libs = "torch, torchvision, numpy, pillow"
    if cfg.augment.library == "albumentations":
        libs += ", albumentations, opencv-python"
    intro = f"Data feeding tuned with feedtune, standalone: needs only {libs}."
    lines = [intro, "Reproduces: " + "  ".join(shown)]
    if world_size > 1:
        share = (
            "DistributedWeightedSampler" if cfg.sampler.kind == "weighted" else "DistributedSampler"
        )
        lines.append(
            f"Trained under torchrun on {world_size} processes: each loads its share of every "
            f"epoch ({share}), batch_size is per process."
        )
    if skipped:
        lines.append(f"Not reproduced (speed settings of feedtune's loader): {', '.join(skipped)}")
    wrapped = [
        textwrap.fill(
            line, _WIDTH, initial_indent="# ", subsequent_indent="#   ", break_on_hyphens=False
        )
        for line in lines
    ]
    return "\n".join(wrapped) + "\n"


def _imports(cfg: Config, *, workers: bool, world_size: int) -> str:
    albumentations = cfg.augment.library == "albumentations"
    mixed = cfg.augment.mix != "none"
    weighted = cfg.sampler.kind == "weighted"
    stdlib = ["import os"] if world_size > 1 else []
    stdlib += ["import random"] if workers and albumentations else []
    lines = [*stdlib, ""] if stdlib else []
    if albumentations:
        lines += ["import albumentations as A", "import cv2"]
    lines += ["import numpy as np", "import torch"]
    if albumentations:
        lines.append("from albumentations.pytorch import ToTensorV2")
    lines.append("from PIL import Image, ImageOps")
    wanted = {
        "DataLoader": True,
        "Dataset": True,
        "DistributedSampler": world_size > 1 and not weighted,
        "Sampler": world_size > 1 and weighted,  # the base of DistributedWeightedSampler
        "WeightedRandomSampler": world_size <= 1 and weighted,
        "default_collate": mixed,
    }
    lines.append(f"from torch.utils.data import {', '.join(k for k, v in wanted.items() if v)}")
    if not albumentations or mixed:
        lines.append("from torchvision.transforms import v2")
    return "\n".join(lines) + "\n"


def _dataset(cfg: Config) -> str:
    size = working_size(cfg.augment.image_size)
    apply = "transform(image)"
    if cfg.augment.library == "albumentations":
        apply = 'transform(image=image)["image"]'
    return textwrap.dedent(f'''
        class ImageDataset(Dataset):
            """Image files and integer labels -> (transformed image tensor, label)."""

            def __init__(self, paths, labels, transform):
                self.paths, self.labels, self.transform = list(paths), list(labels), transform

            def __len__(self):
                return len(self.paths)

            def __getitem__(self, index):
                with Image.open(self.paths[index]) as im:
                    im.draft(im.mode, ({size}, {size}))  # large JPEGs: decode at 1/2-1/8 scale
                    image = np.array(ImageOps.exif_transpose(im).convert("RGB"))
                return self.{apply}, int(self.labels[index])
        ''')


def _seed_worker(cfg: Config) -> str:
    lines = [
        "def seed_worker(worker_id):",
        '    """One torch thread per worker: the workers already share the cores."""',
        "    torch.set_num_threads(1)",
    ]
    if cfg.augment.library == "albumentations":
        lines += [
            "    cv2.setNumThreads(0)",
            "    # Forked copies of one albumentations generator would repeat each other.",
            "    seed = torch.initial_seed()",
            "    transform = torch.utils.data.get_worker_info().dataset.transform",
            "    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))",
        ]
    return "\n".join(lines) + "\n"


def _recorded_mix(cfg: Config) -> _Call:
    """``build_mix``'s call with ``v2`` bound to a recorder, for a class count ``num_classes``."""
    scope = {**vars(mixing), "v2": _Code("v2")}
    fn = mixing.build_mix
    build = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    return cast(_Call, build(cfg.augment, num_classes=_Code("num_classes")))


def _mix_collate(cfg: Config) -> str:
    head = textwrap.dedent('''
        class MixCollate:
            """collate_fn of the training loader: collates the samples (skipping any that came
            back None, as feedtune's loader does), then mixes the batch, whose labels become soft
            targets [B, num_classes]. Validation stays unmixed (a plain DataLoader, integer
            labels). A class, not a closure, so that workers started by spawn can unpickle it."""

            def __init__(self, num_classes):
        ''').lstrip("\n")
    lead = "        self.mix = "
    tail = textwrap.dedent("""
        def __call__(self, batch):
            batch = [sample for sample in batch if sample is not None]
            if not batch:
                return None
            return self.mix(*default_collate(batch))
        """)
    return (
        head + lead + _lit(_recorded_mix(cfg), 8, len(lead)) + "\n" + textwrap.indent(tail, "    ")
    )


_RANK = textwrap.dedent('''
    def rank_and_world_size():
        """This process's rank and the number of processes: from torch.distributed once it is
        initialised, else from the RANK and WORLD_SIZE that torchrun sets."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ''')


# feedtune.feed.sampling.DistributedWeightedSampler, plus the per-epoch reseeding that
# feedtune's trainer does for it (generator 0: seed * 1_000_003 + epoch * 97).
_DISTRIBUTED_WEIGHTED = textwrap.dedent('''
    class DistributedWeightedSampler(Sampler):
        """This process's share of one class-weighted draw made alike on every process: each
        keeps every num_replicas-th index from its rank, the draw padded with its own first
        indices to equal shares, so together they see the draw that one process would."""

        def __init__(self, weights, num_samples, replacement, seed, rank, num_replicas):
            self.weights, self.num_samples, self.replacement = weights, num_samples, replacement
            self.seed, self.rank, self.num_replicas = seed, rank, num_replicas
            self.generator = torch.Generator().manual_seed(seed)

        def set_epoch(self, epoch):
            """Reseed the draw, alike on every process, as feedtune does before each epoch."""
            self.generator.manual_seed(self.seed * 1_000_003 + epoch * 97)

        def __len__(self):
            return -(-self.num_samples // self.num_replicas)

        def __iter__(self):
            drawn = torch.multinomial(
                self.weights, self.num_samples, self.replacement, generator=self.generator
            ).tolist()
            drawn += drawn[: len(self) * self.num_replicas - len(drawn)]
            return iter(drawn[self.rank :: self.num_replicas])
    ''')


def _make_loader(cfg: Config, *, world_size: int) -> str:
    s = cfg.sampler
    distributed = world_size > 1
    mixed = cfg.augment.mix != "none"
    lines = [
        f"def make_loader(paths, labels{', num_classes=None' if mixed else ''}):",
        '    """The training DataLoader over your files, fed as in the tuned run."""',
    ]
    if distributed:
        lines += [
            "    rank, world_size = rank_and_world_size()",
            f"    generator = torch.Generator().manual_seed({cfg.seed} + rank)  "
            "# workers' seeds, per process",
        ]
    else:
        lines.append(f"    generator = torch.Generator().manual_seed({cfg.seed})")
    kwargs: dict[str, Any] = {}
    dataset = _Code("ImageDataset(paths, labels, train_transform)")
    epochs = ["    # torchrun: this process's share of every epoch."]
    if s.kind != "sequential":
        epochs = [
            "    # torchrun: this process's share of every epoch. Call "
            "loader.sampler.set_epoch(epoch)",
            "    # before each epoch (as feedtune does), or every epoch repeats the first one's "
            "draw.",
        ]
    if s.kind == "weighted":
        num = "len(labels)" if s.num_samples is None else str(s.num_samples)
        lines += [
            "    labels = np.asarray(labels)",
            "    # Per-sample weight count(label) ** -weight_power (0: random, 1: class-balanced).",
            f"    weights = np.bincount(labels)[labels].astype(np.float64) ** {-s.weight_power!r}",
        ]
        if distributed:
            sampler = _Code("DistributedWeightedSampler")(
                _Code("torch.as_tensor(weights)"),
                num_samples=_Code(num),
                replacement=s.replacement,
                seed=cfg.seed,
                rank=_Code("rank"),
                num_replicas=_Code("world_size"),
            )
            lines += [*epochs, f"    sampler = {_lit(sampler, 4, 14)}"]
        else:
            lines += [
                "    sampler = WeightedRandomSampler(",
                f"        torch.as_tensor(weights), num_samples={num}, "
                f"replacement={s.replacement}, generator=generator",
                "    )",
            ]
        kwargs["sampler"] = _Code("sampler")
    elif distributed:
        sampler = _Code("DistributedSampler")(
            _Code("train_set"),
            num_replicas=_Code("world_size"),
            rank=_Code("rank"),
            shuffle=s.kind == "random",
            seed=cfg.seed,
        )
        lines += [
            f"    train_set = {_lit(dataset, 4, 16)}",
            *epochs,
            f"    sampler = {_lit(sampler, 4, 14)}",
        ]
        dataset = _Code("train_set")
        kwargs["sampler"] = _Code("sampler")
    else:
        kwargs["shuffle"] = s.kind == "random"
    kwargs["generator"] = _Code("generator")
    cpu = loader.loader_kwargs(cfg.loader, cuda=False)
    for key, value in loader.loader_kwargs(cfg.loader, cuda=True).items():
        differs = key == "pin_memory" or cpu.get(key) != value
        kwargs[key] = _Code(f"torch.cuda.is_available() and {value!r}") if differs else value
    if mixed:
        lines += [
            "    # Mixed batches: soft targets [B, num_classes], for labels 0 .. num_classes - 1.",
            "    num_classes = int(np.max(labels)) + 1 if num_classes is None else num_classes",
        ]
        kwargs["collate_fn"] = _Code("MixCollate(num_classes)")
    if cfg.loader.num_workers > 0:
        kwargs["worker_init_fn"] = _Code("seed_worker")
    if distributed:
        batch = cfg.loader.batch_size
        lines.append(
            f"    # batch_size is per process: {world_size} processes take {world_size} x {batch} "
            "images a step."
        )
    lines.append(f"    return {_lit(_Code('DataLoader')(dataset, **kwargs), 4)}")
    return "\n".join(lines) + "\n"


_MAIN = """
if __name__ == "__main__":
    paths, labels = [], []  # your image files and integer labels (0 .. n_classes - 1)
    if paths:
        images, targets = next(iter(make_loader(paths, labels)))
        print(f"one batch: {tuple(images.shape)} {images.dtype}, labels {targets.tolist()}")
    else:
        print("Fill in paths and labels, then run again.")
"""


def feeding_snippet(cfg: Config, world_size: int = 1) -> str:
    """Standalone PyTorch source that feeds images as ``cfg`` does (see the module docstring),
    in each of ``world_size`` processes when the run was trained under torchrun.

    The script defines ``train_transform``, ``eval_transform``, ``ImageDataset`` and
    ``make_loader(paths, labels)`` (``MixCollate`` and a ``num_classes=None`` argument with a
    mix); run as printed it only asks for its placeholders.
    """
    train = _compose("train_transform", cfg, train=True)
    evaluation = _compose("eval_transform", cfg, train=False)
    workers = cfg.loader.num_workers > 0
    trivial = "TrivialAugmentWideUpTo(" in train
    distributed = world_size > 1
    imports = _imports(cfg, workers=workers, world_size=world_size)
    # isort's layout: one blank line after the imports, two when a definition follows.
    head = _header(cfg, world_size=world_size) + "\n" + imports + ("\n\n" if trivial else "\n")
    parts = [
        _TRIVIAL_CLASS if trivial else "",
        train,
        "# Validation images: no randomness, same size and normalisation.\n" + evaluation,
        _dataset(cfg),
        _mix_collate(cfg) if cfg.augment.mix != "none" else "",
        _RANK if distributed else "",
        _DISTRIBUTED_WEIGHTED if distributed and cfg.sampler.kind == "weighted" else "",
        _seed_worker(cfg) if workers else "",
        _make_loader(cfg, world_size=world_size),
        _MAIN,
    ]
    return head + "\n\n\n".join(p.strip("\n") for p in parts if p) + "\n"


def config_from_params(params: dict[str, str]) -> Config:
    """The Config behind an MLflow run's flat params (dotted keys, values as logged strings).

    Keys that are not settings (tags-like extras, keys of other versions) are skipped. A value
    is read as YAML, like ``--set``; a string setting whose text YAML reads as another type
    (an experiment named ``2024``) falls back to the text itself.
    """
    cfg = Config()
    settable = set(cfg.flat())
    for key in sorted(params):
        if key not in settable:
            continue
        raw = params[key]
        _, value = parse_override(f"{key}={raw}")
        try:
            cfg = with_overrides(cfg, {key: value})
        except ConfigError:
            if value == raw:
                raise
            cfg = with_overrides(cfg, {key: raw})
    return cfg


def snippet_from_params(params: dict[str, str], *, world_size: int = 1) -> str:
    """``feeding_snippet`` of the configuration an MLflow run logged as params; ``world_size``:
    the processes it trained on (its ``feedtune.world_size`` tag)."""
    return feeding_snippet(config_from_params(params), world_size=world_size)
