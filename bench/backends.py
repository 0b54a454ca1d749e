"""`python -m bench.backends`: raw, storm, idle and bulk on each installed Keras backend.

One run, the same machine, the same models (bench/models.py) and the same Redis
for every backend: TensorFlow, JAX and PyTorch where installed. Per backend and
model: ``raw`` (the in-process compiled call at its best batch size, in a
process of that backend, with the batch-1 time back to back and alone), then a
predictq worker on that backend with ``PREDICTQ_MAX_BATCH_SIZE`` set to that
best size: ``storm`` (single-sample jobs from 32 producer threads), ``idle``
(one job at a time) and ``bulk`` (``predict_many``). The compile counts come
from the worker's ``predictq_model_compiles``: programs compiled at warm-up,
and any compiled while serving (there should be none). Every output is compared
(atol 1e-5) with the same model compiled as the worker compiles it, run in a
process of the same backend: across frameworks a deep net's float32 outputs
differ by more than that (MobileNetV2: ~1.5e-5, their kernels round
differently), which the table reports apart, as ``vs TensorFlow``.

Writes bench/results/backends.json; exits non-zero on any wrong output or error.
`--quick` shrinks the counts (a smoke run). The GPU variant is bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import procs
from bench.__main__ import RESULTS, reference
from bench.models import BenchModel, build
from bench.scenarios import Result, bulk, closed_loop
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient

BACKENDS = ("tensorflow", "jax", "torch")

#: Run in a fresh process per backend: Keras runs one backend per process.
RAW = """
import json, os, sys
import numpy as np
from predictq.settings import Settings
from workers.device import configure_devices
backend, path = sys.argv[1], sys.argv[2]
configure_devices(Settings.from_env({**os.environ, "PREDICTQ_KERAS_BACKEND": backend}))
from bench.scenarios import check_distinguishes, raw
from workers.model import load_model
model = load_model(path)
def outputs(x):
    return np.concatenate([model([x[i : i + 256]])[0] for i in range(0, len(x), 256)])
ys = {name: outputs(np.load(name)) for name in sys.argv[3:]}
for name, y in ys.items():
    np.save(name + ".y.npy", y)
check_distinguishes(path, ys[sys.argv[3]])
best, batch1_ms, alone_ms = raw(path, np.load(sys.argv[3]), ys[sys.argv[3]], backend)
print("RAW", json.dumps({"result": best.as_dict(), "batch": best.samples // best.jobs,
                         "batch1_ms": batch1_ms, "alone_ms": alone_ms}))
