"""Every rule about the search space in one place: which keys are speed settings, which keys
decide whether others matter, and which settings are inert given the rest.

Speed settings change how fast data arrives, not what the model learns; they are tuned by short
throughput trials. Everything else in ``search`` is a quality setting, tuned by validation score.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from feedtune.config import ConfigError, ParamSpec, SearchConfig
from feedtune.feed.augment.batch import has_batch_version

SPEED_KEYS = (
    "loader.num_workers",
    "loader.pin_memory",
    "loader.prefetch_factor",
    "loader.persistent_workers",
    "loader.cache",
    "data.decoder",
    "augment.where",
)
# Keys on which other keys' relevance depends (see ``inert_settings``): drawn first.
DECIDING_KEYS = (
    "loader.num_workers",
    "sampler.kind",
    "augment.policy",
    "augment.where",
    "augment.mix",
)

Inert = Callable[[dict[str, Any]], set[str]]


def speed_space(search: SearchConfig) -> dict[str, ParamSpec]:
    return {k: v for k, v in search.space.items() if k in SPEED_KEYS}


def quality_space(search: SearchConfig) -> dict[str, ParamSpec]:
    return {k: v for k, v in search.space.items() if k not in SPEED_KEYS}


def require_space(search: SearchConfig, stage: str) -> None:
    """A ``ConfigError`` when ``stage`` (speed, quality or all) has no key to search: its
    trials would all train the start configuration, with no parameters."""
    keys = {"speed": speed_space, "quality": quality_space}.get(stage, lambda s: s.space)(search)
    if not keys:
        which = "" if stage == "all" else f" for the {stage} stage"
        raise ConfigError(
            f"search: no searched keys{which}, so `feedtune tune` has nothing to try; declare "
            "them in the config's search section, e.g. 'loader.num_workers: {int: [0, 2]}' or "
            "'train.lr: {float: [1.0e-4, 1.0e-2], log: true}'"
        )


def inert_settings(values: dict[str, Any], *, cuda: bool, source: Iterable[str] = ()) -> set[str]:
    """Dotted keys that cannot change a trial given the other ``values`` (all settings);
    ``source``: the keys the data source makes inert (``ItemReader.inert``, e.g.
    ``data.decoder`` for a Dataset of in-memory images)."""
    inert = set(source)
    if values.get("loader.num_workers", 1) == 0:
        # The loader drops these without workers (``loader.loader_kwargs``).
        inert |= {"loader.prefetch_factor", "loader.persistent_workers", "loader.timeout"}
    if not cuda:
        inert.add("loader.pin_memory")
    if values.get("sampler.kind") != "weighted":
        inert |= {"sampler.weight_power", "sampler.num_samples", "sampler.replacement"}
    policy = values.get("augment.policy")
    if policy == "none":
        # Policy none trains on the eval pipeline, which has no strength and no order.
        inert |= {"augment.magnitude", "augment.order"}
    if values.get("augment.mix", "none") == "none":
        inert.add("augment.mix_alpha")  # no Beta draw without a mix
    if not batch_augment_qualifies(policy, values.get("augment.order")):
        inert.add("augment.where")  # the sample path is the only one that draws this policy
    elif values.get("augment.where") == "batch":
        inert.add("augment.library")  # the batch path is one implementation of both libraries
    return inert


def consistent(settings: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` of ``settings`` (both dotted), with ``augment.where`` back at ``sample``
    where the resulting policy has no batch version: a quality trial combines the speed
    stage's winner with a policy of its own."""
    values = {**settings, **overrides}
    if values.get("augment.where") == "batch" and not batch_augment_qualifies(
        values.get("augment.policy"), values.get("augment.order")
    ):
        return {**overrides, "augment.where": "sample"}
    return overrides


def batch_augment_qualifies(policy: Any, order: Any) -> bool:
    """Whether ``augment.where: batch`` draws the same transforms as the sample path, which
    makes it a speed setting for this policy (see ``feed.augment.batch``)."""
    return has_batch_version(policy, order)


def inert_given(settings: dict[str, Any], *, cuda: bool, source: Iterable[str] = ()) -> Inert:
    """The ``inert`` callback for a trial whose settings, apart from the values drawn, are
    ``settings`` (a config's ``flat()``), on a source whose reader makes ``source`` inert."""
    return lambda values: inert_settings({**settings, **values}, cuda=cuda, source=source)


def covers(space: dict[str, ParamSpec], values: dict[str, Any]) -> bool:
    """Whether every key of ``space`` has its value in ``values`` inside its range, so a trial
    can run exactly those values."""
    return all(k in values and inside(spec, values[k]) for k, spec in space.items())


def ordered(space: dict[str, ParamSpec]) -> list[tuple[str, ParamSpec]]:
    """The space's keys, deciding keys first, so that a key's relevance is known when drawn."""
    return sorted(space.items(), key=lambda item: item[0] not in DECIDING_KEYS)


def inside(spec: ParamSpec, value: Any) -> bool:
    if spec.kind == "choice":
        return value in (spec.choices or [])
    return float(spec.low) <= float(value) <= float(spec.high)


def grid(space: dict[str, ParamSpec], inert: Inert | None = None) -> list[dict[str, Any]]:
    """Every combination of a discrete space (ints expanded), for exhaustive comparisons;
    with ``inert``, combinations that differ only in inert keys count once."""
    axes = []
    for key, spec in space.items():
        if spec.kind == "choice":
            values = list(spec.choices or [])
        elif spec.kind == "int":
            values = list(range(int(spec.low), int(spec.high) + 1, int(spec.step or 1)))
        else:
            raise ValueError(f"search.{key}: a float range has no finite grid")
        axes.append([(key, v) for v in values])
    cells: dict[tuple, dict[str, Any]] = {}
    for combo in itertools.product(*axes):
        cell = dict(combo)
        if inert is not None:
            cell = {k: v for k, v in cell.items() if k not in inert(cell)}
        cells.setdefault(tuple(sorted(cell.items())), cell)
    return list(cells.values())
