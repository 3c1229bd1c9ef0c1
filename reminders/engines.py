"""The process' SQLAlchemy engines, one per database (and variant), made on first use.

An engine holds a pool of connections, so the state DB, the business DB and each check timeout get
one engine for the life of the process rather than one per command or request. Tests, forks and a
reload let them go with :meth:`EngineCache.dispose`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

from sqlalchemy.engine import Engine


class EngineCache:
    """Engines by URL (and a variant such as a timeout), each made once by its ``create``."""

    def __init__(self) -> None:
        self._engines: dict[tuple[str, Hashable], Engine] = {}
        self._lock = threading.Lock()

    def get(self, url: str, create: Callable[[], Engine], variant: Hashable = None) -> Engine:
        """The engine for ``url`` and ``variant``, made by ``create()`` the first time."""
        key = (url, variant)
        engine = self._engines.get(key)
        if engine is not None:
            return engine
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = create()
        return engine

    def dispose(self, matching: str | None = None) -> None:
        """Close the pooled connections of every engine whose URL contains ``matching`` (every
        engine when None) and forget them: the next ``get`` makes a new one."""
        with self._lock:
            for key in [k for k in self._engines if matching is None or matching in k[0]]:
                self._engines.pop(key).dispose()
