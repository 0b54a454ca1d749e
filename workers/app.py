"""The worker-side Celery app: ``celery -A workers worker --pool threads``.

The app is created at import, but configured lazily: Celery evaluates the
``add_defaults`` callable the first time it reads its configuration (when the
worker starts), and only then are settings read from the environment.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
from typing import Any

import click
from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

from predictq.celeryconf import celery_config
from predictq.codec import register_serializer
from predictq.errors import ConfigError
from predictq.settings import Settings
from workers.results import TRACEBACKS_CONF, result_backend

log = logging.getLogger(__name__)

#: kombu's Redis transport with predictq's message guard (workers/transport.py).
GUARDED_TRANSPORT = "workers.transport:Transport"
#: kombu's Sentinel transport with the same guard.
GUARDED_SENTINEL_TRANSPORT = "workers.transport:SentinelTransport"


@functools.cache
def worker_settings() -> Settings:
    """The worker process's settings, read from the environment once."""
    return Settings.from_env()


def _configure() -> dict[str, Any]:
    settings = worker_settings()
    register_serializer()
    config = celery_config(settings)
    # Read by the result backend (workers/results.py, app.backend_cls below).
    config[TRACEBACKS_CONF] = settings.result_tracebacks
    # The message guard: kombu's Redis channel that survives list items that are
    # not kombu messages (workers/transport.py), and Celery's consumer behind a
    # check of every header and body (workers/consumer.py, workers/guard.py).
    config["worker_consumer"] = "workers.consumer:PredictqConsumer"
    # kombu resolves the transport from the URL scheme through its alias table:
    # in a worker process, redis:// and rediss:// name the guarded transport, so
    # URLs, TLS defaults and log lines stay exactly kombu's own.
    TRANSPORT_ALIASES.update(
        redis=GUARDED_TRANSPORT, rediss=GUARDED_TRANSPORT, sentinel=GUARDED_SENTINEL_TRANSPORT
    )
    config["broker_transport_options"].update(
        predictq_raw_limit=settings.dead_letter_max_bytes,
        predictq_max_payload_bytes=settings.max_payload_bytes,
        predictq_max_json_bytes=settings.max_json_bytes,
    )
    return config


def export_flower_options(settings: Settings) -> None:
    """Let plain `celery -A workers flower` use PREDICTQ_FLOWER_* settings.

    Flower reads its options from FLOWER_* variables when its command starts,
    which is after the Celery CLI has configured this app; explicit FLOWER_*
    variables and command-line options still win. Whatever they say, a Flower
    without authentication listens on loopback only (``_guard_flower_address``).
    """
    if settings.flower_basic_auth:
        os.environ.setdefault("FLOWER_BASIC_AUTH", settings.flower_basic_auth)
    os.environ.setdefault("FLOWER_PORT", str(settings.flower_port))
    if settings.flower_address is not None:
        os.environ.setdefault("FLOWER_ADDRESS", settings.flower_address)
    _install_flower_guard()


def flower_address(address: str, *, authenticated: bool) -> str:
    """The address Flower may listen on: any with authentication, else loopback only.

    Flower shows every job and can revoke them. Without authentication the
    default ("" = every interface) becomes 127.0.0.1, and any other
    non-loopback address is a ``ConfigError``.
    """
    if authenticated or _is_loopback(address):
        return address
    if not address:
        return "127.0.0.1"
    raise ConfigError(
        f"Flower without basic auth may listen on loopback only, not on {address!r}: "
        "set PREDICTQ_FLOWER_BASIC_AUTH=user:password, or use --address=127.0.0.1"
    )


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # "" (every interface) or a host name: not known to be local


@functools.cache
def _install_flower_guard() -> None:
    # Flower applies FLOWER_* variables, its config file and its command line
    # to tornado's options, then runs the parse callbacks: the guard sees
    # exactly what Flower will bind. Tornado comes with Flower.
    from tornado.options import options

    options.add_parse_callback(_guard_flower_address)


def _guard_flower_address() -> None:
    from tornado.options import options

    if options.unix_socket:
        return  # no TCP listener: file permissions decide who connects
    authenticated = bool(options.basic_auth or options.auth)
    try:
        options.address = flower_address(options.address, authenticated=authenticated)
    except ConfigError as e:
        # Inside Flower's click command, before it binds anything: the same one
        # line as every predictq CLI error, and exit status 1.
        click.echo(f"predictq: error: {type(e).__name__}: {e}", err=True)
        raise click.exceptions.Exit(1) from e
    if not authenticated:
        log.warning(
            "Flower has no basic auth (PREDICTQ_FLOWER_BASIC_AUTH): listening on %s only",
            options.address,
        )


app = Celery("predictq", set_as_current=False)
# JSON results for JSON jobs and no tracebacks in results (workers/results.py);
# a factory, as the class depends on the result backend's URL scheme.
app.backend_cls = result_backend
app.add_defaults(_configure)
# A hidden preload option makes the Celery CLI send `user_preload_options`
# before every sub-command, flower included (workers/signals.py uses it).
app.user_options["preload"].add(
    click.Option(["--predictq-settings"], hidden=True, default="env", show_default=False)
)


def pool_kind(pool_cls: Any) -> str:
    """threads, prefork or solo: the pool ``pool_cls`` (a class or its name) is, or ConfigError."""
    # Imported here, not with this module: every `celery -A workers ...` command
    # (Flower, inspect) loads the app, and only a starting worker needs the pools.
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool
    from celery.concurrency.solo import TaskPool as SoloPool
    from celery.concurrency.thread import TaskPool as ThreadsPool

    cls = get_implementation(pool_cls)
    for kind, known in (("threads", ThreadsPool), ("prefork", PreforkPool), ("solo", SoloPool)):
        if isinstance(cls, type) and issubclass(cls, known):
            return kind
    raise ConfigError(
        f"worker pool must be threads, prefork or solo, got {getattr(cls, '__name__', cls)}"
    )
