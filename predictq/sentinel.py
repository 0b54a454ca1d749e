"""Redis Sentinel: the ``sentinel://`` URL form, its checks, and clients that follow failovers.

The URL is Celery's and kombu's: one ``sentinel://`` entry per sentinel,
separated by ``;``, each ``sentinel://[[user]:password@]host[:port][/db]``
(port 26379 by default). The user and password are the data nodes' (the
master's), as in kombu and Celery; the sentinels' own password, if they have
one, is ``PREDICTQ_SENTINEL_PASSWORD``, and the master set's name is
``PREDICTQ_SENTINEL_MASTER``, neither of which the URL can carry. TLS is
asked for the way ``rediss://`` asks for it, with ``ssl_cert_reqs``,
``ssl_ca_certs``, ``ssl_certfile`` and ``ssl_keyfile`` query options; they
apply to the sentinels and to the master alike.

Three consumers read this module, and all three must agree on the same master:

* ``predictq.redis_client`` builds predictq's own redis-py clients with
  ``redis.sentinel.Sentinel.master_for`` (``master_client``);
* ``predictq.celeryconf`` gives Celery the URL without the TLS options (kombu
  and Celery would take them for connection arguments) and the same options as
  ``broker_transport_options`` / ``result_backend_transport_options``
  (``master_name``, ``sentinel_kwargs``) and ``broker_use_ssl`` /
  ``redis_backend_use_ssl`` (``celery_options``);
* ``predictq.settings`` explains a malformed URL in one line (``parse``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
import redis.sentinel

from predictq.errors import ConfigError

SCHEME: Final = "sentinel"
DEFAULT_PORT: Final = 26379
#: Query options of a Sentinel URL: the TLS options ``rediss://`` takes.
TLS_OPTIONS: Final = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS: Final = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` is a Sentinel URL (its first entry is ``sentinel://``)."""
    return url.strip().lower().startswith(SCHEME + "://")


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed Sentinel URL: where the sentinels are and how to reach the master."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: TLS options as redis-py takes them; empty: plain TCP.
    tls: dict[str, Any] = field(default_factory=dict)

    def celery_url(self) -> str:
        """The URL for Celery and kombu: every entry spelled out, no query options."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(
            f"{SCHEME}://{auth}{_host_text(host)}:{port}/{self.db}" for host, port in self.sentinels
        )


def parse(url: str, *, name: str) -> SentinelUrl:
    """Parse a Sentinel URL; ``ConfigError`` names ``name`` and says what is wrong in one line."""
    entries = [_entry(text.strip(), i + 1, name=name) for i, text in enumerate(url.split(";"))]
    first = entries[0]
    # kombu and Celery read the database, credentials and options of the first
    # entry only: later entries may repeat them or leave them out, not differ.
    for entry in entries[1:]:
        for what in ("db", "username", "password", "tls"):
            value = getattr(entry, what)
            if value and value != getattr(first, what):
                raise ConfigError(
                    f"{name}: entry {entry.index} gives another {_WHAT[what]} than entry 1; all "
                    "sentinels lead to one master: give it on the first entry only"
                )
    addresses = [(e.host, e.port) for e in entries]
    for address in addresses:
        if addresses.count(address) > 1:
            raise ConfigError(f"{name}: sentinel {address[0]}:{address[1]} is listed twice")
    return SentinelUrl(
        sentinels=tuple(addresses),
        db=first.db or 0,
        username=first.username,
        password=first.password,
        tls=first.tls,
    )


_WHAT: Final = {"db": "database", "username": "user", "password": "password", "tls": "TLS option"}


@dataclass(frozen=True)
class _Entry:
    index: int
    host: str
    port: int
    db: int | None
    username: str | None
    password: str | None
    tls: dict[str, Any]


def _entry(text: str, index: int, *, name: str) -> _Entry:
    where = f"{name}: entry {index}"
    if not text:
        raise ConfigError(
            f"{where} is empty; expected sentinel://host:port[/db] entries separated by ';'"
        )
    scheme, sep, _ = text.partition("://")
    if not sep or scheme.lower() != SCHEME:
        # Only the scheme is shown: the rest of an entry may hold a password.
        shown = f"starts with {scheme}://" if sep else "has no scheme"
        raise ConfigError(
            f"{where} {shown}; every entry of a Sentinel URL must be "
            "sentinel://host:port (one scheme per URL: Sentinel, or one redis:// server)"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
        host = parts.hostname
    except ValueError as e:
        raise ConfigError(f"{where}: expected host:port with a port 1-65535 ({e})") from e
    if not host:
        raise ConfigError(f"{where}: expected sentinel://host:port, found no host")
    if port == 0:
        raise ConfigError(f"{where}: expected a port 1-65535, got 0")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ConfigError(f"{where}: expected a database number after the port (/0), got /{path}")
    return _Entry(
        index=index,
        host=host,
        port=port or DEFAULT_PORT,
        db=int(path) if path else None,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=_tls(parts.query, where),
    )


def _tls(query: str, where: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in TLS_OPTIONS:
            raise ConfigError(
                f"{where}: unknown option {key!r}; Sentinel URLs take {', '.join(TLS_OPTIONS)}"
            )
        if key == "ssl_cert_reqs":
            if value.lower() not in _CERT_REQS:
                raise ConfigError(
                    f"{where}: ssl_cert_reqs must be required, optional or none, got {value!r}"
                )
            options[key] = _CERT_REQS[value.lower()]
        else:
            options[key] = value
    if options:
        options.setdefault("ssl_cert_reqs", ssl.CERT_REQUIRED)
    return options


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def sentinel_kwargs(
    url: SentinelUrl, *, password: str | None, socket_timeout_s: float
) -> dict[str, Any]:
    """Connection arguments for the sentinels themselves (not the master)."""
    # Without explicit socket timeouts here redis-py and Celery connect to the
    # sentinels with none at all (Celery passes `sentinel_kwargs={}`, and
    # redis-py copies the socket options only when it gets None): a sentinel
    # host that vanished without a TCP reset would hang every master lookup.
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
    }
    if password is not None:
        kwargs["password"] = password
    if url.tls:
        kwargs["ssl"] = True
        kwargs.update(url.tls)
    return kwargs


def celery_options(
    url: str, *, master: str, password: str | None, socket_timeout_s: float
) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """(URL for Celery, transport options to add, TLS dict or None) for one Sentinel URL."""
    parsed = parse(url, name="url")
    options = {
        "master_name": master,
        "sentinel_kwargs": sentinel_kwargs(
            parsed, password=password, socket_timeout_s=socket_timeout_s
        ),
    }
    return parsed.celery_url(), options, (dict(parsed.tls) or None)


class SentinelRedis(redis.Redis):
    """The master's client from ``master_client``; ``close`` also closes the sentinel clients."""

    #: The Sentinel manager that found the master (``Redis.sentinel`` is a command).
    sentinels: redis.sentinel.Sentinel | None = None

    def close(self) -> None:
        super().close()
        if self.sentinels is not None:
            self.sentinels.close()


