"""A real PostgreSQL server for tests: a throwaway cluster on a free 127.0.0.1 port, no manual steps.

Binaries: $KVSTRATA_PG_BINDIR, else the newest /usr/lib/postgresql/*/bin (Debian's `postgresql`
package: `apt-get install -y postgresql`), else `postgres` / `initdb` on PATH.

PostgreSQL refuses to run as root. When the tests run as root (as on CI), initdb and postgres run as
an unprivileged user: `postgres` if that account exists (the Debian package creates it), else
`nobody`, via subprocess's `user=`/`group=` (setuid in the child; no sudo/runuser needed). The
cluster directory is created with mkdtemp under the system temp dir (/tmp) and chowned to that user.
The cluster is made for speed, not durability (`fsync=off`, see DEFAULT_SETTINGS): tests kill
clients, never the server.
Clients connect over TCP with `trust` auth as user `kvstrata`; Unix sockets are off.

Anything that goes wrong raises PostgresServerError with the server's log: tests that need
PostgreSQL fail loudly, they never skip.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

SUPERUSER = "kvstrata"
APT_HINT = "install the server binaries: apt-get install -y postgresql (Debian), or set KVSTRATA_PG_BINDIR"


class PostgresServerError(RuntimeError):
    pass


def find_bindir() -> Path:
    env = os.environ.get("KVSTRATA_PG_BINDIR")
    if env:
        if not (Path(env) / "postgres").is_file():
            raise PostgresServerError(f"KVSTRATA_PG_BINDIR={env} has no `postgres` binary")
        return Path(env)

    def version(p: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.split("/")[-3])) or (0,)

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=version, reverse=True)
    for c in candidates:
        if (Path(c).parent / "initdb").is_file():
            return Path(c).parent
    found = shutil.which("postgres")
    if found and shutil.which("initdb"):
        return Path(found).parent
    raise PostgresServerError(f"no PostgreSQL server binaries (postgres, initdb) found: {APT_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account to run PostgreSQL as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresServerError("running as root, and neither a `postgres` nor a `nobody` account exists; "
                              "create one (useradd -r postgres) so PostgreSQL can run unprivileged")


class PostgresServer:
    """One postgres process with its own cluster; `url` is the maintenance database's URL."""

    # Server settings (-c name=value); made for test speed. Pass `settings` to override, e.g.
    # {"fsync": "on", "full_page_writes": "on"} to measure a durable server.
    DEFAULT_SETTINGS = {
        "listen_addresses": "127.0.0.1", "unix_socket_directories": "", "fsync": "off",
        "full_page_writes": "off", "max_connections": "200", "dynamic_shared_memory_type": "mmap",
        "shared_buffers": "32MB",
    }

    def __init__(self, port: int | None = None, *, settings: dict[str, str] | None = None) -> None:
        self.settings = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self.bindir = find_bindir()
        self.port = port or free_port()
        self.user = _run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="kvstrata-pg-"))
        self.data = self.dir / "data"
        self.proc: subprocess.Popen | None = None
        if self.user is not None:  # the cluster must belong to the account the server runs as
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
            os.chmod(self.dir, 0o700)

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def _popen(self, args: list[str], **kw) -> subprocess.Popen:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C",
               "HOME": str(self.dir), "TZ": "UTC"}
        if self.user is not None:
            kw.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        return subprocess.Popen(args, env=env, cwd=self.dir, stdin=subprocess.DEVNULL, **kw)

    def _initdb(self) -> None:
        p = self._popen([str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                         "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = p.communicate(timeout=120)
        if p.returncode != 0:
            raise PostgresServerError(f"initdb failed ({p.returncode}) in {self.data}:\n{out.decode(errors='replace')}")

    def start(self, timeout_s: float = 60.0) -> "PostgresServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        log = open(self.log_path, "ab")
        if self.user is not None:
            os.chown(self.log_path, self.user.pw_uid, self.user.pw_gid)
        args = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        self.proc = self._popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PostgresServerError(f"postgres exited with {self.proc.returncode} on port {self.port}:\n"
                                          f"{self._log_tail()}")
            if self._ready():
                logger.info("PostgreSQL %s up on 127.0.0.1:%d (%s)", self.bindir, self.port, self.dir)
                return self
            time.sleep(0.1)
        self.stop()
        raise PostgresServerError(f"postgres did not accept connections within {timeout_s}s:\n{self._log_tail()}")

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def create_database(self, prefix: str = "t") -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, checkpoint
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
