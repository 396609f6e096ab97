"""Loading a configuration: YAML files, dotted ``--set`` overrides, types and limits checked.

Every error names the offending key and says what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from feedtune.config.sections import (
    AUTO,
    AUTO_SETTINGS,
    Config,
    ConfigError,
    ParamSpec,
    SearchConfig,
)

# Top-level key -> its type (a dataclass for sections, a plain type for experiment/seed).
SECTIONS: dict[str, Any] = typing.get_type_hints(Config)


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
        _, inner = typing.get_args(tp) or (str, Any)
        return f"a mapping of names to {_type_name(inner)}"
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
    if origin is dict:
        return _coerce_mapping(key, value, tp)
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


def _coerce_mapping(key: str, value: Any, tp: Any) -> dict[str, Any]:
    """A mapping of string keys, each value checked as ``key.<name>`` against the value type."""
    key_tp, value_tp = typing.get_args(tp) or (str, Any)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    out = {}
    for name, item in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{key}: key {name!r} is not a name (letters, digits, _)")
        out[_coerce(f"{key}.{name}", name, key_tp)] = _coerce(f"{key}.{name}", item, value_tp)
    return out


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
        if key in AUTO_SETTINGS and AUTO in body:
            # A trial runs, and records, the values it is given: auto is a run's own choice.
            raise ConfigError(
                f"{where}: '{AUTO}' is chosen per run, not searched; list the values to try"
            )
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
    # The experiment is named after the data unless the file or a --set names it.
    data: dict[str, Any] = {**Config().to_dict(), "experiment": None}
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


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A new validated Config: ``cfg`` with dotted ``overrides`` applied (a trial's params)."""
    d = cfg.to_dict()
    for key, value in overrides.items():
        _set_dotted(d, key, value, source="override")
    return config_from_dict(d)