def master_client(
    url: str,
    *,
    master: str,
    password: str | None,
    socket_timeout_s: float,
    **connection_kwargs: Any,
) -> redis.Redis:
    """A client of the current master of ``master``, following failovers.

    redis-py asks the sentinels for the master's address whenever it opens a
    connection, drops idle connections to an old master when the address
    changes, and turns a READONLY reply (the old master was demoted to a
    replica) into a ConnectionError, so callers' reconnect-and-retry paths
    carry them to the new master.
    """
    parsed = parse(url, name="url")
    # redis-py types Sentinel (and master_for) from 8.2 on; before, untyped calls.
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        list(parsed.sentinels),
        sentinel_kwargs=sentinel_kwargs(
            parsed, password=password, socket_timeout_s=socket_timeout_s
        ),
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        **connection_kwargs,
    )
    master_kwargs: dict[str, Any] = {"db": parsed.db, **parsed.tls}
    if parsed.tls:
        master_kwargs["ssl"] = True
    if parsed.username is not None:
        master_kwargs["username"] = parsed.username
    if parsed.password is not None:
        master_kwargs["password"] = parsed.password
    client: SentinelRedis = sentinel.master_for(  # type: ignore[no-untyped-call,unused-ignore]
        master, redis_class=SentinelRedis, **master_kwargs
    )
    client.sentinels = sentinel
    return client
