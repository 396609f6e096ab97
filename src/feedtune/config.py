"""Typed configuration: one dataclass per concern, YAML overrides, dotted ``--set`` keys.

Defaults live here, each with the reason for its value; files in ``experiments/`` hold only
what differs. Every error names the offending key and says what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def _project_root() -> Path:
    """The checkout (where MLproject lives) when run from it, else the current directory."""
    if os.environ.get("FEEDTUNE_HOME"):
        return Path(os.environ["FEEDTUNE_HOME"]).resolve()
    repo = Path(__file__).resolve().parents[2]
    return repo if (repo / "MLproject").is_file() else Path.cwd()


PROJECT_ROOT = _project_root()
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "experiments" / "default.yaml"
DEFAULT_FINETUNE_CONFIG_PATH = PROJECT_ROOT / "experiments" / "finetune-shapes-shift.yaml"
# The experiment (and registered model name) of the embedded dataset's runs.
DEFAULT_EXPERIMENT = "feedtune-shapes"


class ConfigError(ValueError):
    """A configuration key, type or value that cannot be used; the message names the key."""


def _limits(minimum: float | None = None, maximum: float | None = None, **extra: Any) -> dict:
    return {"min": minimum, "max": maximum, **extra}


@dataclass
class DataConfig:
    # Embedded dataset written to data/<name>/ when `path` is unset (see `feedtune data`).
    name: Literal["shapes", "shapes-shift"] = "shapes"
    # Your own images: an ImageFolder tree (class/xxx.jpg) or a CSV manifest path,label[,group].
    path: str | None = None
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
    where: Literal["sample", "batch"] = "sample"
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
    # Decoded-image cache shared by the workers (speed setting).
    cache: Literal["none", "decoded", "resized"] = "none"
    # Refuse to fill a cache larger than this many MiB.
    cache_limit_mb: int = field(default=4096, metadata=_limits(1))


@dataclass
class ModelConfig:
    # small_cnn trains in minutes on a laptop; torchvision names (resnet18, ...) also work.
    name: str = "small_cnn"
    # Uses torchvision weights only if already in the local torch cache; never downloads.
    pretrained: bool = False
    freeze: Literal["none", "backbone"] = "none"
    dropout: float = field(default=0.2, metadata=_limits(0.0, 0.95))
    # Channels of small_cnn's first block (doubling twice); compute grows with its square.
    # 24: ~1.3x the train steps/s of 32 on 2 CPU cores (BENCHMARKS.md, "Model speed").
    width: int = field(default=24, metadata=_limits(4, 512))
    # Conv blocks of small_cnn, each halving the feature map: 5 sees a whole 64 px image;
    # 4 (the fixed depth before this key) learned shapes ~1.5x slower (BENCHMARKS.md,
    # "Default recipe").
    depth: int = field(default=5, metadata=_limits(1, 8))


@dataclass
class TrainConfig:
    epochs: int = field(default=12, metadata=_limits(1, 10000))
    lr: float = field(default=1e-3, metadata=_limits(1e-8, 10.0))
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
    # Extra full-length runs of the start configuration with other seeds: with the study's own
    # run of it, the noise a winner must beat.
    noise_seeds: int = field(default=1, metadata=_limits(0))
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
    experiment: str = DEFAULT_EXPERIMENT
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

    def replace(self, overrides: dict[str, Any]) -> Config:
        """A new validated Config with dotted overrides applied."""
        d = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(d, key, value, source="override")
        return config_from_dict(d)


# Top-level key -> its type (a dataclass for sections, a plain type for experiment/seed).
SECTIONS: dict[str, Any] = typing.get_type_hints(Config)


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


def _set_dotted(d: dict[str, Any], key: str, value: Any, *, source: str) -> None:
    parts = key.split(".")
    if parts[0] == "search" and len(parts) > 2:
        # search.<section>.<field> declares a searched key: keep the dotted name whole.
        d.setdefault("search", {})[".".join(parts[1:])] = value
        return
    node = d
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            allowed = ", ".join(sorted(node)) if isinstance(node, dict) else ""
            raise ConfigError(
                f"{source}: unknown key '{'.'.join(parts[: i + 1])}' in '{key}'; allowed: {allowed}"
            )
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (so ``2``, ``true``, ``[1, 2]`` are typed)."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected key=value, e.g. loader.num_workers=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: got {value!r}, allowed: {', '.join(str(a) for a in allowed)}"
            )
        return value
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}, expected an integer")
        return value
    if tp is float:
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept what Python reads as a number.
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}, expected a string")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build_section(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key '{prefix}.{key}'; allowed in '{prefix}': {', '.join(fields)}"
            )
        dotted = f"{prefix}.{key}"
        coerced = _coerce(dotted, value, hints[key])
        lim = fields[key].metadata
        if coerced is not None and isinstance(coerced, (int, float)) and lim:
            lo, hi = lim.get("min"), lim.get("max")
            if (lo is not None and coerced < lo) or (hi is not None and coerced > hi):
                rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise ConfigError(f"{dotted}: got {value!r}, allowed range {rng}")
        kwargs[key] = coerced
    return cls(**kwargs)


def _parse_param_spec(key: str, raw: Any, sections: dict[str, type]) -> ParamSpec:
    where = f"search.{key}"
    section, _, name = key.partition(".")
    settable = [s for s, tp in sections.items() if dataclasses.is_dataclass(tp)]
    settable = [s for s in settable if s not in ("search", "bench")]
    if section not in settable or not name:
        allowed = ", ".join(settable)
        raise ConfigError(f"{where}: '{key}' is not a setting; searched keys live in: {allowed}")
    cls = sections[section]
    hints = typing.get_type_hints(cls)
    if name not in hints:
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{where}: unknown key '{key}'; allowed in '{section}': {fields}")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected {{int: [lo, hi]}}, {{float: [lo, hi]}} or {{choice: [...]}}"
        )
    kinds = [k for k in ("int", "float", "choice") if k in raw]
    extra = set(raw) - {"int", "float", "choice", "log", "step"}
    if len(kinds) != 1 or extra:
        raise ConfigError(f"{where}: give exactly one of int, float, choice (optional log, step)")
    kind = kinds[0]
    body = raw[kind]
    if kind == "choice":
        if not isinstance(body, list) or not body:
            raise ConfigError(f"{where}: choice needs a non-empty list")
        for v in body:  # every choice must be a valid value of the setting
            _coerce(key, v, hints[name])
        return ParamSpec(key=key, kind="choice", choices=list(body))
    if kind == "float" and isinstance(body, list):  # YAML reads 1e-3 as a string
        body = [_coerce(where, v, float) if isinstance(v, str) else v for v in body]
    if not (
        isinstance(body, list) and len(body) == 2 and all(isinstance(v, (int, float)) for v in body)
    ):
        raise ConfigError(f"{where}: {kind} needs [low, high]")
    low, high = body
    if low > high:
        raise ConfigError(f"{where}: low {low} is above high {high}")
    log = bool(raw.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0")
    for v in (low, high):
        _coerce(key, int(v) if kind == "int" else float(v), hints[name])
    return ParamSpec(key=key, kind=kind, low=low, high=high, log=log, step=raw.get("step"))


def _build_search(values: Any) -> SearchConfig:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"search: expected a mapping, got {values!r}")
    space_raw = {k: v for k, v in values.items() if "." in k}
    options = {k: v for k, v in values.items() if "." not in k}
    if "space" in options:
        raise ConfigError(
            "search: write searched keys directly, e.g. 'loader.num_workers: {int: [0, 4]}'"
        )
    search = _build_section(SearchConfig, options, "search")
    search.space = {k: _parse_param_spec(k, v, SECTIONS) for k, v in space_raw.items()}
    return search


def config_from_dict(d: dict[str, Any]) -> Config:
    if not isinstance(d, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {d!r}")
    allowed = list(SECTIONS)
    for key in d:
        if key not in SECTIONS:
            raise ConfigError(f"unknown key '{key}'; allowed top-level keys: {', '.join(allowed)}")
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for key, value in d.items():
        if key == "search":
            kwargs[key] = _build_search(value)
        elif dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build_section(hints[key], value, key)
        else:
            kwargs[key] = _coerce(key, value, hints[key])
    return Config(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``--set`` overrides, validated."""
    data: dict[str, Any] = Config().to_dict()
    # Start from defaults but let the file's search section replace the default (empty) space.
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        for key, value in loaded.items():
            if key not in SECTIONS:
                raise ConfigError(
                    f"{path}: unknown key '{key}'; allowed top-level keys: {', '.join(SECTIONS)}"
                )
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                for sub, subval in value.items():
                    data[key][sub] = subval
            else:
                data[key] = value
    for text in overrides or []:
        key, value = parse_override(text)
        if key.split(".")[0] not in SECTIONS:
            raise ConfigError(
                f"--set {text}: unknown key '{key.split('.')[0]}'; allowed: {', '.join(SECTIONS)}"
            )
        _set_dotted(data, key, value, source=f"--set {text}")
    return config_from_dict(data)
