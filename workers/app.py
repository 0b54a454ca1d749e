"""The worker-side Celery app: ``celery -A workers worker --pool threads``.

The app is created at import, but configured lazily: Celery evaluates the
``add_defaults`` callable the first time it reads its configuration (when the
worker starts), and only then are settings read from the environment.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import click
from celery import Celery

from predictq.celeryconf import celery_config
from predictq.codec import register_serializer
from predictq.settings import Settings


@functools.cache
def worker_settings() -> Settings:
    """The worker process's settings, read from the environment once."""
    return Settings.from_env()


def _configure() -> dict[str, Any]:
    settings = worker_settings()
    # Registered before the consumer decodes anything; the payload limit is
    # checked on the raw body, before msgpack or numpy see it.
    register_serializer(max_payload_bytes=settings.max_payload_bytes)
    config = celery_config(settings)
    # Replaces Celery's consumer to answer unreadable messages with a typed
    # failure result instead of silence (workers/consumer.py).
    config["worker_consumer"] = "workers.consumer:PredictqConsumer"
    return config


def export_flower_options(settings: Settings) -> None:
    """Let plain `celery -A workers flower` use PREDICTQ_FLOWER_* settings.

    Flower reads its options from FLOWER_* variables when its command starts,
    which is after the Celery CLI has configured this app; explicit FLOWER_*
    variables and command-line options still win.
    """
    if settings.flower_basic_auth:
        os.environ.setdefault("FLOWER_BASIC_AUTH", settings.flower_basic_auth)
    os.environ.setdefault("FLOWER_PORT", str(settings.flower_port))


app = Celery("predictq", set_as_current=False)
app.add_defaults(_configure)
# A hidden preload option makes the Celery CLI send `user_preload_options`
# before every sub-command, flower included (workers/signals.py uses it).
app.user_options["preload"].add(
    click.Option(["--predictq-settings"], hidden=True, default="env", show_default=False)
)
