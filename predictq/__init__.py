"""predictq: asynchronous, multi-threaded Keras prediction through Celery and Redis.

The contract that workers and producers share lives here (settings, errors, the
wire codec, the structure of model inputs and outputs); the producer side is in
``producer``, the worker side in ``workers``, operator tooling in ``predictq_ops``.
This package imports none of them (tests/test_layering.py).
"""

__version__ = "0.1.0"
