"""`python -m bench.repository`: two models served by one worker process, and a hot load.

One worker serves a model repository with two models of different input shapes:
``a`` (the issue's MLP, 64 features) and ``b`` (a smaller MLP, 32 features).

* storm on ``a`` alone vs a storm alternating ``a`` and ``b`` (32 threads, one distinct
  sample per job), interleaved in rounds on the same worker: what serving a second
  model from the same process costs (its jobs cannot share a device call with ``a``'s);
* a storm on ``a`` while version 2 of ``a`` is published (written beside, then renamed
  into the repository): every job's output is checked against the version that
  ``job.model_version`` names, and the p99 latency of the jobs that finished during
  the load is compared with the p99 before it.

Prints a table and writes bench/results/repository.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import procs
from bench.scenarios import ATOL, Result, closed_loop, interleaved
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient

RESULTS = Path(__file__).resolve().parent / "results"
Array = np.ndarray[Any, Any]


def _save_mlp(path: Path, features: int, hidden: int, classes: int, seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,), name="x")
    h = keras.layers.Dense(hidden, activation="relu")(inputs)
    h = keras.layers.Dense(hidden, activation="relu")(h)
    outputs = keras.layers.Dense(classes, activation="softmax")(h)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, outputs).save(path)


def _reference(path: Path, x: Array) -> Array:
    import keras

    model = keras.models.load_model(path, compile=False)
    return np.concatenate(
        [np.asarray(model(x[i : i + 1024], training=False)) for i in range(0, len(x), 1024)]
    )


def _publish(repo: Path, staging: Path, name: str, version: int) -> None:
    """The README's rule: write the version beside the repository, then rename it in."""
    shutil.move(str(staging), str(repo / name / str(version)))


def two_models(
    client: PredictionClient,
    worker: procs.Worker,
    xa: Array,
    ya: Array,
    xb: Array,
    yb: Array,
    args: argparse.Namespace,
) -> tuple[Result, Result]:
    def one_model(i: int) -> Any:
        return client.predict(xa[i : i + 1], model="a")

    def alternating(i: int) -> Any:
        if i % 2:
            out = client.predict(xb[i : i + 1], model="b")
            # Checked here against b's own output; closed_loop then compares
            # a's expected row with itself.
            if np.max(np.abs(np.asarray(out) - yb[i : i + 1])) > ATOL:
                raise AssertionError(f"job {i} (model b): wrong output")
            return ya[i : i + 1]
        return client.predict(xa[i : i + 1], model="a")

    def rounds(label: str, call: Any) -> Any:
        def run(base: int, jobs: int) -> Result:
            return closed_loop(
                "a" if label == "one model" else "a+b",
                label,
                lambda i: call(base + i),
                ya[base:],
                jobs=jobs,
                threads=args.threads,
            )

        return run

    half = args.storm_jobs // 2
    by_label, _ = interleaved(
        {
            "one model": (rounds("one model", one_model), half),
            "two models": (
                lambda base, jobs: rounds("two models", alternating)(half + base, jobs),
                half,
            ),
        },
        rounds=4,
        counters=worker.metrics,
        watch=(),
    )
    return by_label["one model"], by_label["two models"]


