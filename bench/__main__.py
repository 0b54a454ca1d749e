"""`python -m bench`: every scenario side by side, on this machine, in one run.

Prints a table and the target ratios, and writes bench/results/latest.json.
`--quick` shrinks the job counts for a smoke run (its ratios are not the targets').
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import procs
from bench.models import BenchModel, build
from bench.scenarios import (
    Result,
    async_storm,
    bulk,
    check_distinguishes,
    closed_loop,
    interleaved,
    noop_call,
    raw,
)
from predictq.celeryconf import NOOP_TASK
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient

RESULTS = Path(__file__).resolve().parent / "results"


def reference(model_path: str, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The model's outputs for ``x``, computed in this process (as a graph on TensorFlow).

    On TensorFlow a ``tf.function``, not Keras's eager call: the graph optimizer
    fuses ops (a conv with its batch norm), which moves a deep net's float32
    outputs by up to ~1e-5 from the eager ones (MobileNetV2 here: 6.4e-6 on 4,000
    inputs); the worker runs such a graph, and the same graph in process stays
    within ~1e-6 of it whatever the batch size, so ``ATOL`` measures predictq,
    not the optimizer. Other backends (the GPU check's JAX) call the model eagerly.
    """
    import keras

    model = keras.models.load_model(model_path, compile=False)

    def call(t: np.ndarray[Any, Any]) -> Any:
        return model(t, training=False)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        call = tf.function(call, reduce_retracing=True)
    expected = np.concatenate([np.asarray(call(x[i : i + 1024])) for i in range(0, len(x), 1024)])
    check_distinguishes(model_path, expected)
    return expected


