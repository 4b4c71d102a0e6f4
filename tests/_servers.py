"""Real servers for the scaling-out tests: an MLflow tracking server and a PostgreSQL server.

Both run on a free 127.0.0.1 port in their own process group with their files in a temp folder, and
are stopped (the whole process group, by its id) when the context exits.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout: float, what: str) -> None:
    """Poll ``url`` until it answers 200; RuntimeError with the server's log tail if ``proc`` exits
    first or ``timeout`` s pass."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n" + log.read_text()[-4000:])
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{what} not up after {timeout} s:\n" + log.read_text()[-4000:])
        time.sleep(0.5)


def _stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group started with ``proc`` (its own session), SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
        except ProcessLookupError:
            pass
    try:  # workers left behind by a leader that exited first
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- MLflow ------------------------------------------------------------------------------------------

def mlflow_server_cmd(root: Path, port: int) -> list[str]:
    """A server whose clients upload and download artifacts through it (remote users need nothing
    but the URL): SQL backend, no --default-artifact-root, so new experiments get the proxied
    ``mlflow-artifacts:/`` location stored under --artifacts-destination."""
    return [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow-server.db'}",
            "--artifacts-destination", str(root / "mlartifacts"), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


@contextmanager
def mlflow_server(root: Path, cmd: list[str] | None = None, port: int | None = None,
                  timeout: float = 180) -> Iterator[str]:
    """Run ``mlflow server`` (``cmd``, default ``mlflow_server_cmd``) in ``root``; yields its URL."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = cmd or mlflow_server_cmd(root, port)
    log = (root / "mlflow-server.log").open("w")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url + "/health", root / "mlflow-server.log", timeout, "mlflow server")
        yield url
    finally:
        _stop_group(proc)
        log.close()


# -- PostgreSQL --------------------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    """Folder with initdb and pg_ctl: Debian's /usr/lib/postgresql/<version>/bin, else the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
                   if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def require_postgres() -> Path:
    """The binaries folder, or skip the test saying how to get PostgreSQL."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: `make sysdeps` as root installs "
                    "Debian's postgresql package (apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and initdb refuses root: no 'postgres' user to run it as")
        if not shutil.which("runuser"):
            pytest.skip("running as root, and initdb refuses root: runuser (util-linux) not found")
    return bindir


@contextmanager
def postgres_server(database: str = "optuna", driver: str = "psycopg2", timeout: float = 60) -> Iterator[str]:
    """A throwaway PostgreSQL server (trust auth, 127.0.0.1, free port) with ``database``; yields
    ``postgresql+<driver>://postgres@127.0.0.1:<port>/<database>`` (``driver=""``: ``postgresql://``,
    SQLAlchemy's default driver, which is psycopg 3 since SQLAlchemy 2.1, psycopg2 before).
    As root it runs as the ``postgres`` user."""
    bindir = require_postgres()
    as_root = os.geteuid() == 0
    # pytest's tmp_path is private to root (0700): use a folder the postgres user can own
    base = Path(tempfile.mkdtemp(prefix="srgan-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if as_root:
        pw = pwd.getpwnam("postgres")
        for p in (base, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []

    def run(*args: str) -> None:
        out = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout)
        if out.returncode:
            raise RuntimeError(f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")

    port = free_port()
    started = False
    try:
        try:
            run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                "--no-locale", "--no-sync")
            started = True  # from here on, stop it in any case (pg_ctl start may time out half-way)
            run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w",
                "-t", str(int(timeout)), "-o", f"-h 127.0.0.1 -p {port} -k {sock} -F", "start")
        except RuntimeError as exc:
            log = base / "server.log"
            raise RuntimeError(f"{exc}\n{log.read_text()[-3000:] if log.exists() else ''}") from None
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        yield f"{scheme}://postgres@127.0.0.1:{port}/{database}"
    finally:
        if started:
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=timeout)
        shutil.rmtree(base, ignore_errors=True)
