"""The arms of a quality stage: the start configuration and the anchors (fixed recipes a
practitioner would use instead of searching), each trained at full length and on several seeds,
so that the search's winner is judged against them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from feedtune.config import Config, ConfigError, with_overrides
from feedtune.config.loading import parse_override

START = "start"


@dataclass(frozen=True)
class Arm:
    """``name``: ``start`` or ``anchor-<i>`` (1-based, in ``search.anchors`` order);
    ``overrides``: dotted settings on top of the start configuration."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def is_start(self) -> bool:
        return self.name == START

    def describe(self) -> str:
        if self.is_start:
            return "the start configuration"
        settings = " ".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"the anchor {self.name} ({settings})"


def parse_anchor(text: str, index: int, cfg: Config) -> Arm:
    """One ``search.anchors`` entry (``key=value`` pairs separated by spaces or ``;``),
    checked against the config: a bad key or value names the entry."""
    where = f"search.anchors[{index}] '{text}'"
    overrides: dict[str, Any] = {}
    for part in (p for p in re.split(r"[;\s]+", text.strip()) if p):
        try:
            key, value = parse_override(part)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        overrides[key] = value
    if not overrides:
        raise ConfigError(f"{where}: expected key=value settings, e.g. augment.policy=basic")
    try:
        with_overrides(cfg, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return Arm(f"anchor-{index + 1}", overrides)


def config_arms(cfg: Config) -> list[Arm]:
    """The start configuration, then the anchors of ``search.anchors``."""
    return [Arm(START)] + [parse_anchor(t, i, cfg) for i, t in enumerate(cfg.search.anchors)]
