"""Worker liveness on real processes: a live child is alive, a reaped one is dead, and records
this machine cannot check (another boot, another PID namespace, a process it may not inspect)
count as alive."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest

from feedtune.tracking.liveness import is_alive, worker_info
from tests.conftest import env_with_src

HAS_PROC = os.path.exists("/proc/sys/kernel/random/boot_id") and os.path.exists("/proc/self/ns/pid")


@contextmanager
def _child() -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping child process, killed and reaped on the way out."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _record(pid: int, started: float, **extra: Any) -> dict[str, Any]:
    """What ``worker_info`` would have written in process ``pid`` on this machine."""
    return {**worker_info(), "pid": pid, "started": round(started, 3), **extra}


def _reaped_record() -> dict[str, Any]:
    """The record of a process of this machine that existed and is gone (killed and reaped)."""
    with _child() as proc:
        record = _record(proc.pid, psutil.Process(proc.pid).create_time())
    return record


def test_worker_info_names_this_process():
    info = worker_info()
    assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
    assert info["started"] == pytest.approx(psutil.Process().create_time(), abs=0.01)
    if HAS_PROC:
        assert isinstance(info["boot_id"], str) and info["boot_id"]
        assert info["pid_ns"].startswith("pid:[")
    else:
        assert "boot_id" not in info and "pid_ns" not in info
    assert is_alive(info)


def test_live_child_is_alive_then_dead_once_reaped():
    with _child() as proc:
        record = _record(proc.pid, psutil.Process(proc.pid).create_time())
        assert is_alive(record)
        # MLflow tags hold strings: the same record read back from them is judged the same
        assert is_alive({k: str(v) for k, v in record.items()})
        proc.kill()
        proc.wait()
        assert not is_alive(record)
        assert not is_alive({k: str(v) for k, v in record.items()})


def test_pid_that_does_not_exist_is_dead():
    assert not is_alive(_reaped_record())


@pytest.mark.parametrize("key", ["boot_id", "pid_ns"])
def test_other_boot_or_pid_namespace_on_the_same_host_is_alive(key):
    record = _reaped_record()
    assert not is_alive(record)  # checkable here: dead
    # a clone of this machine, a reboot, or a container with its own pids: cannot check
    assert is_alive({**record, key: "pid:[1]" if key == "pid_ns" else "another-boot"})


def test_another_host_is_alive():
    assert is_alive({**_reaped_record(), "host": socket.gethostname() + "-other"})


def test_old_record_without_the_new_keys_is_judged_by_host_pid_and_start_time():
    with _child() as proc:
        started = psutil.Process(proc.pid).create_time()
        old = {"host": socket.gethostname(), "pid": proc.pid, "started": round(started, 3)}
        assert is_alive(old)
        assert not is_alive({**old, "started": started - 60})  # pid reused by another process
        assert is_alive({**old, "host": "elsewhere"})
        # the keys read back from MLflow tags that were never written
        assert is_alive({**old, "boot_id": None, "pid_ns": None})
        proc.kill()
        proc.wait()
        assert not is_alive(old)
        assert not is_alive({**old, "boot_id": None, "pid_ns": None})


def test_process_of_another_user_never_raises_and_counts_as_alive():
    try:
        started = psutil.Process(1).create_time()
    except psutil.Error as exc:  # pragma: no cover - platforms hiding pid 1 entirely
        pytest.skip(f"pid 1 not visible here: {exc!r}")
    assert is_alive({"host": socket.gethostname(), "pid": 1, "started": started})
    assert is_alive(_record(1, started))


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "often"])
def test_a_bad_heartbeat_setting_names_the_variable(value):
    """What every worker of a study reads at start: a fresh interpreter, as a worker has."""
    proc = subprocess.run(
        [sys.executable, "-c", "import feedtune.tracking.liveness"],
        env={**env_with_src(), "FEEDTUNE_HEARTBEAT_S": value},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert f"FEEDTUNE_HEARTBEAT_S: got '{value}'" in proc.stderr


def test_the_heartbeat_setting_sets_the_grace_to_three_beats():
    code = "from feedtune.tracking import liveness as l; print(l.HEARTBEAT_S, l.GRACE_S)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**env_with_src(), "FEEDTUNE_HEARTBEAT_S": "4"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["4", "12"]
