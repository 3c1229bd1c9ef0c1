"""The HTTP transports of the Twilio channel: ``twilio``'s ``HttpClient`` interface, twice.

- :class:`DirectHttpClient`, when the API is reached directly (no proxy): requests on kept-alive
  connections of the project's own lean HTTP/1.1 client (:mod:`reminders.channels.http1`), which
  tells a failure before the request left (safe to resend) from one after (ambiguous) exactly.
- :class:`Urllib3HttpClient`, when the environment names a proxy for the API (``HTTPS_PROXY``,
  ``HTTP_PROXY``, ``ALL_PROXY``, SOCKS through PySocks, ``NO_PROXY`` honoured): urllib3's
  ``ProxyManager`` (CONNECT tunnels, proxy credentials), as before.

:func:`http_client` picks one. twilio's own ``TwilioHttpClient`` sends through ``requests`` (a
prepared request, hooks, a cookie jar, the adapter, environment merging) before urllib3 does the
work; both of these build the request themselves. Everything a send needs from the environment
(proxy, CA bundle) is read once, when the client is built.

What they send is what ``requests`` sent for twilio: the form (or JSON) body, the query string,
the Basic ``Authorization`` header and twilio's own headers (User-Agent, Accept, ...). They never
retry and never follow a redirect (the engine retries, and records every attempt); their
exceptions are left to the caller (:func:`reminders.channels.twilio.twilio_error` maps them).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
from base64 import b64encode
from typing import Any
from urllib.parse import urlencode, urlsplit

import certifi
import urllib3
from requests.utils import (
    get_auth_from_url,
    get_environ_proxies,
    prepend_scheme_if_needed,
    select_proxy,
)
from twilio.http import HttpClient
from twilio.http.request import Request as TwilioRequest
from twilio.http.response import Response
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import parse_url
from urllib3.util.ssl_ import create_urllib3_context

from reminders.channels import http1
from reminders.errors import ConfigError
from reminders.phone import mask_numbers_in

logger = logging.getLogger(__name__)

FORM = "application/x-www-form-urlencoded"
_JSON_TYPES = frozenset({"application/json", "application/scim+json"})
_CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
_TARGETS = 16  # URLs whose pool and path are kept (see Urllib3HttpClient._open)


def ca_bundle() -> str:
    """The CA bundle (a file or a directory) that TLS connections trust.

    ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` or ``SSL_CERT_FILE`` when set, else certifi's
    bundle: what ``requests`` trusted.
    """
    for name in _CA_VARIABLES:
        value = os.environ.get(name)
        if value:
            return value
    return certifi.where()


def environ_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY),
    chosen as ``requests`` chooses it, or None."""
    proxy = select_proxy(url, get_environ_proxies(url))
    return prepend_scheme_if_needed(proxy, "http") if proxy else None


def basic_auth(user: str, password: str) -> str:
    """An ``Authorization`` value, encoded as ``requests.auth.HTTPBasicAuth`` encodes it."""
    token = b64encode(user.encode("latin1") + b":" + password.encode("latin1")).decode("ascii")
    return f"Basic {token}"


def http_client(
    base_url: str, *, maxsize: int, timeout: float, log: logging.Logger = logger
) -> DirectHttpClient | Urllib3HttpClient:
    """The transport for ``base_url``: urllib3 behind the proxy the environment names for it,
    else the direct one."""
    if environ_proxy(base_url) is not None:
        return Urllib3HttpClient(base_url, maxsize=maxsize, timeout=timeout, log=log)
    return DirectHttpClient(base_url, maxsize=maxsize, timeout=timeout, log=log)


def _form_body(sent: dict[str, str], data: dict[str, object] | None) -> bytes | None:
    """The request's body: JSON for a JSON content type, else the form (``Content-Type`` set on
    ``sent`` when absent), as ``requests`` encoded it for twilio; None without data."""
    if not data:
        return None
    content_type = sent.get("Content-Type")
    if content_type in _JSON_TYPES:
        return json.dumps(data, allow_nan=False).encode()
    if content_type is None:
        sent["Content-Type"] = FORM
    return form_encode(data).encode("ascii")


# quote_plus(safe=""), a byte at a time: what urlencode writes for each byte of UTF-8
_SAFE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~"
_FORM_TABLE = {b: chr(b) if b in _SAFE else "+" if b == 32 else f"%{b:02X}" for b in range(256)}


def form_encode(data: dict[str, object]) -> str:
    """``urlencode(data, doseq=True)``, the same text, with each string field encoded by one
    ``str.translate`` instead of a Python step a character (about 10 us less a message).
    Anything but a string key and value is left to ``urlencode``."""
    parts = []
    for key, value in data.items():
        if type(key) is str and type(value) is str:
            parts.append(
                key.encode().decode("latin-1").translate(_FORM_TABLE)
                + "="
                + value.encode().decode("latin-1").translate(_FORM_TABLE)
            )
        else:
            parts.append(urlencode({key: value}, doseq=True))
    return "&".join(p for p in parts if p)


class _Credentials:
    """The ``Authorization`` value of each (user, password), encoded once."""

    _auth: dict[tuple[str, str], str]

    def _authorization(self, auth: tuple[str, str]) -> str:
        value = self._auth.get(auth)
        if value is None:
            value = basic_auth(*auth)
            if len(self._auth) >= 8:  # credentials that change: keep a few, not every one
                self._auth.clear()
            self._auth[auth] = value
        return value


class DirectHttpClient(_Credentials, HttpClient):
    """twilio's ``HttpClient`` on :mod:`reminders.channels.http1`: no proxy.

    ``maxsize`` connections are kept an origin, and no more are opened: a request waits for a
    free one (so batches sent at once share them). ``timeout`` (seconds) is the connect timeout
    and the timeout of each read and write. A forked child opens its own connections. Failures
    are :class:`http1.HTTPFailure` (``NotSent`` or ``MaybeSent``).
    """

    proxy_url = None

    def __init__(
        self,
        base_url: str,
        *,
        maxsize: int,
        timeout: float,
        log: logging.Logger = logger,
    ) -> None:
        super().__init__(log, is_async=False, timeout=timeout)
        self.maxsize = maxsize
        self.ca_bundle = ca_bundle()
        self._ssl_context: ssl.SSLContext | None = None
        self.pools = http1.Pools(maxsize, timeout, None)
        if urlsplit(base_url).scheme == "https":  # a wrong CA bundle shows at start
            self._context()
        self._auth: dict[tuple[str, str], str] = {}
        # url -> (its origin, the request target, the Host value): see _target
        self._targets: dict[str, tuple[http1.Origin, str, str]] = {}

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            try:
                self._ssl_context = _ssl_context(self.ca_bundle)
            except (OSError, ssl.SSLError) as exc:  # a wrong path would fail every send
                raise ConfigError(
                    f"channels.sms: cannot load the CA bundle {self.ca_bundle}: {exc}"
                ) from exc
            self.pools.context = self._ssl_context
        return self._ssl_context

    def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        """Send one request and read its whole answer. Redirects are never followed."""
        method = method.upper()
        if timeout is not None and timeout <= 0:
            raise ValueError(timeout)
        sent = dict(headers) if headers else {}
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params, doseq=True)
        body = _form_body(sent, data)
        if auth is not None:
            sent["Authorization"] = self._authorization(auth)
        origin, target, host = self._target(url)
        head = http1.request_head(method, target, host, sent, body)
        pool = self.pools.get(origin)
        answer = pool.request(method, head + body if body else head, timeout)
        response = Response(answer.status, answer.body.decode("utf-8", "replace"), answer.headers)
        if self.logger.isEnabledFor(logging.DEBUG):  # never the form or the headers
            path = mask_numbers_in(url.split("?", 1)[0])
            self.logger.debug("Twilio %s %s: HTTP %s", method, path, answer.status)
        return response

    def _target(self, url: str) -> tuple[http1.Origin, str, str]:
        """The origin, request target and Host value of ``url``, kept a URL (the same few URLs
        are asked again and again)."""
        found = self._targets.get(url)
        if found is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {url!r}")
            if parts.scheme == "https":
                self._context()
            port = parts.port or (443 if parts.scheme == "https" else 80)
            origin = http1.Origin(parts.scheme, parts.hostname, port)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            if len(self._targets) >= _TARGETS:
                self._targets.clear()  # URLs with changing query strings: keep a few
            found = self._targets[url] = (origin, target, origin.host_header)
        return found

    def close(self) -> None:
        """Close every idle connection (new ones are opened if the client is used again)."""
        self._targets.clear()
        self.pools.close()


class _OneWrite:
    """A connection that writes a request's headers and its body in one ``send``.

    http.client writes the header block, then the body: two writes, so two TCP segments and two
    wake-ups of the server for a message of a few hundred bytes, each a system call that costs
    the sender more CPU than all the rest of building the request on loopback. Here the headers
    wait for the body (a request with a ``bytes`` body; any other is written as before).
    """

    _hold = False  # the next send is the header block of a request whose body follows
    _held: bytes | None = None

    def request(self, method: str, url: str, body: Any = None, *args: Any, **kw: Any) -> None:
        self._hold, self._held = isinstance(body, bytes) and bool(body), None
        try:
            super().request(method, url, body, *args, **kw)  # type: ignore[misc]
        finally:
            self._hold, self._held = False, None

    def send(self, data: Any) -> None:
        if self._hold:  # the header block: written with the body
            self._hold, self._held = False, bytes(data)
            return
        held, self._held = self._held, None
        super().send(held + data if held is not None else data)  # type: ignore[misc]


class _OneWriteHTTPConnection(_OneWrite, HTTPConnection):
    pass


class _OneWriteHTTPSConnection(_OneWrite, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _OneWriteHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _OneWriteHTTPSConnection


class Urllib3HttpClient(_Credentials, HttpClient):
    """twilio's ``HttpClient`` on one ``urllib3.PoolManager`` (a ``ProxyManager`` behind a proxy).

    ``base_url`` is the API's URL, read for the proxy the environment names for it. ``maxsize``
    connections are kept a host, and no more are opened: a request waits for a free one (so batches
    sent at once share them). ``timeout`` (seconds) is the connect and the read timeout.
    A forked child builds its own pool rather than share its parent's sockets.
    """

    def __init__(
        self,
        base_url: str,
        *,
        maxsize: int,
        timeout: float,
        log: logging.Logger = logger,
    ) -> None:
        super().__init__(log, is_async=False, timeout=timeout)
        self.maxsize = maxsize
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self.proxy_url = environ_proxy(base_url)
        self.ca_bundle = ca_bundle()
        try:
            self._ssl_context = _ssl_context(self.ca_bundle)
        except (OSError, ssl.SSLError) as exc:  # a wrong path would fail every send
            raise ConfigError(
                f"channels.sms: cannot load the CA bundle {self.ca_bundle}: {exc}"
            ) from exc
        self._auth: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.pool = self._new_pool()
        # url -> (the manager, its pool for the URL's host, the request's path): see _open
        self._targets: dict[str, tuple[urllib3.PoolManager, HTTPConnectionPool, str]] = {}

    def _new_pool(self) -> urllib3.PoolManager:
        settings: dict[str, Any] = {
            "num_pools": 4,
            "maxsize": self.maxsize,
            "block": True,
            "retries": False,
            "timeout": self._timeout,
            "cert_reqs": "CERT_REQUIRED",
            "ssl_context": self._ssl_context,
        }
        proxy = self.proxy_url
        if proxy is None:
            manager = urllib3.PoolManager(**settings)
            manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
            return manager
        if proxy.lower().startswith("socks"):
            try:
                from urllib3.contrib.socks import SOCKSProxyManager
            except ImportError:  # PySocks is not installed
                raise ConfigError(
                    "channels.sms: the environment names a SOCKS proxy for Twilio; "
                    "install PySocks or set NO_PROXY"
                ) from None
            username, password = get_auth_from_url(proxy)
            return SOCKSProxyManager(
                proxy, username=username or None, password=password or None, **settings
            )
        username, password = get_auth_from_url(proxy)
        headers = {"Proxy-Authorization": basic_auth(username, password)} if username else None
        return urllib3.ProxyManager(
            proxy, proxy_headers=headers, proxy_ssl_context=self._ssl_context, **settings
        )

    def _pool(self) -> urllib3.PoolManager:
        if self._pid == os.getpid():
            return self.pool
        with self._lock:  # a forked child: its parent's connections are not its own
            if self._pid != os.getpid():
                self.pool = self._new_pool()
                self._pid = os.getpid()
            return self.pool

    def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        """Send one request and read its whole answer. Redirects are never followed."""
        method = method.upper()
        if timeout is None:
            timeouts = self._timeout
        elif timeout <= 0:
            raise ValueError(timeout)
        else:
            timeouts = urllib3.Timeout(connect=timeout, read=timeout)
        self._test_only_last_response = None
        self._test_only_last_request = TwilioRequest(
            method=method, url=url, auth=auth, params=params, data=data, headers=headers
        )
        sent = dict(headers) if headers else {}
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params, doseq=True)
        body = _form_body(sent, data)
        if auth is not None:
            sent["Authorization"] = self._authorization(auth)
        answer = self._open(
            method, url, body=body, headers=sent, retries=False, redirect=False, timeout=timeouts
        )
        response = Response(answer.status, answer.data.decode("utf-8", "replace"), answer.headers)
        if self.logger.isEnabledFor(logging.DEBUG):  # never the form or the headers
            path = mask_numbers_in(url.split("?", 1)[0])
            self.logger.debug("Twilio %s %s: HTTP %s", method, path, answer.status)
        self._test_only_last_response = response
        return response

    def _open(self, method: str, url: str, **kw: Any) -> urllib3.BaseHTTPResponse:
        """``PoolManager.urlopen`` without parsing the URL and looking its host's pool up again
        at every request: both are kept a URL (the same few URLs are asked again and again).
        Behind a proxy, the manager's own ``urlopen`` (it adds the proxy's headers)."""
        manager = self._pool()
        if self.proxy_url is not None:
            return manager.urlopen(method, url, **kw)
        target = self._targets.get(url)
        if target is None or target[0] is not manager:
            u = parse_url(url)
            pool = manager.connection_from_host(u.host, port=u.port, scheme=u.scheme)
            if len(self._targets) >= _TARGETS:
                self._targets.clear()  # URLs with changing query strings: keep a few
            target = self._targets[url] = (manager, pool, u.request_uri)
        kw["assert_same_host"] = False
        return target[1].urlopen(method, target[2], **kw)

    def close(self) -> None:
        """Close every pooled connection (the pool opens new ones if used again)."""
        self._targets.clear()
        self.pool.clear()


def _ssl_context(bundle: str) -> ssl.SSLContext:
    """One verifying context for every connection, its CA bundle loaded once."""
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    if os.path.isdir(bundle):
        context.load_verify_locations(capath=bundle)
    else:
        context.load_verify_locations(cafile=bundle)
    return context
