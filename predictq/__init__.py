"""predictq: asynchronous, multi-threaded Keras prediction through Celery and Redis.

Shared pieces live here (settings, errors, wire codec); the producer side is in
``producer``, the worker side in ``workers``.
"""

__version__ = "0.1.0"
