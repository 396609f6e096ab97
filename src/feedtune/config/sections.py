"""The configuration's sections: one dataclass per concern, defaults with their reasons.

Files in ``experiments/`` hold only what differs from these defaults.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from feedtune.config.naming import experiment_for


def _project_root() -> Path:
    """The checkout (where MLproject lives) when run from it, else the current directory."""
    if os.environ.get("FEEDTUNE_HOME"):
        return Path(os.environ["FEEDTUNE_HOME"]).resolve()
    repo = Path(__file__).resolve().parents[3]
    return repo if (repo / "MLproject").is_file() else Path.cwd()


PROJECT_ROOT = _project_root()
# The default config files ship in the package (config/defaults/: links to the checkout's
# experiments/ files, copied into the wheel), so an installed feedtune has the same search
# space as the checkout. A project's own experiments/<file> comes first.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "defaults"


def default_config_path(name: str) -> Path:
    """``experiments/<name>`` of the project folder if there is one, else feedtune's own."""
    local = PROJECT_ROOT / "experiments" / name
    return local if local.is_file() else PACKAGED_CONFIGS / name


DEFAULT_CONFIG_PATH = default_config_path("default.yaml")
DEFAULT_FINETUNE_CONFIG_PATH = default_config_path("finetune-shapes-shift.yaml")
# The experiment (and registered model name) of the embedded dataset's runs; other data's
# runs go to feedtune-<data> (``naming.experiment_for``).
DEFAULT_EXPERIMENT = experiment_for(None, "shapes")


# A value of ``model.kwargs``: plain YAML scalars or a list of them. ``str`` comes first so a
# string stays a string (the float check would read "1e-3" as a number).
KwargValue = str | bool | int | float | list[str | bool | int | float] | None


class ConfigError(ValueError):
    """A configuration key, type or value that cannot be used; the message names the key."""


def _limits(minimum: float | None = None, maximum: float | None = None, **extra: Any) -> dict:
    return {"min": minimum, "max": maximum, **extra}


# Settings whose ``auto`` value each run replaces with the fastest safe one (``feed.auto``).
AUTO = "auto"
AUTO_SETTINGS = ("loader.cache", "augment.where")


@dataclass
class DataConfig:
    # Embedded dataset written to data/<name>/ when `path` is unset (see `feedtune data`).
    name: Literal["shapes", "shapes-shift"] = "shapes"
    # Your own images: an ImageFolder tree (class/xxx.jpg), a CSV manifest path,label[,group],
    # a Hugging Face dataset saved to disk or a folder of parquet/arrow files (pip install
    # "feedtune[hf]"), or module.path:callable returning a torch Dataset of (image, label).
    path: str | None = None
    # Columns of a Hugging Face dataset or parquet/arrow folder (ignored by other sources):
    # the encoded images, the labels (ClassLabel names become the classes) and, optionally,
    # the groups kept on one side of the split.
    image_column: str = "image"
    label_column: str = "label"
    group_column: str | None = None
    # PIL is the reference decoder; OpenCV is often faster on JPEG.
    decoder: Literal["pil", "opencv"] = "pil"
    # A bad file is skipped and reported by default: one corrupt photo must not end a long run.
    on_bad_image: Literal["skip", "raise"] = "skip"
    # Seed of the embedded dataset's generator (not of training).
    generator_seed: int = 0
    # Images with more pixels than this are bad images (checked from the header, before
    # decoding): a 64 MP RGB image already decodes to ~180 MiB per copy in every worker, and
    # Pillow itself only warns up to ~89 MP. Pillow refuses headers above ~179 MP whatever
    # this says.
    max_pixels: int = field(default=64_000_000, metadata=_limits(1))
    # Files larger than this many MiB are bad images, refused from their size before being
    # read: files are read whole to check and decode them.
    max_file_mb: int = field(default=100, metadata=_limits(1))

    def __post_init__(self) -> None:
        for key in ("image_column", "label_column"):
            if not str(getattr(self, key)).strip():
                raise ConfigError(f"data.{key}: got an empty name, expected a column name")
        if self.group_column is not None and not self.group_column.strip():
            self.group_column = None  # empty means none, as in a CSV cell
        named = [self.image_column, self.label_column, self.group_column]
        if len({c for c in named if c}) < len([c for c in named if c]):
            raise ConfigError(
                "data.image_column, data.label_column, data.group_column: got "
                f"{', '.join(repr(c) for c in named)}; each must name a different column"
            )


