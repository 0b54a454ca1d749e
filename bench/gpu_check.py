"""`python -m bench.gpu_check`: a JAX-backend worker on one GPU, measured in one go.

Run by bench/gpu_check.sh (which installs the carried wheels first). On the
device ``PREDICTQ_DEVICE`` names (gpu by default; cpu tries the same script on
any machine), with a private Redis and the benchmark's models:

* raw: the in-process compiled call at its best batch size (its own process);
* storm, idle, bulk: one worker with ``PREDICTQ_MAX_BATCH_SIZE`` at that size;
  the device's busy share (the worker's own ``predictq_device_seconds``), its
  compile counts, and its process's GPU memory (nvidia-smi) after the bulk run;
* memory: the MLP worker's GPU memory with growth (the default: JAX does not
  preallocate), with growth off (JAX takes 75% of the GPU at start), and with
  ``PREDICTQ_GPU_MEMORY_LIMIT_MB``;
* two worker processes on one GPU, both reading the queue: storm and bulk.

Prints one table and writes gpu_check.json to ``--out`` (default bench/results).
Every output is checked against the same compiled model on the same device (the
raw process computes them); this process also computes the storm's outputs with
JAX on the CPU, reported as the raw row's distance from the CPU, so it never
holds GPU memory itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ["KERAS_BACKEND"] = "jax"  # the driver, like the workers (no TensorFlow there)

import numpy as np
import psutil

from bench import procs, scenarios
from bench.__main__ import reference
from bench.backends import raw_in
from bench.models import BenchModel, build
from bench.scenarios import Result, async_storm, bulk, closed_loop, noop_call
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient

DEVICE = os.environ.get("PREDICTQ_DEVICE", "gpu")
STARTED = time.monotonic()
Row = dict[str, Any]


def gpu_memory_mb(pids: set[int]) -> str:
    """GPU memory of ``pids`` (MiB), and the whole GPU's, from nvidia-smi; "-" without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "-"
    apps = subprocess.run(
        [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    used = sum(
        float(mb)
        for pid, mb in (line.split(",") for line in apps.splitlines() if "," in line)
        if int(pid) in pids
    )
    total = subprocess.run(
        [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{used:,.0f} (GPU {float(total or 0):,.0f})"


@contextlib.contextmanager
def workers(
    server: RedisServer, m: BenchModel, queue: str, count: int, env: dict[str, str]
) -> Iterator[list[procs.Worker]]:
    """``count`` JAX workers on ``DEVICE`` reading ``queue``, stopped on exit."""
    started: list[procs.Worker] = []
    settings = {
        "PREDICTQ_QUEUE": queue,
        "PREDICTQ_KERAS_BACKEND": "jax",
        "PREDICTQ_DEVICE": DEVICE,
        **env,
    }
    try:
        for _ in range(count):
            started.append(
                procs.predictq_worker(
                    server.url(0),
                    server.url(1),
                    m.path,
                    concurrency=64,
                    extra_env=settings,
                    # An H200 took over 180 s to compile MobileNetV2's 13 buckets.
                    start_timeout_s=900,
                )
            )
        yield started
    finally:
        for w in started:
            w.stop()


def pids(pool: list[procs.Worker]) -> set[int]:
    """The workers' processes and their children."""
    found = set()
    for w in pool:
        found.add(w.process.pid)
        with contextlib.suppress(psutil.Error):
            found |= {c.pid for c in psutil.Process(w.process.pid).children(recursive=True)}
    return found


def device_busy(before: list[dict[str, float]], pool: list[procs.Worker], seconds: float) -> str:
    after = [w.metrics() for w in pool]
    busy = [
        (a["predictq_device_seconds_sum"] - b["predictq_device_seconds_sum"]) / seconds
        for a, b in zip(after, before, strict=True)
    ]
    return " + ".join(f"{x:.0%}" for x in busy)


def serve(
    server: RedisServer,
    m: BenchModel,
    args: argparse.Namespace,
    raw: dict[str, Any],
    count: int,
    env: dict[str, str],
) -> tuple[list[Row], str]:
    """Storm, idle and bulk through ``count`` workers; rows and their GPU memory.

    ``raw``: the inputs, and their outputs from the same compiled model on the same
    device in a process of its own, which every output is checked against.
    """
    queue = f"gpu-{m.name}-{count}-{len(env)}"
    best = int(raw["batch"])
    x, xb = raw["inputs"]["storm"], raw["inputs"]["bulk"]
    expected, expected_bulk = raw["outputs"]["storm"], raw["outputs"]["bulk"]
    rows: list[Row] = []
    with (
        workers(server, m, queue, count, {"PREDICTQ_MAX_BATCH_SIZE": str(best), **env}) as pool,
        PredictionClient(
            broker_url=server.url(0),
            result_backend=server.url(1),
            queue=queue,
            result_timeout_s=300,
        ) as client,
        PredictionClient(
            broker_url=server.url(0),
            result_backend=server.url(1),
            queue=queue,
            result_timeout_s=300,
            coalesce_max_jobs=1,
        ) as single,
    ):

        def one(i: int) -> Any:
            return client.predict(x[i : i + 1])

        noop = noop_call(single, x, expected)

        closed_loop(m.name, "warm-up", one, expected, jobs=50, threads=8)
        compiled = sum(w.metrics()["predictq_model_compiles"] for w in pool)
        if count == 1 and "storm" in args.parts:
            ceiling = closed_loop(
                m.name, "noop (per message)", noop, expected, jobs=args.storm_jobs, threads=32
            )
            rows.append(row(ceiling, ""))
        if "storm" in args.parts:
            before = [w.metrics() for w in pool]
            storm = closed_loop(m.name, "storm", one, expected, jobs=args.storm_jobs, threads=32)
            rows.append(row(storm, device_busy(before, pool, storm.seconds), per_job(before, pool)))
        if count == 1 and "storm" in args.parts:
            before = [w.metrics() for w in pool]
            astorm = async_storm(
                m.name,
                lambda a: client.apredict(a, timeout=300),
                x,
                expected,
                jobs=args.storm_jobs,
                in_flight=64,
            )
            rows.append(
                row(astorm, device_busy(before, pool, astorm.seconds), per_job(before, pool))
            )
            idle = closed_loop(m.name, "idle", one, expected, jobs=args.idle_jobs, threads=1)
            rows.append(row(idle, ""))
        chunk = 8192 if m.name == "mlp" else best
        if "bulk" in args.parts:
            before = [w.metrics() for w in pool]
            b = bulk(
                m.name,
                lambda a: client.predict_many(a, chunk_size=chunk, timeout=600),
                xb,
                expected_bulk,
                note=f"{len(xb):,} rows, chunk {chunk}",
            )
            rows.append(row(b, device_busy(before, pool, b.seconds)))
        memory = gpu_memory_mb(pids(pool))
        later = sum(w.metrics()["predictq_model_compiles"] for w in pool)
        for r in rows:
            r["compiles"] = f"{compiled:.0f}+{later - compiled:.0f}"
            r["gpu_mb"] = memory
    return rows, memory


def bulk_inputs(m: BenchModel, args: argparse.Namespace) -> np.ndarray[Any, Any]:
    """The bulk run's rows (the conv net's are 48 times the MLP's bytes: 1/50 as many)."""
    return m.inputs(args.bulk_rows if m.name == "mlp" else args.bulk_rows // 50, seed=3)


def per_job(before: list[dict[str, float]], pool: list[procs.Worker]) -> str:
    """Jobs per broker message and per device call since ``before``, over all of ``pool``."""
    after = [w.metrics() for w in pool]

    def grown(name: str) -> float:
        return sum(a[name] - b[name] for a, b in zip(after, before, strict=True))

    per_message = grown("predictq_message_jobs_sum") / max(
        1.0, grown("predictq_message_jobs_count")
    )
    per_call = grown("predictq_batch_size_jobs_sum") / max(
        1.0, grown("predictq_batch_size_jobs_count")
    )
    return f"{per_message:.1f} jobs/message, {per_call:.1f} jobs/device call"


def row(r: Result, busy: str, jobs: str = "") -> Row:
    """One table row of ``r``, also printed at once (a run cut short still shows its rows)."""
    note = "; ".join(n for n in (r.note, jobs) if n)
    print(
        f"  [{time.monotonic() - STARTED:.0f}s] {r.model} {r.scenario}: "
        f"{r.jobs_per_s:,.1f} jobs/s, {r.samples_per_s:,.0f} samples/s, "
        f"busy {busy or '-'}, {r.errors} errors; {note}",
        flush=True,
    )
    return {
        "scenario": r.scenario,
        "model": r.model,
        "samples_per_s": r.samples_per_s,
        "jobs_per_s": r.jobs_per_s,
        "p50_ms": r.pct(50),
        "p99_ms": r.pct(99),
        "busy": busy,
        "errors": r.errors,
        "max_abs_err": r.max_abs_err,
        "note": note,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    parser.add_argument("--models", default="mlp,mobilenetv2")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument(
        "--parts",
        default="storm,bulk,memory,two",
        help="what to run after raw: storm (no-op ceiling, storms, idle), bulk, memory, two",
    )
    parser.add_argument("--limit-mb", type=int, default=4096, help="the memory-limit case")
    parser.add_argument(
        "--atol",
        type=float,
        default=None,
        help="the output check's tolerance (default 1e-5 on a CPU, 1e-4 on a GPU)",
    )
    args = parser.parse_args()
    import jax

    jax.config.update("jax_platforms", "cpu")  # this process only; its children pick their own
    args.storm_jobs = 500 if args.quick else 3000
    args.idle_jobs = 30 if args.quick else 100
    args.bulk_rows = 50_000 if args.quick else 500_000
    # Outputs are checked against the same compiled model on the same device. On
    # an NVIDIA GPU, JAX's default float32 matrix products and convolutions use
    # TF32 inputs, and XLA picks kernels per batch shape (a batch is padded to
    # its bucket), so one row's output moves a little with its batch's size;
    # how far the GPU is from the CPU's float32 is reported apart ("vs CPU").
    scenarios.ATOL = args.atol or (1e-4 if DEVICE == "gpu" else 1e-5)
    started = time.time()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        built = {m.name: m for m in build(tmp, quick=args.quick)}
        models = [built[name] for name in args.models.split(",")]  # in the order asked for
        for m in models:
            x = m.inputs(args.storm_jobs, seed=1)
            inputs = {"storm": x, "bulk": bulk_inputs(m, args)}
            raw = raw_in("jax", m, tmp, {"PREDICTQ_DEVICE": DEVICE}, inputs)
            raw["inputs"] = inputs
            r, best = raw["result"], int(raw["batch"])
            vs_cpu = float(np.max(np.abs(raw["outputs"]["storm"] - reference(m.path, x))))
            rows.append(
                {
                    "scenario": "raw",
                    "model": m.name,
                    "samples_per_s": r["samples_per_s"],
                    "errors": r["errors"],
                    "max_abs_err": r["max_abs_err"],
                    "note": f"batch {best}; batch-1 {raw['batch1_ms']:.2f} ms back to back, "
                    f"{raw['alone_ms']:.2f} ms alone; outputs vs JAX on the CPU: max |diff| "
                    f"{vs_cpu:.1e}",
                }
            )
            print(f"  [{time.monotonic() - STARTED:.0f}s] {m.name} raw: {rows[-1]}", flush=True)
            if "storm" in args.parts or "bulk" in args.parts:
                served, _ = serve(server, m, args, raw, 1, {})
                rows += served
            if m.name != "mlp" or "memory" not in args.parts:
                continue
            # A ready worker (warmed up to batches of 4096): what each setting holds.
            for label, env in (
                ("memory: growth (default)", {}),
                ("memory: growth off", {"PREDICTQ_GPU_MEMORY_GROWTH": "false"}),
                (
                    f"memory: limit {args.limit_mb}",
                    {"PREDICTQ_GPU_MEMORY_LIMIT_MB": str(args.limit_mb)},
                ),
            ):
                with workers(server, m, f"gpu-mem-{len(rows)}", 1, env) as pool:
                    memory = gpu_memory_mb(pids(pool))
                rows.append({"scenario": label, "model": m.name, "gpu_mb": memory})
                print(f"  {m.name} {label}: GPU MiB {memory}", flush=True)
            if "two" not in args.parts:
                continue
            two, _ = serve(server, m, args, raw, 2, {})
            for r2 in two:
                r2["scenario"] = f"2 workers: {r2['scenario']}"
            rows += two
    report(rows)
    ratios = {}
    for m in models:
        by = {r["scenario"]: r for r in rows if r["model"] == m.name}
        if "noop (per message)" in by and "storm" in by:
            ceiling = by["noop (per message)"]["jobs_per_s"] or 1.0
            ratios[m.name] = {
                "storm / noop": by["storm"]["jobs_per_s"] / ceiling,
                "asyncio storm / noop": by["predictq asyncio storm"]["jobs_per_s"] / ceiling,
            }
            print(
                f"{m.name}: storm {ratios[m.name]['storm / noop']:.2f}x the per-message "
                f"ceiling, asyncio storm {ratios[m.name]['asyncio storm / noop']:.2f}x"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "device": DEVICE,
        "seconds": round(time.time() - started, 1),
        "rows": rows,
        "ratios": ratios,
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {out / 'gpu_check.json'} ({summary['seconds']:.0f}s in all)")
    if any(r.get("errors") for r in rows):
        sys.exit("some outputs were wrong or jobs failed")


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or v == "" else format(v, spec)


def report(rows: list[Row]) -> None:
    print(f"\nJAX backend on {DEVICE}")
    header = (
        f"{'scenario':<28}{'model':<12}{'samples/s':>12}{'jobs/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'busy':>10}  {'GPU MiB (all)':<20}{'compiles':>9}{'err':>5}{'max|err|':>10}  note"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['scenario']:<28}{r['model']:<12}{_fmt(r.get('samples_per_s'), ',.0f'):>12}"
            f"{_fmt(r.get('jobs_per_s'), ',.1f'):>9}{_fmt(r.get('p50_ms'), '.2f'):>9}"
            f"{_fmt(r.get('p99_ms'), '.2f'):>9}{r.get('busy', '') or '-':>10}  "
            f"{r.get('gpu_mb', '-'):<20}{r.get('compiles', '-'):>9}{r.get('errors', 0):>5}"
            f"{_fmt(r.get('max_abs_err'), '.1e'):>10}  {r.get('note', '')}"
        )


if __name__ == "__main__":
    main()
