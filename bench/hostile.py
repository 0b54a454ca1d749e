"""`python -m bench.hostile`: what one big or hostile message costs the jobs behind it.

One real worker (threads pool, default limits) on a private Redis. For each
case, a message is pushed and a valid one-sample job right behind it; the
valid job's latency is compared with the same job's latency on an idle worker
(median of several runs each), and the worker's peak RSS is sampled. Cases:

* JSON bodies of numbers just under ``PREDICTQ_MAX_JSON_BYTES`` (parsed on
  the consumer thread: this is the head-of-line bound of an accepted job);
* a JSON body with one base64 ndarray of the same size (a string parses fast);
* refused messages: a 100 MB JSON body, a gzip bomb (256 MB unpacked), a
  list item that is not JSON.
"""

from __future__ import annotations

import base64
import json
import statistics
import tempfile
import time
import uuid
import zlib
from typing import Any

import numpy as np
import redis

from bench import procs
from bench.models import build
from predictq import codec
from predictq.celeryconf import PREDICT_TASK
from predictq.errors import PredictqError
from predictq.settings import Settings
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient

QUEUE = "bench-hostile"
RUNS = 5


def envelope(body: bytes, content_type: str, encoding: str, **headers: Any) -> bytes:
    task_id = str(uuid.uuid4())
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": encoding,
            "content-type": content_type,
            "headers": {"lang": "py", "task": PREDICT_TASK, "id": task_id, **headers},
            "properties": {
                "delivery_info": {"exchange": "", "routing_key": QUEUE},
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "priority": 0,
            },
        }
    ).encode()


def cases(features: int) -> dict[str, bytes]:
    limit = Settings().max_json_bytes
    rows = int(limit * 0.95) // (features * 9)  # "0.123456," per number
    numbers = np.round(np.random.default_rng(0).random((rows, features)), 6)
    as_lists = json.dumps([[numbers.tolist()], {}, {}]).encode()
    as_map = json.dumps(
        [
            [
                {
                    "__ndarray__": 1,
                    "dtype": "<f4",
                    "shape": [rows, features],
                    "data": base64.b64encode(numbers.astype("<f4").tobytes()).decode(),
                }
            ],
            {},
            {},
        ]
    ).encode()
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    gz = b"".join(bomb.compress(b"\0" * (1 << 20)) for _ in range(256)) + bomb.flush()
    return {
        f"JSON numbers, {len(as_lists) / 2**20:.1f} MiB (accepted)": envelope(
            as_lists, "application/json", "utf-8"
        ),
        f"JSON base64 ndarray, {len(as_map) / 2**20:.1f} MiB (accepted)": envelope(
            as_map, "application/json", "utf-8"
        ),
        "JSON zeros, 100 MiB (refused: too large)": envelope(
            b"[[[" + b"0," * (50 * 2**20) + b"0]],{},{}]", "application/json", "utf-8"
        ),
        "gzip bomb, 256 MiB unpacked (refused)": envelope(
            gz, codec.CONTENT_TYPE, "binary", compression="gzip"
        ),
        "list item that is not JSON (refused)": b"not json {",
    }


def latency_ms(client: PredictionClient, x: np.ndarray[Any, Any]) -> float:
    started = time.perf_counter()
    client.predict(x, timeout=120)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    model = build(tempfile.mkdtemp(prefix="bench-hostile-"), quick=True)[0]  # the MLP
    x = model.inputs(1, seed=3)
    with RedisServer() as server:
        worker = procs.predictq_worker(
            server.url(0),
            server.url(1),
            model.path,
            concurrency=8,
            extra_env={"PREDICTQ_QUEUE": QUEUE},
        )
        push = redis.Redis.from_url(server.url(0))
        try:
            with PredictionClient(
                broker_url=server.url(0), result_backend=server.url(1), queue=QUEUE
            ) as client:
                for _ in range(3):
                    latency_ms(client, x)  # warm
                idle = statistics.median(latency_ms(client, x) for _ in range(RUNS))
                print(f"{'case':<48} {'next job p50 ms':>16} {'delay ms':>9} {'peak RSS MiB':>13}")
                print(f"{'idle worker':<48} {idle:>16.1f} {0:>9.1f} {worker.peak_rss_mb:>13.0f}")
                for name, raw in cases(model.sample_shape[0]).items():
                    worker.reset_peak()
                    runs = []
                    for _ in range(RUNS if len(raw) < 2**24 else 1):
                        push.lpush(QUEUE, raw)
                        runs.append(latency_ms(client, x))
                    p50 = statistics.median(runs)
                    print(f"{name:<48} {p50:>16.1f} {p50 - idle:>9.1f} {worker.peak_rss_mb:>13.0f}")
                if worker.process.poll() is not None:
                    raise PredictqError("the worker died")
        finally:
            push.close()
            worker.stop()


if __name__ == "__main__":
    main()