@dataclass
class SplitConfig:
    # 20% validation is enough for stable macro-F1 on ~3k images and leaves the rare classes data.
    val_fraction: float = field(default=0.2, metadata=_limits(0.01, 0.9))
    # Keep all images of one group (person/object) on one side so val measures generalisation.
    grouped: bool = True


@dataclass
class AugmentConfig:
    library: Literal["torchvision", "albumentations"] = "torchvision"
    policy: Literal[
        "none", "basic", "color", "geometric", "randaugment", "trivialaugment", "heavy"
    ] = "basic"
    # 0 = identity, 1 = the strongest setting of the policy.
    magnitude: float = field(default=0.5, metadata=_limits(0.0, 1.0))
    # resize_first runs the augmentations on the small image (fast); augment_first on the full one.
    order: Literal["resize_first", "augment_first"] = "resize_first"
    # sample: the policy runs per sample in the loader. batch: the loader delivers uint8 images
    # at the working size and the policy runs on whole batches on the training device, with
    # per-sample parameters drawn as the sample path draws them (policies none, basic, color,
    # geometric): a speed setting, the CPU's loader work drops to decoding and a resize.
    # auto: batch where the policy has a batch version, else sample; batch feeds faster on a
    # CPU and on a GPU (BENCHMARKS.md, "Default feed"). Chosen once per run (feed.auto), which
    # logs and records the value chosen.
    where: Literal["auto", "sample", "batch"] = "auto"
    # Blends pairs of training images and their labels into soft targets, a regularizer.
    mix: Literal["none", "mixup", "cutmix", "mixup_or_cutmix"] = "none"
    # Beta(alpha, alpha) draws the mixing ratio: small values keep images mostly unmixed.
    mix_alpha: float = field(default=1.0, metadata=_limits(0.01, 10.0))
    # Training resolution: small, because the default model must train in minutes on 2 CPU cores.
    image_size: int = field(default=64, metadata=_limits(16, 1024))
    # ImageNet statistics so that pretrained torchvision backbones see what they expect.
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class SamplerConfig:
    kind: Literal["random", "weighted", "sequential"] = "random"
    # Per-sample weight count(label) ** -weight_power: 0 = plain random, 1 = class-balanced.
    weight_power: float = field(default=1.0, metadata=_limits(0.0, 2.0))
    # Samples drawn per epoch by `weighted`; None = the size of the training set.
    num_samples: int | None = field(default=None, metadata=_limits(1))
    replacement: bool = True


@dataclass
class LoaderConfig:
    batch_size: int = field(default=64, metadata=_limits(1, 65536))
    # The seed default: decode in the main process (what most first scripts do).
    num_workers: int = field(default=0, metadata=_limits(0, 256))
    pin_memory: bool = False
    # Batches loaded in advance by each worker (only with num_workers > 0).
    prefetch_factor: int = field(default=2, metadata=_limits(1, 64))
    persistent_workers: bool = False
    drop_last: bool = False
    # Seconds to wait for a batch from a worker before failing (0 = wait forever).
    timeout: float = field(default=0.0, metadata=_limits(0.0))
    # Decoded-image cache shared by the workers (speed setting). auto: resized when the run's
    # caches fit under cache_limit_mb and in the free shared memory (measured at the start of
    # the run, headers only), else none: images are then decoded once, not every epoch
    # (BENCHMARKS.md, "Default feed"). Chosen once per run (feed.auto), which logs and records
    # the value chosen.
    cache: Literal["auto", "none", "decoded", "resized"] = "auto"
    # Refuse to fill a cache larger than this many MiB.
    cache_limit_mb: int = field(default=4096, metadata=_limits(1))


