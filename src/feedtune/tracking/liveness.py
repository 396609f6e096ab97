"""Which process on which machine does a piece of work, and whether it is still alive.

File storages (Optuna journal, MLflow SQLite) have no heartbeat: a process killed with SIGKILL
leaves its trial and its runs RUNNING. Recording host, pid and the process's start time lets
the next feedtune process on the same machine tell a dead worker from a live one (the start
time guards against pid reuse).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import psutil


def worker_info() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": round(psutil.Process().create_time(), 3),
    }


def is_alive(info: dict[str, Any]) -> bool:
    """False only when ``info`` names a process on this machine that no longer exists."""
    if info.get("host") != socket.gethostname():
        return True  # another machine's worker: only RDB heartbeats can tell
    try:
        process = psutil.Process(int(info["pid"]))
        return abs(process.create_time() - float(info["started"])) < 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False