"""


def raw_in(
    backend: str,
    m: BenchModel,
    tmp: str,
    env: dict[str, str] | None = None,
    inputs: dict[str, np.ndarray[Any, Any]] | None = None,
) -> dict[str, Any]:
    """``bench.scenarios.raw`` in a process of ``backend``; its best result and batch-1 times.

    ``env``: settings for that process (e.g. ``PREDICTQ_DEVICE``). That process
    also computes the model's outputs for each of ``inputs`` (name -> array):
    they come back under ``"outputs"``, the reference for that backend's jobs.
    """
    named = {"raw": m.inputs(4096, seed=2), **(inputs or {})}
    paths = {k: os.path.join(tmp, f"{m.name}-{backend}-{k}.npy") for k in named}
    for k, x in named.items():
        np.save(paths[k], x)
    out = subprocess.run(
        [sys.executable, "-c", RAW, backend, m.path, *paths.values()],
        env=procs.base_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=procs.ROOT,
    )
    if out.returncode != 0 or "RAW " not in out.stdout:
        raise RuntimeError(f"raw on {backend} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.split("RAW ", 1)[1])
    result["outputs"] = {k: np.load(p + ".y.npy") for k, p in paths.items()}
    return result


def run(
    backend: str, m: BenchModel, server: RedisServer, args: argparse.Namespace, tmp: str
) -> tuple[list[Result], dict[str, Any]]:
    """Every scenario of one model on one backend."""
    x = m.inputs(args.storm_jobs, seed=1)
    xb = m.inputs(m.bulk_rows // args.bulk_divisor, seed=3)
    raw = raw_in(backend, m, tmp, inputs={"storm": x, "bulk": xb})
    expected, expected_bulk = raw["outputs"]["storm"], raw["outputs"]["bulk"]
    r = raw["result"]
    best = int(raw["batch"])
    label = f"{m.name}/{backend}"
    raw_result = Result("raw", label, r["jobs"], r["samples"], r["seconds"], r["errors"])
    raw_result.max_abs_err, raw_result.note = r["max_abs_err"], r["note"]
    print(f"[{label}] raw {raw_result.samples_per_s:,.0f} samples/s ({r['note']})", flush=True)
    broker, backend_url = server.url(0), server.url(1)
    queue = f"bench-{backend}-{m.name}"
    started = time.monotonic()
    worker = procs.predictq_worker(
        broker,
        backend_url,
        m.path,
        concurrency=args.concurrency,
        extra_env={
            "PREDICTQ_QUEUE": queue,
            "PREDICTQ_MAX_BATCH_SIZE": str(best),
            "PREDICTQ_KERAS_BACKEND": backend,
        },
    )
    extra: dict[str, Any] = {
        "best_batch": best,
        "batch1_ms": round(raw["batch1_ms"], 3),
        "alone_ms": round(raw["alone_ms"], 3),
        "worker_ready_s": round(time.monotonic() - started, 1),
    }
    # This process runs TensorFlow: how far the backend's own outputs are from it.
    extra["vs_tensorflow"] = float(np.max(np.abs(expected - reference(m.path, x))))
    results = [raw_result]
    try:
        with PredictionClient(
            broker_url=broker, result_backend=backend_url, queue=queue, result_timeout_s=300
        ) as client:

            def one(i: int) -> Any:
                return client.predict(x[i : i + 1])

            closed_loop(label, "warm-up", one, expected, jobs=50, threads=8)
            before = worker.metrics()
            extra["compiles_at_warm_up"] = before["predictq_model_compiles"]
            storm = closed_loop(
                label, "storm", one, expected, jobs=args.storm_jobs, threads=args.threads
            )
            after = worker.metrics()
            calls = _delta(before, after, "predictq_batch_size_jobs_count")
            jobs = _delta(before, after, "predictq_batch_size_jobs_sum")
            storm.note += f"; {jobs / max(calls, 1):.1f} jobs per device call"
            idle = closed_loop(label, "idle", one, expected, jobs=args.idle_jobs, threads=1)
            # The conv net: chunks of at most 512 images, so several are in flight.
            chunk = max(best, args.chunk_size) if m.name == "mlp" else min(best, 512)
            before = worker.metrics()
            b = bulk(
                label,
                lambda a: client.predict_many(a, chunk_size=chunk, timeout=600),
                xb,
                expected_bulk,
                note=f"{len(xb):,} rows, chunk {chunk}",
            )
            after = worker.metrics()
            busy = after["predictq_device_seconds_sum"] - before["predictq_device_seconds_sum"]
            b.note += f"; device busy {busy / b.seconds:.0%}"
            extra["compiles_while_serving"] = (
                after["predictq_model_compiles"] - extra["compiles_at_warm_up"]
            )
            results += [storm, idle, b]
    finally:
        worker.stop()
    return results, extra


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--models", default="mlp,mobilenetv2")
    parser.add_argument("--threads", type=int, default=32, help="producer threads")
    parser.add_argument("--concurrency", type=int, default=64, help="worker threads")
    parser.add_argument("--chunk-size", type=int, default=8192, help="bulk rows per job (MLP)")
    args = parser.parse_args()
    args.storm_jobs = 500 if args.quick else 3000
    args.idle_jobs = 30 if args.quick else 100
    args.bulk_divisor = 20 if args.quick else 5  # of bench/models.py's bulk rows
    chosen = [b for b in args.backends.split(",") if importlib.util.find_spec(b)]
    started = time.time()
    results: list[Result] = []
    extras: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        models = [m for m in build(tmp, quick=args.quick) if m.name in args.models.split(",")]
        for m in models:
            for backend in chosen:
                got, extra = run(backend, m, server, args, tmp)
                results += got
                extras[f"{m.name}/{backend}"] = extra
    report(results, extras)
    RESULTS.mkdir(exist_ok=True)
    out = {
        "quick": args.quick,
        "seconds": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        "results": [r.as_dict() for r in results],
        "backends": extras,
    }
    (RESULTS / "backends.json").write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS / 'backends.json'} ({out['seconds']:.0f}s in all)")
    errors = sum(r.errors for r in results)
    if errors:
        sys.exit(f"{errors} error(s): some outputs were wrong or jobs failed")


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after[name] - before[name]


def _fmt(v: float | None, spec: str = ",.1f") -> str:
    return "-" if v is None else format(v, spec)


def report(results: list[Result], extras: dict[str, Any]) -> None:
    header = (
        f"{'model/backend':<24}{'scenario':<8}{'samples/s':>12}{'jobs/s':>9}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'errors':>7}{'max|err|':>10}  note"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(
            f"{r.model:<24}{r.scenario:<8}{_fmt(r.samples_per_s):>12}{_fmt(r.jobs_per_s):>9}"
            f"{_fmt(r.pct(50), '.2f'):>9}{_fmt(r.pct(99), '.2f'):>9}{r.errors:>7}"
            f"{r.max_abs_err:>10.1e}  {r.note}"
        )
    print("\nPer backend: best batch, batch-1 call (back to back / alone), worker start, compiles")
    for label, e in extras.items():
        print(
            f"  {label:<24} batch {e['best_batch']}, batch-1 {e['batch1_ms']:.2f} / "
            f"{e['alone_ms']:.2f} ms, ready in {e['worker_ready_s']:.0f} s, compiled "
            f"{e['compiles_at_warm_up']:.0f} at warm-up and {e['compiles_while_serving']:.0f} "
            f"while serving; outputs within {e['vs_tensorflow']:.1e} of TensorFlow's"
        )


if __name__ == "__main__":
    main()