def run_model(
    m: BenchModel,
    server: RedisServer,
    args: argparse.Namespace,
    results: list[Result],
    noop_done: bool,
) -> dict[str, float]:
    broker, backend = server.url(0), server.url(1)
    queue = f"bench-{m.name}"
    x = m.inputs(args.storm_jobs, seed=1)
    expected = reference(m.path, x)
    x_raw = m.inputs(4096, seed=2)
    raw_result, batch1_ms, alone_ms = raw(m.path, x_raw, reference(m.path, x_raw), m.name)
    results.append(raw_result)
    best_batch = raw_result.samples // raw_result.jobs
    print(
        f"[{m.name}] raw: {raw_result.samples_per_s:,.0f} samples/s ({raw_result.note}); "
        f"batch-1 call {batch1_ms:.2f} ms back to back, {alone_ms:.2f} ms alone",
        flush=True,
    )
    # Configured as an operator would: device batches of the model's best size.
    worker = procs.predictq_worker(
        broker,
        backend,
        m.path,
        concurrency=args.concurrency,
        extra_env={
            "PREDICTQ_QUEUE": queue,
            "PREDICTQ_MAX_BATCH_SIZE": str(best_batch),
            **(
                {"PREDICTQ_INTRA_OP_THREADS": str(args.intra_op_threads)}
                if args.intra_op_threads
                else {}
            ),
            **dict(pair.split("=", 1) for pair in args.worker_env),
        },
    )
    extra: dict[str, float] = {
        "batch1_ms": batch1_ms,
        "alone_ms": alone_ms,
        "max_batch_size": best_batch,
    }
    settings = dict(
        broker_url=broker,
        result_backend=backend,
        queue=queue,
        result_timeout_s=120,
        max_in_flight=4096,
    )
    # The client is this process: its producer threads, collector and encoder.
    cpu_pids = {"worker": worker.process.pid, "client": os.getpid(), "redis": server.pid}
    try:
        # The per-message ceiling is measured with coalescing off: one job, one
        # Celery message, as every job travelled before coalescing.
        with (
            PredictionClient(**settings) as client,
            PredictionClient(**settings, coalesce_max_jobs=1) as single,
        ):

            def predict_one(i: int) -> Any:
                return client.predict(x[i : i + 1])

            noop_one = noop_call(single, x, expected)

            def threads_round(label: str, call: Any) -> Any:
                def run(base: int, jobs: int) -> Result:
                    return closed_loop(
                        m.name,
                        label,
                        lambda i: call(base + i),
                        expected[base:],
                        jobs=jobs,
                        threads=args.threads,
                    )

                return run

            def asyncio_round(base: int, jobs: int) -> Result:
                return async_storm(
                    m.name,
                    lambda a: client.apredict(a, timeout=120),
                    x[base:],
                    expected[base:],
                    jobs=jobs,
                    in_flight=args.in_flight,
                )

            # Warm-up in the storms' own shapes. A worker's first seconds of a
            # storm run slower than the rest (measured, conv net: 5.5 ms per
            # device call in the first 4,000 jobs, 4.2 after; each new batch
            # size's first call alone costs ~6 ms more on CPU), which a short,
            # 8-thread warm-up left to the first storm round to pay.
            warm_jobs = args.storm_jobs // 10
            # This process imported TensorFlow for the in-process references:
            # ~420,000 objects that each full garbage collection would scan
            # (~190 ms holding the GIL the producer threads need; in a side
            # harness an asyncio round's surviving objects set one off in the
            # next storm round: +100 us of client CPU per job in that round). A
            # client service does not carry them; as a long-running one that
            # imports much should, the bench freezes what it holds (gc.freeze).
            gc.collect()
            gc.freeze()
            closed_loop(
                m.name, "warm-up", predict_one, expected, jobs=warm_jobs, threads=args.threads
            )
            closed_loop(m.name, "warm-up", noop_one, expected, jobs=200, threads=args.threads)
            asyncio_round(0, warm_jobs // 2)
            # The per-message ceiling and the storms, interleaved in rounds on
            # the same worker, so all see the same minutes of machine noise
            # (back-to-back runs of either vary by +-20% on a shared 2-core box).
            # Each storm gets its own slice of the inputs: every job is distinct.
            worker.reset_peak()
            storm_jobs = args.storm_jobs // 2
            by_label, grown = interleaved(
                {
                    "noop (predictq client)": (
                        threads_round("noop (predictq client)", noop_one),
                        args.noop_jobs,
                    ),
                    "predictq storm": (threads_round("predictq storm", predict_one), storm_jobs),
                    "predictq asyncio storm": (
                        lambda base, jobs: asyncio_round(storm_jobs + base, jobs),
                        storm_jobs,
                    ),
                },
                rounds=4,
                counters=lambda: {**worker.metrics(), **procs.cpu_counters(cpu_pids)},
                watch=(
                    "predictq_batch_size_jobs_sum",
                    "predictq_batch_size_jobs_count",
                    "predictq_message_jobs_sum",
                    "predictq_message_jobs_count",
                    "predictq_device_seconds_sum",
                    *CPU_COUNTERS,
                ),
            )
            noop = by_label["noop (predictq client)"]
            noop.note = f"{args.threads} producer threads, coalescing off, 4 interleaved rounds"
            noop.note += _cpu_note(grown["noop (predictq client)"], noop.jobs, extra, "noop")
            results.append(noop)
            for label in ("predictq storm", "predictq asyncio storm"):
                r = by_label[label]
                r.peak_rss_mb = worker.peak_rss_mb
                g = grown[label]
                key = "storm" if label == "predictq storm" else "asyncio_storm"
                per_call = g["predictq_batch_size_jobs_sum"] / max(
                    1.0, g["predictq_batch_size_jobs_count"]
                )
                per_message = g["predictq_message_jobs_sum"] / max(
                    1.0, g["predictq_message_jobs_count"]
                )
                busy = g["predictq_device_seconds_sum"] / r.seconds
                extra[f"{key}_jobs_per_device_call"] = round(per_call, 2)
                extra[f"{key}_jobs_per_message"] = round(per_message, 2)
                extra[f"{key}_device_busy"] = round(busy, 3)
                r.note += (
                    f"; {per_message:.1f} jobs per message, {per_call:.1f} per device call, "
                    f"device busy {busy:.0%}"
                ) + _cpu_note(g, r.jobs, extra, key)
                results.append(r)
            noop.peak_rss_mb = worker.peak_rss_mb
            if not noop_done:
                results.append(_celery_noop(broker, backend, queue, x, expected, args))
                idle_noop = closed_loop(
                    "-", "noop idle latency", noop_one, expected, jobs=args.idle_jobs, threads=1
                )
                results.append(idle_noop)
            before = worker.metrics()
            idle = closed_loop(
                m.name,
                "predictq idle latency",
                predict_one,
                expected,
                jobs=args.idle_jobs,
                threads=1,
            )
            after = worker.metrics()
            # The worker's own device time per call: what a lone job's call costs in there.
            idle_device_ms = (
                _delta(before, after, "predictq_device_seconds_sum")
                / max(1.0, _delta(before, after, "predictq_device_seconds_count"))
                * 1000
            )
            extra["idle_device_call_ms"] = round(idle_device_ms, 2)
            idle.note += f"; device call {idle_device_ms:.2f} ms in the worker"
            results.append(idle)
            worker.reset_peak()
            xb = m.inputs(m.bulk_rows, seed=3)
            # The limit again, right before the bulk run: on a shared machine
            # speed drifts over minutes, so the bulk ratio uses the mean of both.
            raw_again, _, _ = raw(
                m.path, xb[:best_batch], reference(m.path, xb[:best_batch]), m.name, (best_batch,)
            )
            raw_again.scenario = "raw (again, before bulk)"
            results.append(raw_again)
            before = worker.metrics()
            # The conv net: at most one device batch per chunk, and 20+ chunks to
            # keep the pipeline full (a few huge chunks leave the device idle
            # while the first is encoded and sent and the last comes back: when
            # raw's best batch was 4096, its 5 chunks kept the device 71% busy).
            if m.name == "mlp":
                chunk = max(best_batch, args.chunk_size)
            else:
                chunk = min(best_batch, max(1, m.bulk_rows // 20))
            b = bulk(
                m.name,
                lambda a: client.predict_many(a, chunk_size=chunk, timeout=300),
                xb,
                reference(m.path, xb),
                note=f"{m.bulk_rows:,} rows, chunk {chunk}",
            )
            b.peak_rss_mb = worker.peak_rss_mb
            after = worker.metrics()
            busy_s = _delta(before, after, "predictq_device_seconds_sum")
            extra["bulk_device_busy"] = round(busy_s / b.seconds, 3)
            extra["bulk_samples_per_s_while_busy"] = round(
                _delta(before, after, "predictq_batch_size_samples_sum") / max(busy_s, 1e-9)
            )
            b.note += (
                f"; device busy {extra['bulk_device_busy']:.0%} of the time, "
                f"{extra['bulk_samples_per_s_while_busy']:,} samples/s while busy"
            )
            results.append(b)
    finally:
        worker.stop()
    results.append(_naive(m, broker, backend, x, expected, args))
    return extra


#: The CPU counters read around each interleaved round (procs.cpu_counters).
CPU_COUNTERS = ("cpu_worker_s", "cpu_client_s", "cpu_redis_s", "cpu_idle_s", "cpu_all_s")


def _cpu_note(grown: dict[str, float], jobs: int, extra: dict[str, float], key: str) -> str:
    """CPU per job in the worker, this client process and Redis over a scenario's
    rounds, and the machine's idle share; also recorded in ``extra``."""
    per_job = {p: grown[f"cpu_{p}_s"] / max(1, jobs) * 1e6 for p in ("worker", "client", "redis")}
    idle = grown["cpu_idle_s"] / max(grown["cpu_all_s"], 1e-9)
    for p, us in per_job.items():
        extra[f"{key}_cpu_{p}_us_per_job"] = round(us, 1)
    extra[f"{key}_cpu_idle"] = round(idle, 3)
    return (
        f"; CPU per job: worker {per_job['worker']:.0f} us, client {per_job['client']:.0f}, "
        f"Redis {per_job['redis']:.0f}; CPUs {idle:.0%} idle"
    )


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _celery_noop(
    broker: str, backend: str, queue: str, x: Any, expected: Any, args: argparse.Namespace
) -> Result:
    """The no-op through a plain Celery client: send_task + AsyncResult.get per thread."""
    from celery import Celery

    # Celery's default settings: JSON jobs, whose results workers store as JSON.
    app = Celery("plain-client", broker=broker, backend=backend, set_as_current=False)

    def call(i: int) -> Any:
        app.send_task(NOOP_TASK, args=[x[i : i + 1].tolist()], queue=queue).get(timeout=60)
        return expected[i : i + 1]

    try:
        return closed_loop(
            "-",
            "noop (celery client)",
            call,
            expected,
            jobs=args.storm_jobs,
            threads=args.threads,
            time_box_s=args.noop_s,
        )
    finally:
        app.close()


def _naive(
    m: BenchModel, broker: str, backend: str, x: Any, expected: Any, args: argparse.Namespace
) -> Result:
    from celery import Celery

    worker = procs.naive_worker(broker, backend, m.path, concurrency=2)
    app = Celery("naive-client", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])

    def call(i: int) -> Any:
        rows = app.send_task("naive.predict", args=[x[i : i + 1].tolist()], queue="naive").get(
            timeout=120
        )
        return np.asarray(rows, dtype=np.float32)

    try:
        closed_loop(m.name, "warm-up", call, expected, jobs=4, threads=2)
        worker.reset_peak()
        r = closed_loop(
            m.name,
            "naive template",
            call,
            expected,
            jobs=args.storm_jobs,
            threads=args.threads,
            time_box_s=args.naive_s,
        )
        r.peak_rss_mb = worker.peak_rss_mb
        r.note += "; prefork -c 2, JSON, model.predict per job"
        return r
    finally:
        app.close()
        worker.stop()


def _fmt(v: float | None, spec: str = ",.1f") -> str:
    return "-" if v is None else format(v, spec)


def report(results: list[Result], extras: dict[str, dict[str, float]]) -> dict[str, Any]:
    header = (
        f"{'scenario':<26}{'model':<13}{'jobs':>8}{'samples/s':>13}{'jobs/s':>10}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'RSS MB':>8}{'errors':>7}{'max|err|':>10}  note"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(
            f"{r.scenario:<26}{r.model:<13}{r.jobs:>8}{_fmt(r.samples_per_s):>13}"
            f"{_fmt(r.jobs_per_s):>10}{_fmt(r.pct(50), '.2f'):>9}{_fmt(r.pct(99), '.2f'):>9}"
            f"{_fmt(r.peak_rss_mb, '.0f'):>8}{r.errors:>7}{r.max_abs_err:>10.1e}  {r.note}"
        )

    def find(scenario: str, model: str = "-") -> Result:
        return next(r for r in results if r.scenario == scenario and r.model in (model, "-"))

    ratios: dict[str, Any] = {}
    noop_celery = find("noop (celery client)")
    idle_noop = find("noop idle latency")
    print("\nTargets:")
    for model, extra in extras.items():
        storm, naive = find("predictq storm", model), find("naive template", model)
        noop = find("noop (predictq client)", model)
        if min(noop.jobs_per_s, noop_celery.jobs_per_s, naive.jobs_per_s) == 0:
            print(f"  [{model}] a baseline completed no jobs: no ratios")
            continue
        raw_mean = (
            find("raw", model).samples_per_s + find("raw (again, before bulk)", model).samples_per_s
        ) / 2
        astorm = find("predictq asyncio storm", model)
        rows = {
            "bulk / raw samples/s (>= 0.75)": find("predictq bulk", model).samples_per_s / raw_mean,
            "storm / noop jobs/s, per-message ceiling (>= 3)": storm.jobs_per_s / noop.jobs_per_s,
            "storm / noop jobs/s, plain Celery client": storm.jobs_per_s / noop_celery.jobs_per_s,
            "storm / naive jobs/s (>= 20)": storm.jobs_per_s / naive.jobs_per_s,
            "asyncio storm / noop jobs/s, per-message ceiling (>= 3)": astorm.jobs_per_s
            / noop.jobs_per_s,
            "asyncio storm / naive jobs/s (>= 20)": astorm.jobs_per_s / naive.jobs_per_s,
        }
        idle = find("predictq idle latency", model).pct(50) or 0.0
        budget = (idle_noop.pct(50) or 0.0) + extra["alone_ms"] + 2.0
        for label, value in rows.items():
            print(f"  [{model}] {label}: {value:.2f}")
        print(
            f"  [{model}] idle p50 {idle:.2f} ms vs budget {budget:.2f} ms "
            f"(noop p50 + batch-1 alone {extra['alone_ms']:.2f} ms + 2 ms; "
            f"back to back it is {extra['batch1_ms']:.2f} ms; in the worker "
            f"{extra['idle_device_call_ms']:.2f} ms): {'met' if idle <= budget else 'MISSED'}"
        )
        ratios[model] = {
            **{k: round(v, 3) for k, v in rows.items()},
            "idle_p50_ms": idle,
            "idle_budget_ms": budget,
            **extra,
        }
    errors = sum(r.errors for r in results)
    ratios["errors"] = errors
    print(
        f"  errors in all scenarios: {errors}; largest |output - in-process output|: "
        f"{max(r.max_abs_err for r in results):.1e}"
    )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    parser.add_argument("--threads", type=int, default=32, help="producer threads")
    parser.add_argument("--in-flight", type=int, default=64, help="asyncio storm: jobs in flight")
    parser.add_argument("--concurrency", type=int, default=64, help="worker threads")
    parser.add_argument("--chunk-size", type=int, default=8192, help="bulk rows per job (MLP)")
    parser.add_argument("--models", default="mlp,mobilenetv2")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="the predictq worker's PREDICTQ_INTRA_OP_THREADS (0: unset, TensorFlow's default)",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the predictq worker only (repeatable), e.g. "
        "TF_ENABLE_ONEDNN_OPTS=0; the in-process raw runs and the naive template keep theirs",
    )
    args = parser.parse_args()
    args.storm_jobs = 2000 if args.quick else 20_000  # both storms together
    args.idle_jobs = 50 if args.quick else 150
    args.noop_jobs = 400 if args.quick else 2000
    args.noop_s = 5.0 if args.quick else 8.0
    args.naive_s = 5.0 if args.quick else 6.0
    started = time.time()
    results: list[Result] = []
    extras: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        models = [m for m in build(tmp, quick=args.quick) if m.name in args.models.split(",")]
        for i, m in enumerate(models):
            extras[m.name] = run_model(m, server, args, results, noop_done=i > 0)
    ratios = report(results, extras)
    RESULTS.mkdir(exist_ok=True)
    out = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "quick": args.quick,
        "intra_op_threads": args.intra_op_threads or None,
        "worker_env": args.worker_env,
        "seconds": round(time.time() - started, 1),
        "results": [r.as_dict() for r in results],
        "ratios": ratios,
    }
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS / 'latest.json'} ({out['seconds']:.0f}s in all)")
    if ratios["errors"]:
        sys.exit(f"{ratios['errors']} error(s): some outputs were wrong or jobs failed")


if __name__ == "__main__":
    main()