@dataclass
class ModelConfig:
    # small_cnn trains in minutes on a laptop; torchvision names (resnet18, ...), timm/<name>
    # (pip install "feedtune[timm]") and a factory module.path:callable (called with
    # num_classes=... and `kwargs`) also work.
    name: str = "small_cnn"
    # Uses torchvision or timm weights only if already in the local torch or Hugging Face
    # cache; never downloads.
    pretrained: bool = False
    freeze: Literal["none", "backbone"] = "none"
    dropout: float = field(default=0.2, metadata=_limits(0.0, 0.95))
    # Channels of small_cnn's first block (doubling twice); compute grows with its square.
    # 24: ~1.3x the train steps/s of 32 on 2 CPU cores (BENCHMARKS.md, "Model speed").
    width: int = field(default=24, metadata=_limits(4, 512))
    # Conv blocks of small_cnn, each halving the feature map: 5 sees a whole 64 px image;
    # 4 learned shapes ~1.5x slower (BENCHMARKS.md, "Default recipe").
    depth: int = field(default=5, metadata=_limits(1, 8))
    # Keyword arguments of a timm/<name> or module.path:callable model (e.g. drop_rate: 0.1);
    # logged as params model.kwargs.<key>.
    kwargs: dict[str, KwargValue] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = field(default=12, metadata=_limits(1, 10000))
    lr: float = field(default=1e-3, metadata=_limits(1e-8, 10.0))
    # Under torchrun the global batch is loader.batch_size x processes: `linear` scales `lr` by
    # that factor (Goyal et al.), `sqrt` by its square root (Adam-style); `none` keeps `lr`.
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    weight_decay: float = field(default=1e-4, metadata=_limits(0.0, 1.0))
    optimizer: Literal["adamw", "sgd"] = "adamw"
    label_smoothing: float = field(default=0.0, metadata=_limits(0.0, 0.5))
    # Stop when val_f1_macro has not improved for this many epochs (0 = never stop early).
    patience: int = field(default=4, metadata=_limits(0))
    # Learning rate over the run, set every step: `cosine` warms up linearly over the first
    # `warmup_frac` of the steps, then decays to zero (timm's default shape); `constant` keeps `lr`.
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_frac: float = field(default=0.05, metadata=_limits(0.0, 1.0))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision is used only on CUDA.
    amp: bool = True
    # NHWC memory format for model and batches: faster convolutions on CUDA and on CPU (oneDNN);
    # 1.2-1.8x for small_cnn on a 2-core CPU (BENCHMARKS.md, "Model speed"). Changes no result.
    channels_last: bool = True
    # Finetuning: unfreeze the backbone after this many epochs (0 = keep `model.freeze`).
    unfreeze_after: int = field(default=0, metadata=_limits(0))
    # Learning rate of an unfrozen pretrained backbone relative to `lr`.
    backbone_lr_scale: float = field(default=0.1, metadata=_limits(0.0, 1.0))
    # Stop an epoch after this many steps (None = full epoch); used by short speed trials.
    max_steps_per_epoch: int | None = field(default=None, metadata=_limits(1))
    # Batches per round of the loader and model probes after training (3 interleaved rounds,
    # medians; 0 = skip). The end-to-end rate comes from the epochs themselves, for free.
    measure_batches: int = field(default=10, metadata=_limits(0))
    # Under torchrun, seconds a collective may wait for the other processes before it fails:
    # a rank that died or hangs ends the run with an error instead of blocking the others
    # forever. Long enough for rank 0's checkpoint and MLflow logging between epochs.
    dist_timeout_s: int = field(default=120, metadata=_limits(1))


@dataclass
class ParamSpec:
    """One searched key: exactly one of int/float/choice."""

    key: str
    kind: Literal["int", "float", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"choice": list(self.choices or [])}
        out: dict[str, Any] = {self.kind: [self.low, self.high]}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass
