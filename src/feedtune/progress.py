"""Progress that reads well both on a terminal and in a log file.

On a terminal a live tqdm bar is the best view of a long loop. In a file or a pipe (an
``mlflow run`` log, CI, a scheduler's log) every redraw of that bar becomes a line, thousands
per run, which buries the lines that matter. So every progress display of feedtune comes from
``progress_bar``, which picks one of three modes:

- ``bar``: a tqdm bar, as on a terminal.
- ``lines``: plain lines. A bar prints nothing per step and one summary line when it closes
  (``checking images: 3000 imgs in 4.1 s``); a bar marked ``per_item_lines`` (the epochs of a
  training, the cells of a bench) prints one line per item with its postfix
  (``epoch 3/8  val_f1=0.612 best=0.640  (21.4 s)``); a bar marked ``bar_only`` (the batches
  of an epoch) prints nothing at all.
- ``off``: nothing.

The mode is ``bar`` when stderr is a terminal and ``lines`` otherwise. The environment variable
``FEEDTUNE_PROGRESS=bar|lines|off`` forces a mode, e.g. ``bar`` to see tqdm's output in a pipe,
``off`` to silence progress everywhere.

This module imports nothing from feedtune: every layer uses it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, Protocol

from tqdm.auto import tqdm

ENV_VAR = "FEEDTUNE_PROGRESS"
MODES = ("bar", "lines", "off")
Mode = Literal["bar", "lines", "off"]


def stderr_is_tty() -> bool:
    """Whether stderr, where progress goes, is a terminal (False when there is no stderr)."""
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a stream without isatty, or a closed one
        return False


def progress_mode() -> Mode:
    """``$FEEDTUNE_PROGRESS`` when set, else ``bar`` on a terminal and ``lines`` elsewhere."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(MODES)}")
        return forced  # type: ignore[return-value]
    return "bar" if stderr_is_tty() else "lines"


def write_line(text: str) -> None:
    """One progress line on stderr, flushed so that a log shows it when it happens."""
    if sys.stderr is not None:
        print(text, file=sys.stderr, flush=True)


class ProgressBar(Protocol):
    """What feedtune uses of a progress bar; tqdm and ``LineProgress`` both provide it."""

    n: int | float
    total: int | float | None

    def __iter__(self) -> Iterator[Any]: ...

    def update(self, n: int | float = 1) -> Any: ...

    def set_postfix(
        self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any
    ) -> None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...


def _plural(unit: str, n: int | float) -> str:
    if n == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class LineProgress:
    """A tqdm stand-in that writes whole lines (or nothing) instead of redrawing a bar.

    It follows tqdm where the code relies on it: iterating closes the bar when the iterable is
    exhausted, and ``n`` counts finished items. A loop left by ``break`` or by an exception is not
    closed by the iteration, so an error's traceback is not preceded by a misleading summary;
    an explicit ``close`` then reports the item in progress only when its postfix was set during
    it (the epoch loop sets its postfix once the epoch is evaluated, then may stop early).
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | float | None = None,
        desc: str,
        unit: str,
        per_item_lines: bool = False,
        initial: int | float = 0,
        silent: bool = False,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.n: int | float = initial
        self.desc = desc
        self.unit = unit
        self.per_item_lines = per_item_lines
        self.silent = silent
        self.postfix = ""
        self._start = time.perf_counter()
        self._mark = self._start  # when the current item began
        self._in_item = False  # an item of ``__iter__`` is being processed
        self._postfix_in_item = False
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar was made without an iterable; use update()")
        for item in self.iterable:
            self._mark = time.perf_counter()
            self._in_item, self._postfix_in_item = True, False
            yield item
            self._in_item = False
            self._item_done(1)
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def update(self, n: int | float = 1) -> None:
        """Count ``n`` more items; with ``per_item_lines`` each update is one line."""
        self._item_done(n)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        values = dict(ordered_dict or {}) | kwargs
        self.set_postfix_str(" ".join(f"{k}={_format_value(v)}" for k, v in values.items()))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)
        self._postfix_in_item = True

    def close(self) -> None:
        """Write the summary line (or the line of an item stopped in after its postfix)."""
        if self._closed:
            return
        self._closed = True
        if self.per_item_lines:
            if self._in_item and self._postfix_in_item:
                self._in_item = False
                self._item_done(1)
            return
        if self.silent:
            return
        count = f"{self.n:g}"
        if self.total is not None and self.n != self.total:
            count += f"/{self.total:g}"
        line = f"{self.desc}: {count} {_plural(self.unit, self.total or self.n)}"
        line += f" in {time.perf_counter() - self._start:.1f} s"
        write_line(f"{line}  {self.postfix}" if self.postfix else line)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _item_done(self, n: int | float) -> None:
        self.n += n
        now = time.perf_counter()
        if self.per_item_lines and not self.silent:
            count = f"{self.n:g}" + (f"/{self.total:g}" if self.total is not None else "")
            parts = [f"{self.unit} {count}", self.postfix, f"({now - self._mark:.1f} s)"]
            write_line("  ".join(p for p in parts if p))
        self._mark = now


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | float | None = None,
    desc: str,
    unit: str,
    enabled: bool = True,
    leave: bool = True,
    per_item_lines: bool = False,
    bar_only: bool = False,
    **tqdm_kwargs: Any,
) -> ProgressBar:
    """A tqdm bar in ``bar`` mode, else a ``LineProgress`` (see the module docstring).

    ``per_item_lines``: in ``lines`` mode, one line per item rather than one at the close (for
    loops with few, long items). ``bar_only``: nothing in ``lines`` mode (for loops whose lines
    would flood a log, such as the batches of an epoch). ``enabled=False`` shows nothing
    whatever the mode. ``tqdm_kwargs`` go to tqdm; ``LineProgress`` uses only ``initial``.
    """
    mode = progress_mode() if enabled else "off"
    if mode == "bar":
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, **tqdm_kwargs)
    return LineProgress(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        per_item_lines=per_item_lines,
        initial=tqdm_kwargs.get("initial", 0),
        silent=mode == "off" or bar_only,
    )
