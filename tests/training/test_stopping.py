"""The one stop request: a signal only sets it, a second one interrupts, the loop honours it
at its next step."""

from __future__ import annotations

import os
import signal

import pytest

from feedtune.training.stopping import (
    INTERRUPTED,
    StopRequest,
    StopTraining,
    current,
    stop_on_signals,
)
from tests.conftest import tiny_feed, train_tiny


def test_a_signal_only_sets_the_request_and_a_second_one_interrupts():
    stop = StopRequest()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals(stop):
        assert current() is stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.reason == INTERRUPTED and "SIGTERM" in stop.detail
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            stop.check()
    assert current() is not stop and not current().requested
    assert {sig: signal.getsignal(sig) for sig in previous} == previous


def test_a_signal_overrides_a_callbacks_stop_and_reasons_are_checked():
    stop = StopRequest()
    stop.request("pruned", "pruned after epoch 1")
    stop.request("deadline")
    with pytest.raises(StopTraining, match="pruned after epoch 1"):
        stop.check()
    stop.request(INTERRUPTED, "SIGTERM received")
    with pytest.raises(KeyboardInterrupt):
        stop.check()
    with pytest.raises(ValueError, match="bored"):
        stop.request("bored")
    stop.clear()
    stop.check()  # nothing asked: nothing raised


def test_the_loop_stops_at_the_next_step_once_asked(tiny_folder, tmp_path):
    cfg, _, feed = tiny_feed(tiny_folder, "train.epochs=3")
    stop = StopRequest()
    stop.request(INTERRUPTED, "SIGTERM received")
    with pytest.raises(KeyboardInterrupt):
        train_tiny(cfg, feed, tmp_path, stop=stop)
    assert not (tmp_path / "last.pt").exists()  # stopped before its first step


def test_patience_is_a_normal_end_that_a_signal_still_overrides():
    stop = StopRequest()
    stop.request("patience", "no better val_f1_macro in 2 epochs")
    stop.check()  # raises nothing: the loop ends normally
    assert stop.finished and stop.requested
    stop.request("pruned")  # the first request wins
    assert stop.reason == "patience"
    stop.request(INTERRUPTED)
    assert not stop.finished
    with pytest.raises(KeyboardInterrupt):
        stop.check()


def test_a_lost_peer_is_the_stop_a_later_signal_does_not_replace(monkeypatch):
    from feedtune.training.stopping import LOST_PEER, PeerLost
    from feedtune.training.trainer import _stop_on_lost_peer

    # How gloo reports a peer's closed socket under torchrun (WORLD_SIZE > 1).
    monkeypatch.setenv("WORLD_SIZE", "2")
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:9")
    stop = StopRequest()
    stop.request("pruned")  # a callback's stop is replaced: the group cannot go on
    with pytest.raises(PeerLost, match="another process died") as raised:
        _stop_on_lost_peer(stop, gloo)
    assert raised.value.__cause__ is gloo and stop.reason == LOST_PEER
    _stop_on_lost_peer(stop, RuntimeError("CUDA out of memory"))  # not a lost peer: left alone
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's, to the survivors: the peer stays
        assert stop.reason == LOST_PEER
        with pytest.raises(PeerLost):
            stop.check()
        with pytest.raises(KeyboardInterrupt):  # a second signal still interrupts at once
            os.kill(os.getpid(), signal.SIGTERM)
    assert {sig: signal.getsignal(sig) for sig in previous} == previous
    first = StopRequest()
    first.request(INTERRUPTED, "SIGINT received")  # Ctrl-C first: the peers died of it
    first.request(LOST_PEER, "another process died")
    with pytest.raises(KeyboardInterrupt):
        first.check()
