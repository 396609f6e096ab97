"""Source text from feedtune's own builders, for the script of ``feedtune best --emit python``.

The ops classes of ``augment_policies`` and ``mixing.build_mix`` run with their library names
(``A``, ``v2``, ``cv2``, ...) bound to ``Code`` recorders: each library call they make comes back
as a ``Call``, which ``lit`` writes out as the constructor call itself. The script thus holds the
very calls, arguments and order feedtune trains with, and stays so when the policies change.
"""

from __future__ import annotations

import json
import textwrap
import types
from typing import Any, NamedTuple, cast

from feedtune.config import Config
from feedtune.feed.augment import mixing
from feedtune.feed.augment import policies as ap

__all__ = [
    "TRIVIAL_CLASS_SOURCE",
    "WIDTH",
    "Call",
    "Code",
    "lit",
    "recorded_mix",
    "transform_source",
]

WIDTH = 99  # an emitted line plus its trailing comma stays within ruff's 100


class Call(NamedTuple):
    """A recorded call: printed on one line when it fits, else one argument per line."""

    func: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class Code:
    """Source text, e.g. a library object's name: attributes extend it, calls are recorded."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> Code:
        return Code(f"{self.name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Call:
        return Call(self.name, args, kwargs)


# augment_policies' globals that build transforms, and the names the script gives them.
_LIBRARY_NAMES = {
    "A": Code("A"),
    "v2": Code("v2"),
    "cv2": Code("cv2"),
    "torch": Code("torch"),
    "ToTensorV2": Code("ToTensorV2"),
    "InterpolationMode": Code("v2.InterpolationMode"),
    "NumpyToImage": Code("v2.ToImage"),  # the same HWC array -> CHW uint8 tensor step
    "TrivialAugmentWideUpTo": Code("TrivialAugmentWideUpTo"),  # defined in the script
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
    """``items`` on one line if it ends by ``WIDTH``, else one per line (ruff's layout)."""
    flat = opening + ", ".join(items) + closing
    if "\n" not in flat and column + len(flat) <= WIDTH:
        return flat
    pad = " " * (indent + 4)
    closing = closing.lstrip(",")  # a wrapped 1-tuple already ends in a trailing comma
    return f"{opening}\n" + "".join(f"{pad}{item},\n" for item in items) + " " * indent + closing


def lit(value: Any, indent: int = 0, column: int | None = None) -> str:
    """Python source for ``value`` starting at ``column`` of a line indented by ``indent``.

    Floats keep their exact repr, so the script's parameters are feedtune's to the last bit.
    """
    column = indent if column is None else column
    inner = indent + 4

    def items(pairs: list[tuple[str, Any]]) -> list[str]:
        # Each item is measured as if on its own line (where it lands when the call wraps).
        return [f"{lead}{lit(v, inner, inner + len(lead))}" for lead, v in pairs]

    if isinstance(value, Call):
        pairs = [("", a) for a in value.args] + [(f"{k}=", v) for k, v in value.kwargs.items()]
        return _wrap(f"{value.func}(", items(pairs), ")", indent, column)
    if isinstance(value, Code):
        return value.name
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        pairs = [(f"{lit(k)}: ", v) for k, v in value.items()]
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


TRIVIAL_CLASS_SOURCE = textwrap.dedent(
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


def transform_source(name: str, cfg: Config, *, train: bool) -> str:
    a = cfg.augment
    ops = (
        _recorder(ap.TorchvisionOps, bilinear=Code("v2.InterpolationMode.BILINEAR"))
        if a.library == "torchvision"
        else _recorder(ap.AlbumentationsOps)
    )
    keys = ("policy", "magnitude", "order", "image_size", "mean", "std")
    stages = ap.build_stages(cast(Any, ops), train=train, **{k: getattr(a, k) for k in keys})
    compose = Code("v2" if a.library == "torchvision" else "A").Compose
    pipeline = compose([t for _, ts in stages for t in ts])
    return f"{name} = {lit(pipeline, 0, len(name) + 3)}\n"


def recorded_mix(cfg: Config) -> Call:
    """``build_mix``'s call with ``v2`` bound to a recorder, for a class count ``num_classes``."""
    scope = {**vars(mixing), "v2": Code("v2")}
    fn = mixing.build_mix
    build = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    return cast(Call, build(cfg.augment, num_classes=Code("num_classes")))
