"""The measured scenarios: each returns a Result, checked against in-process outputs."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
ATOL = 1e-5


@dataclass
class Result:
    """What one scenario measured."""

    scenario: str
    model: str
    jobs: int
    samples: int
    seconds: float
    errors: int = 0
    max_abs_err: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    peak_rss_mb: float | None = None
    note: str = ""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("latencies_ms")
        d.update(
            samples_per_s=round(self.samples_per_s, 1),
            jobs_per_s=round(self.jobs_per_s, 1),
            p50_ms=self.pct(50),
            p99_ms=self.pct(99),
        )
        return d


def check_distinguishes(label: str, expected: Array, sample: int = 2000) -> None:
    """Fail unless the model's outputs tell its inputs apart by more than ``2 * ATOL``.

    Every scenario compares each job's output with the in-process output for its
    own input; that catches rows mixed up between jobs only if different inputs
    give different outputs. (An untrained conv net once gave 0.1 everywhere.) A
    row that is within ``ATOL`` of another input's output is caught only if the
    two outputs are more than ``2 * ATOL`` apart: this checks that for 99% of
    (the first ``sample``) rows, against their nearest neighbour (max-abs).
    """
    rows = expected.reshape(len(expected), -1)[:sample].astype(np.float64)
    if len(rows) < 2:
        return
    nearest = np.empty(len(rows))
    for i in range(0, len(rows), 128):
        d = np.abs(rows[i : i + 128, None, :] - rows[None, :, :]).max(axis=-1)
        d[np.arange(len(d)), np.arange(i, i + len(d))] = np.inf  # not itself
        nearest[i : i + len(d)] = d.min(axis=1)
    apart = int(np.sum(nearest > 2 * ATOL))
    if apart < 0.99 * len(rows):
        raise RuntimeError(
            f"{label}: only {apart} of {len(rows)} distinct inputs give outputs more than "
            f"{2 * ATOL:g} from every other one's; the benchmark's output check (atol "
            f"{ATOL:g}) would not catch rows mixed up between jobs"
        )


def _error(got: Any, want: Array) -> float:
    got = np.asarray(got, dtype=np.float32)
    if got.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got - want))) if got.size else 0.0


def raw(
    model_path: str,
    x: Array,
    expected: Array,
    name: str,
    batch_sizes: tuple[int, ...] = (1, 64, 256, 1024, 4096),
) -> tuple[Result, float, float]:
    """In-process compiled call at the best batch size, plus the batch-1 time (ms) back to
    back and alone (after a pause, as a job on an idle worker gets it)."""
    from workers.model import load_model

    model = load_model(model_path)
    best: Result | None = None
    batch1_ms = 0.0
    for bs in batch_sizes:
        batch = x[:bs]
        model([batch])
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.5:
            (out,) = model([batch])
            calls += 1
        seconds = time.perf_counter() - started
        if bs == 1:
            batch1_ms = seconds / calls * 1000
        result = Result(
            "raw",
            name,
            calls,
            calls * bs,
            seconds,
            max_abs_err=_error(out, expected[:bs]),
            note=f"batch {bs}",
        )
        if best is None or result.samples_per_s > best.samples_per_s:
            best = result
    assert best is not None
    alone = []
    for _ in range(100):
        time.sleep(0.005)  # a pause between lone jobs, as on an idle worker
        started = time.perf_counter()
        model([x[:1]])
        alone.append((time.perf_counter() - started) * 1000)
    return best, batch1_ms, float(np.median(alone))


def closed_loop(
    name: str,
    scenario: str,
    call: Callable[[int], Any],
    expected: Array,
    *,
    jobs: int,
    threads: int,
    time_box_s: float | None = None,
    rows_per_job: int = 1,
) -> Result:
    """``threads`` producers, each sending one job and waiting for it before the next."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    worst = [0.0]
    done = [0]
    stop_at = [float("inf")]
    start_barrier = threading.Barrier(threads + 1)

    def producer() -> None:
        start_barrier.wait()
        while True:
            i = next(counter)
            if i >= jobs or time.perf_counter() > stop_at[0]:
                return
            t0 = time.perf_counter()
            try:
                out = call(i)
                err = _error(out, expected[i * rows_per_job : (i + 1) * rows_per_job])
            except Exception:
                with lock:
                    errors[0] += 1
                continue
            ms = (time.perf_counter() - t0) * 1000
            with lock:
                latencies.append(ms)
                done[0] += 1
                worst[0] = max(worst[0], err)
                if err > ATOL:
                    errors[0] += 1

    pool = [threading.Thread(target=producer, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    started = time.perf_counter()
    if time_box_s is not None:
        stop_at[0] = started + time_box_s
    start_barrier.wait()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - started
    return Result(
        scenario,
        name,
        done[0],
        done[0] * rows_per_job,
        seconds,
        errors[0],
        worst[0],
        latencies,
        note=f"{threads} producer threads",
    )


def noop_call(single: Any, x: Array, expected: Array) -> Callable[[int], Any]:
    """Job ``i`` as a ``predictq.noop`` task through ``single`` (a client with coalescing
    off): one message per job, a task that does nothing, the per-message ceiling. Returns
    the expected row, so ``closed_loop``'s check passes (the task itself returns None)."""
    from predictq.celeryconf import NOOP_TASK
    from producer import wire

    def call(i: int) -> Any:
        one = wire.normalize(x[i : i + 1])
        single._submit(one, deadline_s=None, rows=None, task=NOOP_TASK).get()
        return expected[i : i + 1]

    return call


def async_storm(
    name: str,
    apredict: Callable[[Array], Awaitable[Any]],
    x: Array,
    expected: Array,
    *,
    jobs: int,
    in_flight: int,
) -> Result:
    """``in_flight`` asyncio tasks on one event loop, each awaiting one single-sample
    prediction (its own row of ``x``) after another, as an asyncio service's handlers do."""
    latencies: list[float] = []
    errors = [0]
    worst = [0.0]
    counter = itertools.count()

    async def handler() -> None:
        while (i := next(counter)) < jobs:
            t0 = time.perf_counter()
            try:
                out = await apredict(x[i : i + 1])
            except Exception:
                errors[0] += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            err = _error(out, expected[i : i + 1])
            worst[0] = max(worst[0], err)
            if err > ATOL:
                errors[0] += 1

    async def storm() -> None:
        await asyncio.gather(*(handler() for _ in range(in_flight)))

    started = time.perf_counter()
    asyncio.run(storm())
    seconds = time.perf_counter() - started
    return Result(
        "predictq asyncio storm",
        name,
        len(latencies),
        len(latencies),
        seconds,
        errors[0],
        worst[0],
        latencies,
        note=f"{in_flight} in flight on one event loop",
    )


#: One round of a scenario: (first job index, number of jobs) -> its Result.
Round = Callable[[int, int], Result]


def interleaved(
    scenarios: dict[str, tuple[Round, int]],
    *,
    rounds: int,
    counters: Callable[[], dict[str, float]],
    watch: tuple[str, ...],
) -> tuple[dict[str, Result], dict[str, dict[str, float]]]:
    """Each scenario (label: (round, total jobs)) in ``rounds`` alternating rounds, so all
    see the same minutes of machine noise; each Result sums its rounds. Also returns, per
    label, how much each ``watch``ed worker counter grew during that label's rounds."""
    totals: dict[str, Result] = {}
    grown: dict[str, dict[str, float]] = {}
    for k in range(rounds):
        for label, (run, jobs) in scenarios.items():
            per_round = jobs // rounds
            before = counters()
            r = run(k * per_round, per_round)
            after = counters()
            for name in watch:
                g = grown.setdefault(label, {})
                g[name] = g.get(name, 0.0) + after.get(name, 0.0) - before.get(name, 0.0)
            t = totals.get(label)
            if t is None:
                totals[label] = r
                r.note += f", {rounds} interleaved rounds"
                continue
            t.jobs += r.jobs
            t.samples += r.samples
            t.seconds += r.seconds
            t.errors += r.errors
            t.max_abs_err = max(t.max_abs_err, r.max_abs_err)
            t.latencies_ms += r.latencies_ms
    return totals, grown


def bulk(
    name: str, predict_many: Callable[[Array], Array], x: Array, expected: Array, note: str
) -> Result:
    started = time.perf_counter()
    out = predict_many(x)
    seconds = time.perf_counter() - started
    err = _error(out, expected)
    return Result("predictq bulk", name, 1, len(x), seconds, int(err > ATOL), err, note=note)
