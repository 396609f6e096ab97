"""The one signal that stops training early, and why it may be given.

A module of its own, importing nothing: the tracking layer ends a run KILLED on it, and
tools that only read or close runs should not pay for importing torch to recognise it.
"""

from __future__ import annotations

# Why a callback stops training (index 0: it did not); the order settles a disagreement
# between processes (the later one wins).
STOP_REASONS = ("", "pruned", "deadline")


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
