"""Which process on which machine does a piece of work, and whether it is still alive.

File storages (Optuna journal, MLflow SQLite) have no heartbeat: a process killed with SIGKILL
leaves its trial and its runs RUNNING. Recording host, pid and the process's start time lets
the next feedtune process on the same machine tell a dead worker from a live one (the start
time guards against pid reuse). A long-lived run (a study's parent) also carries a heartbeat
its worker refreshes, for workers on other machines, whose pids cannot be checked here.

A hostname alone does not name a process table: containers may share the host's name but
have their own PID namespace, and cloned machines share a name but not a kernel. So a record
also holds the kernel's boot id and the PID namespace, and a pid is looked up only when the
record's (host, boot id, PID namespace) is ours. Anything else is treated as alive: failing a
live worker's trial is worse than leaving a dead one RUNNING.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import psutil

HEARTBEAT_ENV = "FEEDTUNE_HEARTBEAT_S"


def _heartbeat_s() -> int:
    """Seconds between heartbeats: ``$FEEDTUNE_HEARTBEAT_S``, else 10 (whole seconds, as
    Optuna's RDB storage takes them)."""
    text = os.environ.get(HEARTBEAT_ENV, "10")
    if not text.strip().isdigit() or int(text) <= 0:
        raise ValueError(f"{HEARTBEAT_ENV}: got {text!r}, expected a whole number of seconds > 0")
    return int(text)


# A worker refreshes its heartbeat this often; one silent for three beats is dead. Optuna's RDB
# heartbeats (trials) and feedtune's run heartbeats (a study's parent run) use the same pair.
# Every worker of a study must use the same value.
HEARTBEAT_S = _heartbeat_s()
GRACE_S = 3 * HEARTBEAT_S
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
PID_NS_PATH = "/proc/self/ns/pid"


def _boot_id() -> str | None:
    """This kernel's boot id: new on every boot, different on a cloned machine."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_ns() -> str | None:
    """This process's PID namespace, e.g. ``pid:[4026531836]``: pids mean something only in it."""
    try:
        return os.readlink(PID_NS_PATH)
    except OSError:
        return None


def worker_info() -> dict[str, Any]:
    """Host, pid and start time of this process, plus ``boot_id`` and ``pid_ns`` where the
    platform has ``/proc`` (absent elsewhere, so stored records never hold a placeholder)."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": round(psutil.Process().create_time(), 3),
    }
    for key, value in (("boot_id", _boot_id()), ("pid_ns", _pid_ns())):
        if value is not None:
            info[key] = value
    return info


def _same_process_table(info: dict[str, Any]) -> bool:
    """Whether ``info``'s pid can be looked up here: same host, and, where the record has them,
    the same boot id and PID namespace (records written before these keys compare host only).

    A different boot id with the same host may be a reboot of this machine (the worker is
    dead) or a clone of it (the worker may be running there); the two look alike from here
    (the initial PID namespace has the same inode on every boot), so it counts as unknown.
    """
    if info.get("host") != socket.gethostname():
        return False
    for key, ours in (("boot_id", _boot_id()), ("pid_ns", _pid_ns())):
        recorded = info.get(key)
        if recorded is not None and str(recorded) != ours:
            return False
    return True


def is_alive(info: dict[str, Any]) -> bool:
    """False only when ``info`` names a process in this machine's process table that no longer
    exists (or whose pid now belongs to a process started at another time).

    True whenever that cannot be checked: another host, boot or PID namespace (only RDB
    heartbeats can tell), or psutil refusing the lookup (access denied, zombie, other errors).
    A malformed record (no pid, no start time) counts as dead, as it names no live worker.
    """
    if not _same_process_table(info):
        return True
    try:
        process = psutil.Process(int(info["pid"]))
        return abs(process.create_time() - float(info["started"])) < 1.0
    except psutil.ZombieProcess:  # a subclass of NoSuchProcess: catch it first
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied and the like: cannot check
        return True
    except (KeyError, ValueError, TypeError):
        return False
