"""Signals held back while a piece of bookkeeping must finish: a run's final status written
between a Ctrl-C or SIGTERM and its handler (``stopping.stop_on_signals``: the first one
requests a stop, a second one interrupts at once)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM recorded instead of handled inside the block, then handed to their
    own handlers (the first one that came). Only the main thread handles signals: elsewhere
    the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    handlers = {sig: handler for sig, handler in handlers.items() if handler is not None}
    came: list[int] = []
    for sig in handlers:
        signal.signal(sig, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if came:
            handler = handlers[came[0]]
            if callable(handler):
                handler(came[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(came[0])
