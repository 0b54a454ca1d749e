"""predictq operator tooling: the `predictq` command, `predictq up`, embedded Redis, the demo.

The top layer: it may import ``predictq``, ``workers`` and ``producer``; none of
them imports it (tests/test_layering.py).
"""
