"""The one stop signal of a command, and why it may be given.

A :class:`StopRequest` is set by whoever decides that training must end (SIGINT/SIGTERM,
through :func:`stop_on_signals`; a callback's pruning or deadline; patience; the training loop
when another process of the job is lost) and honoured where it is safe: the training loop
checks it at every step and epoch boundary, the commands after their imports and data
preparation, a study between its trials. A signal's handler only sets it, so a stop never
lands inside an import, a checkpoint write or an MLflow call; a second signal interrupts at
once. A lost peer is found where a collective fails, the step or epoch boundary it ends.

A module of its own, importing nothing heavy: the tracking layer ends a run KILLED on these
stops, and tools that only read or close runs should not pay for importing torch.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

# Why a callback stops training (index 0: it did not); the order settles a disagreement
# between processes (the later one wins).
STOP_REASONS = ("", "pruned", "deadline")
# A stop asked for from outside the run (SIGINT, SIGTERM): it ends like Ctrl-C did, the run
# KILLED and the command's exit code 130.
INTERRUPTED = "interrupted"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Early stopping on ``train.patience``: a normal end of training, which ``check`` does not
# raise; the loop ends at the epoch boundary and the request is cleared for whatever follows.
PATIENCE = "patience"
# Under torchrun, another process of the job died or stopped answering: a collective of the
# training loop failed, so no process can go on. ``check`` raises :class:`PeerLost`; the run
# ends FAILED with its resume hint, the command with exit code 1. It is the cause of whatever
# follows (torchrun's SIGTERM to the survivors), so a later signal does not replace it.
LOST_PEER = "lost_peer"


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a callback at the end of an epoch to stop training there; ``reason`` says
    why (``pruned``, ``deadline``). Training ends on every process and raises it again, so
    the caller (a trial) decides what a stop means. Early stopping on ``train.patience`` is a
    normal end of training, not this signal (``TrainState.stopped`` says ``patience``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in STOP_REASONS[1:]:
            raise ValueError(f"StopTraining: reason {reason!r}, allowed: {STOP_REASONS[1:]}")
        super().__init__(detail or reason)
        self.reason = reason


class PeerLost(RuntimeError):
    """Training stopped because another process of the job was lost (``LOST_PEER``); the
    message says which rank saw what, the collective's own error is its cause."""


class StopRequest:
    """A request to stop: ``request(reason, detail)`` sets it (the first request wins, but a
    signal's overrides any other), ``check()`` raises it at a safe point. ``interrupted`` (a
    signal) raises ``KeyboardInterrupt``, which every layer ends as Ctrl-C (runs KILLED, exit
    130); ``lost_peer`` raises :class:`PeerLost`, an error (runs FAILED, exit 1); ``pruned``
    and ``deadline`` raise :class:`StopTraining`; ``patience`` raises nothing: the loop sees
    it ``finished`` and ends normally. A signal or a lost peer overrides the other reasons,
    and whichever of the two came first stays."""

    def __init__(self) -> None:
        self.reason = ""
        self.detail = ""

    @property
    def requested(self) -> bool:
        return bool(self.reason)

    @property
    def finished(self) -> bool:
        """Whether training reached its normal end early (``patience``)."""
        return self.reason == PATIENCE

    def request(self, reason: str, detail: str = "") -> None:
        if reason not in (*_OVERRIDING, PATIENCE) and reason not in STOP_REASONS[1:]:
            allowed = (*_OVERRIDING, PATIENCE, *STOP_REASONS[1:])
            raise ValueError(f"StopRequest: reason {reason!r}, allowed: {allowed}")
        if not self.reason or (reason in _OVERRIDING and self.reason not in _OVERRIDING):
            self.reason, self.detail = reason, detail or reason

    def clear(self) -> None:
        self.reason = self.detail = ""

    def check(self) -> None:
        """Raise the requested stop, if any (a safe point: between steps, epochs, trials)."""
        if self.reason == INTERRUPTED:
            raise KeyboardInterrupt(self.detail)
        if self.reason == LOST_PEER:
            raise PeerLost(self.detail)
        if self.reason and not self.finished:
            raise StopTraining(self.reason, self.detail)


# The reasons that replace any other already requested (but not each other).
_OVERRIDING = (INTERRUPTED, LOST_PEER)

# The request that signals set while a command runs (``stop_on_signals``); outside one, a
# request nobody sets, so that a loop run by a test or a library user never stops by itself.
_active: list[StopRequest] = []
_NEVER = StopRequest()


def current() -> StopRequest:
    """The stop request of the command running in this process (one nobody sets if none)."""
    return _active[-1] if _active else _NEVER


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """Inside the block SIGINT and SIGTERM set ``stop`` (reason ``interrupted``) instead of
    raising where they land; a second one raises ``KeyboardInterrupt`` at once. ``stop`` is
    :func:`current` inside the block. The previous handlers come back on leaving. Only the
    main thread sets handlers: elsewhere ``stop`` is only made current."""
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if main else {}
    owner = os.getpid()
    came: list[int] = []

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != owner or came or stop.reason == INTERRUPTED:
            # A forked DataLoader worker keeps Python's Ctrl-C behaviour (its loop ends on
            # it); in the command's process this is the second signal (the first may have
            # come before this block, or after a lost peer, which it does not replace): stop
            # now.
            signal.default_int_handler(signum, frame)
        came.append(signum)
        stop.request(INTERRUPTED, f"{signal.Signals(signum).name} received")

    for sig in previous:
        signal.signal(sig, handle)
    _active.append(stop)
    try:
        yield stop
    finally:
        _active.remove(stop)
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


# Signals held back while a piece of bookkeeping must finish (a run's final status written):
# they reach their handlers (``stop_on_signals``) once it has.
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


def exit_130_on_late_signals(stop: StopRequest) -> list[int]:
    """For the process's entry point, before its command: until the process ends, SIGINT and
    SIGTERM outside ``stop_on_signals`` (its imports before, the exit handlers of MLflow and
    torch after) only set ``stop``. Once the command has returned (its code put in the
    returned list) and every other exit handler has run (this one is registered first, so it
    runs last), the process exits at once with that code, 130 if a signal came meanwhile:
    the interpreter's own teardown after it would restore SIGTERM's default action (killed,
    not 130) for the seconds torch's and MLflow's objects take to go."""
    ended: list[int] = []

    def late(signum: int, frame: object) -> None:
        stop.request(INTERRUPTED, f"{signal.Signals(signum).name} received")

    def exit_interrupted() -> None:
        if not ended:
            return  # the command raised: Python reports it and exits as usual
        # logging registered its own exit handler before this one, so it would run after
        # os._exit: its handlers are flushed and closed here instead.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130 if stop.reason == INTERRUPTED and ended == [0] else ended[0])

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, late)
        atexit.register(exit_interrupted)
    return ended