class SearchConfig:
    # Dotted keys in the YAML section (e.g. `loader.num_workers: {int: [0, 4]}`) form `space`.
    space: dict[str, ParamSpec] = field(default_factory=dict)
    n_trials_speed: int = field(default=8, metadata=_limits(0))
    n_trials_quality: int = field(default=6, metadata=_limits(0))
    # The whole job's budget (both stages, running trials included); None = no deadline.
    timeout_s: float | None = field(default=None, metadata=_limits(1.0))
    # The speed stage may use at most this share of timeout_s; quality trials get the rest.
    speed_share: float = field(default=0.2, metadata=_limits(0.0, 1.0))
    # If the start configuration waited for batches less than this share of its time, the job
    # is model-bound with little to gain: the speed stage stops after that first trial.
    speed_skip_wait_frac: float = field(default=0.05, metadata=_limits(0.0, 1.0))
    # Real training steps per speed trial: ~1300 samples at batch 16, ~5 s on 2 CPU cores; 25
    # steps gave rates within ~10% of each other on repeats, too noisy to rank loaders.
    speed_steps: int = field(default=80, metadata=_limits(2))
    metric: Literal["val_f1_macro", "val_acc"] = "val_f1_macro"
    # successive_halving: every configuration starts at min_epochs; at each rung (min_epochs
    # x reduction_factor^k epochs) only the top 1/reduction_factor go on (asynchronously).
    pruner: Literal["successive_halving", "hyperband", "median", "none"] = "successive_halving"
    min_epochs: int = field(default=1, metadata=_limits(1))
    reduction_factor: int = field(default=3, metadata=_limits(2))
    # Complete trials, and epochs within a trial, before the median pruner may stop one.
    pruner_startup_trials: int = field(default=2, metadata=_limits(0))
    pruner_warmup_epochs: int = field(default=2, metadata=_limits(0))
    # Random, space-covering trials before TPE models the space.
    startup_trials: int = field(default=6, metadata=_limits(0))
    # Extra full-length runs of the start configuration and each anchor with other seeds
    # (seed+1, ...), before the search: the seed noise that pruning gaps must exceed.
    noise_seeds: int = field(default=1, metadata=_limits(0))
    # The practitioner's fixed recipes, each a list of `key=value` overrides of the start
    # configuration (separated by spaces or `;`), trained at full length beside it as arms the
    # winner must beat; [] for none. TrivialAugment with a plain random sampler needs no tuning.
    anchors: list[str] = field(
        default_factory=lambda: ["augment.policy=trivialaugment sampler.kind=random"]
    )
    # Configurations drawn over the space that run the full length before any pruning, with
    # the arms: their epoch curves show whether a rung's ranking predicts the final one.
    calibration_trials: int = field(default=2, metadata=_limits(0))
    # A rung prunes only when the lower bound of its rank correlation's 90% interval (rung
    # score vs final score, over the full-length trials) exceeds this: 0 = the rung's ranking
    # is shown to point the right way (BENCHMARKS.md, "A search you can trust").
    rung_trust: float = field(default=0.0, metadata=_limits(-1.0, 1.0))
    # Fresh seeds (seed+1, ...) on which the winner, the start and the best anchor are
    # retrained at the end; the verdict is their paired difference. 0 = no re-check: the best
    # trial is recommended as it scored.
    recheck_seeds: int = field(default=2, metadata=_limits(0))
    sampler_seed: int | None = None
    # The first trial of each stage tries the config's own values of the searched keys (where
    # they lie in the space), so a study always shows whether tuning beat the starting point.
    enqueue_config: bool = True


@dataclass
class BenchConfig:
    # The speed settings; the batch size, library and order change what is learned, so by
    # default they stay the config's own (an empty list = the config's value).
    num_workers: list[int] = field(default_factory=lambda: [0, 1, 2])
    cache: list[str] = field(default_factory=lambda: ["none", "resized"])
    decoder: list[str] = field(default_factory=lambda: ["pil", "opencv"])
    where: list[str] = field(default_factory=lambda: ["sample", "batch"])
    batch_size: list[int] = field(default_factory=list)
    library: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    # What-if: a stand-in model that eats this many samples/s without using the CPU, as a
    # GPU does (None = the configured model).
    model_rate: float | None = field(default=None, metadata=_limits(1e-3))
    # Batches timed per loader measurement (the loader alone is cheap to measure).
    batches: int = field(default=20, metadata=_limits(2))
    # Training steps timed per cell (and for the model's appetite, once per batch size): on a
    # CPU one step of the default model takes ~0.3-1.5 s, so the grid stays a few minutes.
    train_steps: int = field(default=6, metadata=_limits(2))


@dataclass
class Config:
    # MLflow experiment and registered model name; None: named after the data, feedtune-<folder
    # name, manifest stem or dataset name> (feedtune-shapes for the embedded dataset).
    experiment: str | None = None
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def __post_init__(self) -> None:
        if self.experiment is None:
            self.experiment = experiment_for(self.data.path, self.data.name)
        elif not self.experiment.strip():
            raise ConfigError(
                "experiment: got an empty name; name one, or leave it out to name the runs "
                "after the data (feedtune-<data>)"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["search"] = _search_to_dict(self.search)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params (search space excluded: it is not a setting)."""
        d = dataclasses.asdict(self)
        d.pop("search")
        d.pop("bench")
        return _flatten(d)

    def get(self, dotted: str) -> Any:
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj


def _search_to_dict(search: SearchConfig) -> dict[str, Any]:
    out: dict[str, Any] = {k: spec.to_dict() for k, spec in search.space.items()}
    for f in dataclasses.fields(SearchConfig):
        if f.name != "space":
            out[f.name] = getattr(search, f.name)
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
