"""Typed configuration: one dataclass per concern (``sections``), YAML files and dotted
``--set`` overrides (``loading``). Defaults live in code, each with the reason for its value;
every error names the offending key and says what is allowed."""

from feedtune.config.loading import (
    SECTIONS,
    config_from_dict,
    load_config,
    parse_override,
    with_overrides,
)
from feedtune.config.naming import experiment_for
from feedtune.config.sections import (
    AUTO,
    AUTO_SETTINGS,
    DEFAULT_CONFIG_PATH,
    DEFAULT_EXPERIMENT,
    DEFAULT_FINETUNE_CONFIG_PATH,
    PROJECT_ROOT,
    AugmentConfig,
    BenchConfig,
    Config,
    ConfigError,
    DataConfig,
    LoaderConfig,
    ModelConfig,
    ParamSpec,
    SamplerConfig,
    SearchConfig,
    SplitConfig,
    TrainConfig,
)

__all__ = [
    "AUTO",
    "AUTO_SETTINGS",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_FINETUNE_CONFIG_PATH",
    "PROJECT_ROOT",
    "SECTIONS",
    "AugmentConfig",
    "BenchConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoaderConfig",
    "ModelConfig",
    "ParamSpec",
    "SamplerConfig",
    "SearchConfig",
    "SplitConfig",
    "TrainConfig",
    "config_from_dict",
    "experiment_for",
    "load_config",
    "parse_override",
    "with_overrides",
]
