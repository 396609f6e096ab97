"""Real servers for the scale-out and browser tests: a throw-away PostgreSQL cluster, a real
``mlflow server`` and the system Chromium. Registered as fixtures in ``tests/conftest.py``.

A component that is not installed skips its tests with a reason that says how to install it;
under CI (``CI=true``) it fails them instead, so a CI machine cannot pass by skipping.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# Flags that let the system Chromium run headless as root in a container, offline
# (Playwright adds --headless and a fresh --user-data-dir itself).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def require(available: bool, what: str, how: str) -> None:
    """Skip (outside CI) or fail (``CI=true``) when ``what`` is missing; ``how`` installs it."""
    if available:
        return
    message = f"{what} is not available; install it with: {how}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: a missing component fails the test)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries, or ``initdb`` on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    root: Path

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            conn.execute(sql)


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """The server refuses to run as root: run its tools as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def start_postgres(root: Path) -> PostgresServer:
    """initdb + pg_ctl start of a cluster in ``root`` (trust auth, 127.0.0.1 only, no fsync)."""
    bin_dir = postgres_bin()
    assert bin_dir is not None
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, log, user = root / "data", root / "server.log", "feedtune"
    made = subprocess.run(
        _as_postgres_user(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", user, "-A", "trust"]
            + ["-E", "UTF8", "--locale=C", "--no-sync"]
        ),
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise RuntimeError(f"initdb failed: {made.stdout}\n{made.stderr}")
    port = free_port()
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    started = subprocess.run(
        _as_postgres_user(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options]
            + ["-w", "-t", "60", "start"]
        ),
        capture_output=True,
        text=True,
    )
    if started.returncode != 0:
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n{_tail(log)}")
    return PostgresServer("127.0.0.1", port, user, root)


def stop_postgres(server: PostgresServer) -> None:
    bin_dir = postgres_bin()
    if bin_dir is not None:
        subprocess.run(
            _as_postgres_user(
                [str(bin_dir / "pg_ctl"), "-D", str(server.root / "data"), "-m", "immediate"]
                + ["-w", "stop"]
            ),
            capture_output=True,
        )
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL cluster for the whole session, stopped and deleted at the end."""
    require(
        postgres_bin() is not None,
        "PostgreSQL (initdb, pg_ctl)",
        "apt-get install postgresql",
    )
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's driver for postgresql:// URLs)
    except ImportError:
        require(False, "psycopg (the PostgreSQL driver)", ".venv/bin/pip install -e '.[test]'")
    if os.geteuid() == 0:
        require(
            shutil.which("runuser") is not None and _user_exists("postgres"),
            "the 'postgres' system user (root cannot run the server)",
            "apt-get install postgresql",
        )
    # Not under pytest's tmp dir: that is private to root, and the server runs as 'postgres'.
    root = Path(tempfile.mkdtemp(prefix="feedtune-pg-"))
    try:
        server = start_postgres(root)
    except BaseException:
        stop_postgres(PostgresServer("127.0.0.1", 0, "", root))
        raise
    try:
        yield server
    finally:
        stop_postgres(server)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """``postgresql://...`` of a fresh, empty database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.admin(f'CREATE DATABASE "{name}"')
    yield postgres_server.url(name)
    postgres_server.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- mlflow server


@dataclass
class MlflowServer:
    url: str
    backend_uri: str
    artifacts: Path
    log: Path
    command: list[str]


def start_mlflow_server(folder: Path, *, template_db: Path | None = None) -> tuple:
    """``mlflow server`` on 127.0.0.1:<free port>, SQLite backend, artifacts served by the server
    from ``folder/artifacts``; returns (server, process) once ``/health`` answers."""
    db, artifacts, log = folder / "mlflow.db", folder / "artifacts", folder / "server.log"
    if template_db is not None:  # skip the schema migrations (seconds)
        shutil.copy(template_db, db)
    artifacts.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backend = f"sqlite:///{db}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown ends its workers too
        )
    server = MlflowServer(url, backend, artifacts, log, command)
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server, proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_group(proc)
            raise RuntimeError(f"mlflow server did not answer /health:\n{_tail(log)}")
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, _empty_mlflow_db: Path
) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` for the session (tests use their own experiment names)."""
    server, proc = start_mlflow_server(
        tmp_path_factory.mktemp("mlflow-server"), template_db=_empty_mlflow_db
    )
    try:
        yield server
    finally:
        stop_process_group(proc)


@pytest.fixture
def mlflow_server_store(
    mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MlflowServer]:
    """``MLFLOW_TRACKING_URI`` (for subprocesses too) points at the real ``mlflow server``."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow_server
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


# --------------------------------------------------------------------------- browser


@pytest.fixture
def chromium_browser() -> Iterator[object]:
    """Headless system Chromium driven by Playwright (no browser download). Per test: the sync
    API leaves its event loop set as running, which would break later tests that use asyncio."""
    require(os.access(CHROMIUM, os.X_OK), f"Chromium ({CHROMIUM})", "apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "Playwright (Python package)", ".venv/bin/pip install -e '.[test]'")
    # launch() gives the browser a fresh temporary profile (--user-data-dir) of its own.
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
