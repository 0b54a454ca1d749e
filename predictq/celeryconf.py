"""The Celery configuration predictq runs with, derived from ``Settings``.

Producers and workers build their own Celery app from the same function, so the
two sides always agree on serializers, queues and transport options.
"""

from __future__ import annotations

from typing import Any, Final

from predictq.codec import (
    ACCEPT_CONTENT,
    RESULT_CONTENT_TYPE,
    RESULT_SERIALIZER,
    SERIALIZER_NAME,
)
from predictq.sentinel import celery_options, is_sentinel_url
from predictq.settings import Settings

PREDICT_TASK: Final = "predictq.predict"
#: Several jobs in one message (a coalesced message, predictq/carrier.py).
PREDICT_JOBS_TASK: Final = "predictq.predict_jobs"
NOOP_TASK: Final = "predictq.noop"
#: Header the producer adds so workers can measure time spent in the queue.
SENT_AT_HEADER: Final = "predictq_sent_at"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings dict for ``settings``."""
    # kombu restores an unacknowledged message only once its visibility timeout
    # has passed, scanning every `unacked_restore_interval` seconds; scan often
    # enough that recovery after a crash takes about one visibility timeout.
    restore_interval_s = max(1, min(10, int(settings.visibility_timeout_s // 4)))
    transport_options = {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": restore_interval_s,
        "unacked_restore_throttle": 1,
        # Without socket timeouts a publish to a Redis that vanished without
        # closing the TCP connection waits forever.
        "socket_timeout": 10.0,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 10,
        "retry_on_timeout": True,
    }
    config = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_channel_error_retry": True,
        # Storing a result retries through a Redis restart (about a minute)
        # instead of turning a finished prediction into a failure.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 40,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "result_backend_transport_options": {
            "retry_policy": {
                "max_retries": 60,
                "interval_start": 0.2,
                "interval_step": 0.5,
                "interval_max": 1.0,
            },
        },
        "redis_socket_timeout": 10.0,
        "redis_socket_connect_timeout": 5.0,
        "redis_retry_on_timeout": True,
        "redis_backend_health_check_interval": 10,
        "task_serializer": SERIALIZER_NAME,
        # Results are msgpack for msgpack jobs and JSON for JSON jobs (chosen per
        # job by the workers' result backend, workers/results.py); Redis stores
        # no content type, so both sides read results with one serializer that
        # recognises either (predictq.codec.loads_result).
        "result_serializer": RESULT_SERIALIZER,
        "accept_content": list(ACCEPT_CONTENT),
        "result_accept_content": [RESULT_CONTENT_TYPE],
        "event_serializer": "json",
        "result_expires": int(settings.result_ttl_s),
        "task_default_queue": settings.queue,
        "task_create_missing_queues": True,
        # Predictions are pure functions of their input, so running a job again
        # after a crash is safe: acknowledge only after the result is stored and
        # requeue when the process running it dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "worker_concurrency": settings.worker_concurrency,
        "worker_send_task_events": settings.task_events,
        # Remote control is a broadcast queue in the broker: anyone who can write
        # to Redis can inspect workers, change their pool or shut them down.
        "worker_enable_remote_control": settings.remote_control,
        "task_send_sent_event": False,
        "task_track_started": False,
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        "worker_lost_wait": 10.0,
        "broker_pool_limit": 64,
        "timezone": "UTC",
        "enable_utc": True,
    }
    _use_sentinel(config, settings)
    return config


def _use_sentinel(config: dict[str, Any], settings: Settings) -> None:
    """Point Celery at the master set of any sentinel:// URL (predictq/sentinel.py)."""
    ends = (
        ("broker_url", "broker_transport_options", "broker_use_ssl"),
        ("result_backend", "result_backend_transport_options", "redis_backend_use_ssl"),
    )
    for url_key, options_key, tls_key in ends:
        url = config[url_key]
        if not is_sentinel_url(url):
            continue
        # kombu's SentinelChannel and Celery's SentinelBackend read the master
        # set's name and the sentinels' connection arguments from the transport
        # options; TLS to the master from the *_use_ssl dict, never the URL.
        config[url_key], options, tls = celery_options(
            url,
            # Settings validation guarantees a master name with a sentinel:// URL.
            master=settings.sentinel_master or "",
            password=settings.sentinel_password,
            socket_timeout_s=5.0,
        )
        config[options_key].update(options)
        if tls is not None:
            config[tls_key] = tls