def hot_load(
    client: PredictionClient,
    repo: Path,
    staging: Path,
    x: Array,
    expected: dict[int, Array],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """A storm on ``a`` that runs through the publication of version 2."""
    counter = iter(range(len(x)))
    lock = threading.Lock()
    finished: list[tuple[float, float, int]] = []  # (finished at, latency ms, version)
    errors: list[str] = []
    published_at = [float("inf")]
    start = threading.Barrier(args.threads + 1)

    def producer() -> None:
        start.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                job = client.submit(x[i : i + 1], model="a")
                out = job.get(60)
                version = job.model_version
            except Exception as e:
                with lock:
                    errors.append(f"job {i}: {type(e).__name__}: {e}")
                continue
            t1 = time.perf_counter()
            want = expected.get(version)
            with lock:
                if want is None or np.max(np.abs(np.asarray(out) - want[i : i + 1])) > ATOL:
                    errors.append(f"job {i}: output differs from version {version}'s")
                finished.append((t1, (t1 - t0) * 1000, version))

    pool = [threading.Thread(target=producer, daemon=True) for _ in range(args.threads)]
    for t in pool:
        t.start()
    started = time.perf_counter()
    start.wait()
    # Publish once a third of the jobs are done, so the load lands mid-storm.
    while True:
        with lock:
            if len(finished) + len(errors) >= len(x) // 3:
                break
        time.sleep(0.01)
    published_at[0] = time.perf_counter()
    _publish(repo, staging, "a", 2)
    for t in pool:
        t.join()
    seconds = time.perf_counter() - started
    before = [ms for at, ms, _ in finished if at < published_at[0]]
    first_v2 = min((at for at, _, v in finished if v == 2), default=None)
    during_end = first_v2 + 1.0 if first_v2 is not None else float("inf")
    during = [ms for at, ms, _ in finished if published_at[0] <= at < during_end]
    after = [ms for at, ms, _ in finished if at >= during_end]
    return {
        "jobs": len(finished),
        "jobs_per_s": round(len(finished) / seconds, 1),
        "errors": len(errors),
        "error_examples": errors[:5],
        "versions": {v: sum(1 for *_, w in finished if w == v) for v in (1, 2)},
        "v2_after_s": None if first_v2 is None else round(first_v2 - published_at[0], 2),
        "p99_ms_before": _p99(before),
        "p99_ms_during_load": _p99(during),
        "p99_ms_after": _p99(after),
        "max_ms_during_load": round(max(during), 1) if during else None,
    }


def _p99(values: list[float]) -> float | None:
    return round(float(np.percentile(values, 99)), 1) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.repository", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--poll-s", type=float, default=1.0, help="PREDICTQ_MODEL_POLL_S")
    args = parser.parse_args()
    args.storm_jobs = 2000 if args.quick else 12_000
    hot_jobs = 3000 if args.quick else 15_000
    rng = np.random.default_rng(7)
    xa = rng.random((max(args.storm_jobs, hot_jobs), 64), dtype=np.float32)
    xb = rng.random((args.storm_jobs, 32), dtype=np.float32)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        repo, staging = Path(tmp, "repo"), Path(tmp, "staging")
        _save_mlp(repo / "a" / "1" / "model.keras", 64, 512, 10, seed=0)
        _save_mlp(repo / "b" / "1" / "model.keras", 32, 128, 5, seed=1)
        _save_mlp(staging / "model.keras", 64, 512, 10, seed=2)
        ya = _reference(repo / "a" / "1" / "model.keras", xa)
        yb = _reference(repo / "b" / "1" / "model.keras", xb)
        ya2 = _reference(staging / "model.keras", xa)
        broker, backend = server.url(0), server.url(1)
        worker = procs.predictq_worker(
            broker,
            backend,
            None,
            concurrency=args.concurrency,
            extra_env={
                "PREDICTQ_QUEUE": "bench-repository",
                "PREDICTQ_MODEL_REPOSITORY": str(repo),
                "PREDICTQ_MODEL_POLL_S": str(args.poll_s),
            },
        )
        try:
            with PredictionClient(
                broker_url=broker,
                result_backend=backend,
                queue="bench-repository",
                result_timeout_s=120,
                max_in_flight=4096,
            ) as client:
                closed_loop(
                    "a",
                    "warm-up",
                    lambda i: client.predict(xa[i : i + 1], model="a"),
                    ya,
                    jobs=100,
                    threads=8,
                )
                one, two = two_models(client, worker, xa, ya, xb, yb, args)
                worker.reset_peak()
                load = hot_load(client, repo, staging, xa[:hot_jobs], {1: ya, 2: ya2}, args)
                load["peak_rss_mb"] = round(worker.peak_rss_mb)
        finally:
            worker.stop()
    print(f"\n{'scenario':<14}{'jobs':>8}{'jobs/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for r in (one, two):
        print(
            f"{r.scenario:<14}{r.jobs:>8}{r.jobs_per_s:>10.1f}{r.pct(50) or 0:>9.1f}"
            f"{r.pct(99) or 0:>9.1f}{r.errors:>8}"
        )
    ratio = two.jobs_per_s / one.jobs_per_s if one.jobs_per_s else 0.0
    print(f"\ntwo models / one model, jobs/s: {ratio:.2f}")
    print(f"hot load of a/2 during a storm: {json.dumps(load)}")
    RESULTS.mkdir(exist_ok=True)
    out = {
        "seconds": round(time.time() - started, 1),
        "quick": args.quick,
        "one_model": one.as_dict(),
        "two_models": two.as_dict(),
        "two_over_one": round(ratio, 3),
        "hot_load": load,
    }
    (RESULTS / "repository.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'repository.json'}")
    errors = one.errors + two.errors + load["errors"]
    if errors or load["versions"][2] == 0:
        raise SystemExit(f"{errors} error(s); version 2 served {load['versions'][2]} jobs")


if __name__ == "__main__":
    main()
