"""The batcher's invariants, with a fake model (pure unit tests; see test_end_to_end for real)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from predictq.errors import DeadlineExceeded, DeviceOutOfMemory, PredictionError, Requeue
from tests.support.processes import wait_for
from workers.arrivals import wait_for_more_s
from workers.batcher import Batcher, BatchStats

Array = np.ndarray[Any, Any]


class FakeModel:
    """Doubles its input; records every batch size; optional failure rules."""

    def __init__(
        self,
        *,
        oom_above: int | None = None,
        fail_on: float | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.batches: list[int] = []
        self.oom_above = oom_above
        self.fail_on = fail_on
        self.gate = gate
        self.entered = threading.Event()
        self.concurrent = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: list[Array]) -> list[Array]:
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        self.entered.set()
        try:
            if self.gate is not None:
                self.gate.wait(10)
            (x,) = inputs
            self.batches.append(x.shape[0])
            if self.oom_above is not None and x.shape[0] > self.oom_above:
                raise DeviceOutOfMemory(f"fake OOM at {x.shape[0]} rows")
            if self.fail_on is not None and (x[:, 0] == self.fail_on).any():
                raise ValueError("poisoned sample")
            return [x * 2, x[:, :1] + 1]
        finally:
            with self._lock:
                self.concurrent -= 1


def rows(start: int, n: int) -> Array:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1).repeat(3, axis=1)


@pytest.fixture()
def make() -> Any:
    batchers: list[Batcher] = []

    def factory(model: Any, **kw: Any) -> Batcher:
        kw.setdefault("max_batch_size", 8)
        kw.setdefault("batch_wait_ms", 5)
        b = Batcher(model, **kw)
        b.start()
        batchers.append(b)
        return b

    yield factory
    for b in batchers:
        b.close(5)


def test_parameters_are_validated_with_the_bad_value_in_the_message() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be integer >= 1, got 0"):
        Batcher(FakeModel(), max_batch_size=0, batch_wait_ms=1)
    with pytest.raises(ValueError, match="batch_wait_ms must be >= 0, got -1"):
        Batcher(FakeModel(), max_batch_size=4, batch_wait_ms=-1)


def test_concurrent_requests_share_one_device_call_and_get_their_own_rows(make: Any) -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = make(model, max_batch_size=64)
    # The first call blocks on the gate so that the next 20 requests queue up.
    first = batcher.submit([rows(1000, 1)])
    assert model.entered.wait(5)
    futures = [batcher.submit([rows(i * 10, 2)]) for i in range(20)]
    gate.set()
    assert np.array_equal(first.result(5)[0], rows(1000, 1) * 2)
    for i, f in enumerate(futures):
        doubled, plus_one = f.result(5)
        assert np.array_equal(doubled, rows(i * 10, 2) * 2)
        assert np.array_equal(plus_one, rows(i * 10, 2)[:, :1] + 1)
    assert model.batches == [1, 40]


def test_only_one_device_call_runs_at_a_time(make: Any) -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=4, batch_wait_ms=0)
    with ThreadPoolExecutor(16) as pool:
        futures = list(pool.map(lambda i: batcher.submit([rows(i, 1)]), range(200)))
    for i, f in enumerate(futures):
        assert f.result(5)[0][0, 0] == 2 * i
    assert model.max_concurrent == 1


def test_the_running_device_call_is_timed_for_the_hang_watchdog(make: Any) -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = make(model, max_batch_size=4)
    assert batcher.call_running_s(time.monotonic()) == 0.0  # idle
    future = batcher.submit([rows(0, 1)])
    assert model.entered.wait(5)
    later = time.monotonic() + 7.0
    assert batcher.call_running_s(later) >= 7.0  # measured from the call's start
    gate.set()
    future.result(5)
    assert batcher.call_running_s(time.monotonic()) == 0.0  # cleared when it returns


def test_batch_is_capped_at_max_batch_size_samples(make: Any) -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = make(model, max_batch_size=5)
    blocker = batcher.submit([rows(0, 1)])
    assert model.entered.wait(5)
    futures = [batcher.submit([rows(i, 2)]) for i in range(6)]
    gate.set()
    blocker.result(5)
    for f in futures:
        f.result(5)
    assert all(b <= 5 for b in model.batches)
    assert sum(model.batches) == 13


def test_a_job_larger_than_max_batch_size_is_split_and_reassembled_in_order(make: Any) -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=8)
    x = rows(0, 37)
    doubled, plus_one = batcher.submit([x]).result(5)
    assert np.array_equal(doubled, x * 2)
    assert np.array_equal(plus_one, x[:, :1] + 1)
    assert max(model.batches) <= 8
    assert sum(model.batches) == 37


def test_a_failing_job_fails_alone_and_its_batch_neighbours_succeed(make: Any) -> None:
    gate = threading.Event()
    model = FakeModel(fail_on=-1.0, gate=gate)
    batcher = make(model, max_batch_size=64)
    blocker = batcher.submit([rows(100, 1)])
    assert model.entered.wait(5)
    good = [batcher.submit([rows(i, 1)]) for i in range(5)]
    bad = batcher.submit([np.full((1, 3), -1.0, dtype=np.float32)])
    more = [batcher.submit([rows(50 + i, 1)]) for i in range(5)]
    gate.set()
    blocker.result(5)
    with pytest.raises(PredictionError, match="poisoned sample") as info:
        bad.result(5)
    assert isinstance(info.value.__cause__, ValueError)
    for i, f in enumerate(good):
        assert f.result(5)[0][0, 0] == 2 * i
    for i, f in enumerate(more):
        assert f.result(5)[0][0, 0] == 2 * (50 + i)


def test_out_of_memory_splits_the_batch_in_halves_until_it_fits(make: Any) -> None:
    gate = threading.Event()
    model = FakeModel(oom_above=3, gate=gate)
    batcher = make(model, max_batch_size=16)
    blocker = batcher.submit([rows(0, 1)])
    assert model.entered.wait(5)
    futures = [batcher.submit([rows(i * 2, 2)]) for i in range(6)]  # 12 rows queued
    gate.set()
    blocker.result(5)
    for i, f in enumerate(futures):
        assert np.array_equal(f.result(5)[0], rows(i * 2, 2) * 2)
    assert 12 in model.batches  # the first try was one batch of all 12 rows
    ok_calls = [b for b in model.batches if b <= 3]
    assert sum(ok_calls) == 13  # every row then ran once in a batch that fit


def test_a_single_job_splits_its_rows_on_oom_and_a_single_sample_that_never_fits_fails_alone(
    make: Any,
) -> None:
    model = FakeModel(oom_above=2)
    batcher = make(model, max_batch_size=16)
    x = rows(0, 7)
    assert np.array_equal(batcher.submit([x]).result(5)[0], x * 2)

    never = FakeModel(oom_above=0)
    batcher2 = make(never, max_batch_size=16)
    with pytest.raises(DeviceOutOfMemory, match="one sample of this job does not fit"):
        batcher2.submit([rows(0, 4)]).result(5)


def test_output_length_is_checked_against_input_length(make: Any) -> None:
    batcher = make(lambda inputs: [inputs[0][:-1]], max_batch_size=8)
    with pytest.raises(PredictionError, match="model output 0 has 2 rows for a batch of 3"):
        batcher.submit([rows(0, 3)]).result(5)


def test_a_request_past_its_deadline_is_dropped_not_run(make: Any) -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = make(model, max_batch_size=8)
    blocker = batcher.submit([rows(0, 1)])
    assert model.entered.wait(5)
    late = batcher.submit([rows(5, 1)], deadline=time.monotonic() - 1)
    on_time = batcher.submit([rows(6, 1)], deadline=time.monotonic() + 60)
    gate.set()
    blocker.result(5)
    with pytest.raises(DeadlineExceeded):
        late.result(5)
    assert on_time.result(5)[0][0, 0] == 12
    assert sum(model.batches) == 2  # the late request never reached the model


def test_isolated_requests_run_alone(make: Any) -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = make(model, max_batch_size=64)
    blocker = batcher.submit([rows(0, 1)])
    assert model.entered.wait(5)
    normal = [batcher.submit([rows(i, 1)]) for i in range(4)]
    alone = batcher.submit([rows(9, 3)], isolated=True)
    also_alone = batcher.submit([rows(20, 1)], isolated=True)
    gate.set()
    blocker.result(5)
    for f in normal:
        f.result(5)
    assert np.array_equal(alone.result(5)[0], rows(9, 3) * 2)
    assert np.array_equal(also_alone.result(5)[0], rows(20, 1) * 2)
    assert model.batches == [1, 4, 3, 1]


def test_the_wait_for_more_jobs_ends_at_once_when_none_is_announced(make: Any) -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=64, batch_wait_ms=10_000)
    started = time.monotonic()
    batcher.submit([rows(0, 1)]).result(5)
    assert time.monotonic() - started < 5  # not the 10 s wait


def test_an_announced_job_is_waited_for_and_joins_the_batch(make: Any) -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=64, batch_wait_ms=10_000)
    announced, go = threading.Event(), threading.Event()
    second: list[Any] = []

    def late_arrival() -> None:
        with batcher.announce():
            announced.set()
            go.wait(5)
            second.append(batcher.submit([rows(7, 1)]))

    announcer = threading.Thread(target=late_arrival)
    announcer.start()
    assert announced.wait(5)
    first = batcher.submit([rows(3, 1)])
    go.set()
    announcer.join(5)
    assert first.result(5)[0][0, 0] == 6
    assert second[0].result(5)[0][0, 0] == 14
    assert model.batches == [2]


def test_announced_jobs_that_fill_a_batch_run_before_the_announcement_ends(make: Any) -> None:
    # Jobs submitted while announced do not wake the device thread one by one;
    # a full batch still does, or it would wait for the announcement to end.
    model = FakeModel()
    batcher = make(model, max_batch_size=4, batch_wait_ms=10_000)
    with batcher.announce():
        futures = [batcher.submit([rows(0, 1)])]
        wait_for(lambda: batcher._filling == 1, 5, "the device thread to wait for more")
        futures += [batcher.submit([rows(i, 1)]) for i in range(1, 4)]
        assert model.entered.wait(5), "a full batch waited for the announcement to end"
        outputs = [f.result(5)[0] for f in futures]
    assert model.batches == [4]
    assert [o[0, 0] for o in outputs] == [0, 2, 4, 6]


def test_a_full_batch_wakes_the_device_thread_after_earlier_batches_were_taken(
    make: Any,
) -> None:
    # submit keeps a running count of the queued samples (summing the queue on
    # every submit made a message's submits quadratic): it must follow what the
    # device thread takes, or a full batch would wait for the announcement to end.
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = make(model, max_batch_size=4, batch_wait_ms=10_000)

    def queued_matches() -> bool:
        with batcher._cond:
            return batcher._queued == sum(p.n for p in batcher._queue)

    with batcher.announce():
        futures = [batcher.submit([rows(i, 1)]) for i in range(4)]
        assert model.entered.wait(5), "the first full batch waited for the announcement"
        # While the first batch computes: two jobs, one of them of two rows.
        futures += [batcher.submit([rows(4, 1)]), batcher.submit([rows(5, 2)])]
        assert queued_matches()
        gate.set()
        wait_for(lambda: batcher._filling == 3, 5, "the device thread to fill the next batch")
        assert queued_matches()
        futures.append(batcher.submit([rows(7, 1)]))  # 3 + 1: a full batch
        outputs = [f.result(5)[0] for f in futures]
        assert queued_matches()
    assert model.batches == [4, 4]
    assert np.concatenate(outputs)[:, 0].tolist() == [2.0 * i for i in range(8)]


def test_announced_jobs_all_join_the_batch_the_first_one_starts(make: Any) -> None:
    model = FakeModel()
    batcher = make(model, max_batch_size=64, batch_wait_ms=10_000)
    with batcher.announce():
        futures = [batcher.submit([rows(i, 1)]) for i in range(5)]
    assert [f.result(5)[0][0, 0] for f in futures] == [0, 2, 4, 6, 8]
    assert model.batches == [5]


def test_waiting_is_worth_it_only_when_another_job_is_expected() -> None:
    # An announced job: wait (up to the budget).
    assert wait_for_more_s(incoming=1, gap_s=None, since_last_s=0, remaining_s=0.004) == 0.004
    # A steady stream, one job every 1 ms: wait for the next one, not longer.
    assert wait_for_more_s(
        incoming=0, gap_s=0.001, since_last_s=0.0005, remaining_s=0.004
    ) == pytest.approx(0.0015)
    # The stream stopped (the next job is overdue): run now.
    assert wait_for_more_s(incoming=0, gap_s=0.001, since_last_s=0.003, remaining_s=0.004) == 0
    # Jobs arrive slower than the budget, or nothing is known: run now.
    assert wait_for_more_s(incoming=0, gap_s=0.010, since_last_s=0, remaining_s=0.004) == 0
    assert wait_for_more_s(incoming=0, gap_s=None, since_last_s=0, remaining_s=0.004) == 0
    assert wait_for_more_s(incoming=3, gap_s=0.0, since_last_s=0, remaining_s=0.0) == 0


def test_a_crashing_device_thread_fails_its_batch_and_hands_back_the_queued_ones() -> None:
    gate = threading.Event()
    entered = threading.Event()

    def crash(inputs: list[Array]) -> list[Array]:
        entered.set()
        gate.wait(5)
        raise SystemExit("the device thread dies")  # not an Exception: escapes per-request handling

    batcher = Batcher(crash, max_batch_size=1, batch_wait_ms=0)
    batcher.start()
    running = batcher.submit([rows(0, 1)])
    assert entered.wait(5)
    queued = [batcher.submit([rows(i, 1)]) for i in range(1, 5)]
    assert batcher.crash is None
    gate.set()
    with pytest.raises(PredictionError, match="device thread crashed"):
        running.result(5)
    # They did nothing wrong: the task hands them back to the queue.
    for f in queued:
        with pytest.raises(Requeue, match="crashed before this job ran"):
            f.result(5)
    with pytest.raises(Requeue):
        batcher.submit([rows(0, 1)])
    assert batcher.wait_ended(5)
    assert isinstance(batcher.crash, SystemExit)


def test_close_finishes_queued_requests_then_refuses_new_ones(make: Any) -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = make(model, max_batch_size=2)
    futures = [batcher.submit([rows(i, 1)]) for i in range(7)]
    closer = threading.Thread(target=batcher.close, args=(10,))
    closer.start()
    gate.set()
    closer.join(10)
    assert [f.result(0)[0][0, 0] for f in futures] == [2 * i for i in range(7)]
    with pytest.raises(Requeue, match="stopping"):
        batcher.submit([rows(0, 1)])


def test_jobs_of_different_feature_shapes_run_in_separate_device_calls(make: Any) -> None:
    gate = threading.Event()
    seen: list[tuple[int, ...]] = []

    def shape_model(inputs: list[Array]) -> list[Array]:
        gate.wait(10)
        seen.append(inputs[0].shape)
        return [inputs[0].sum(axis=1)]

    batcher = make(shape_model, max_batch_size=64)
    blocker = batcher.submit([np.ones((1, 7), np.float32)])
    # Interleaved 3- and 5-feature jobs queue up behind the blocked call.
    jobs = [batcher.submit([np.ones((1, 3 if i % 2 == 0 else 5), np.float32)]) for i in range(6)]
    gate.set()
    assert blocker.result(5)[0][0] == 7
    for i, f in enumerate(jobs):
        assert f.result(5)[0][0] == (3 if i % 2 == 0 else 5)
    # One call per shape, each with all three jobs of that shape: a batcher that mixed them
    # would fail the concatenation and fall back to six one-row calls.
    assert seen == [(1, 7), (3, 3), (3, 5)]


def test_batch_stats_are_reported_per_device_call(make: Any) -> None:
    stats: list[BatchStats] = []
    batcher = make(FakeModel(), max_batch_size=8, on_batch=stats.append)
    batcher.submit([rows(0, 5)]).result(5)
    assert stats[0].samples == 5 and stats[0].requests == 1 and stats[0].device_s >= 0
