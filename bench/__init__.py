"""The predictq benchmark: `python -m bench` (see README, "Benchmark")."""
