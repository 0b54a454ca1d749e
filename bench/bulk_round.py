"""One side of `python -m bench.bulk_baseline`: bulk runs against one checkout's code.

Run as a script, with the checkout to measure as the working directory and first
on ``sys.path``: the worker, the client and the Redis fixture all come from that
checkout, and this file imports nothing else of the project, so it runs against
code older than itself (the client API it uses, ``PredictionClient(broker_url,
result_backend, queue, result_timeout_s, max_in_flight)`` and ``predict_many(x,
chunk_size, timeout)``, has not changed since bulk prediction existed).

Prints one JSON line: samples/s of each timed ``predict_many`` and the largest
difference from the expected outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--model", required=True, help="the saved model's path")
    parser.add_argument("--inputs", required=True, help=".npy of the bulk input")
    parser.add_argument("--expected", required=True, help=".npy of the in-process outputs")
    parser.add_argument("--chunk", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--queue", required=True)
    args = parser.parse_args()

    root = os.getcwd()
    sys.path.insert(0, root)
    import producer
    from producer import PredictionClient

    x = np.load(args.inputs)
    expected = np.load(args.expected)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREDICTQ_")}
    env.update(
        PYTHONPATH=root,
        TF_CPP_MIN_LOG_LEVEL="2",
        PREDICTQ_BROKER_URL=args.broker,
        PREDICTQ_RESULT_BACKEND=args.backend,
        PREDICTQ_MODEL_PATH=args.model,
        PREDICTQ_QUEUE=args.queue,
        PREDICTQ_MAX_BATCH_SIZE=str(args.max_batch_size),
        PREDICTQ_METRICS_PORT=str(_free_port()),
        PREDICTQ_LOG_LEVEL="WARNING",
    )
    argv = [sys.executable, "-m", "predictq_ops.cli", "worker", "-c", "8"]
    argv += ["-n", f"bulk{_free_port()}@%h"]
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen(argv, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        try:
            with PredictionClient(
                broker_url=args.broker,
                result_backend=args.backend,
                queue=args.queue,
                result_timeout_s=180,
                max_in_flight=4096,
            ) as client:
                # The first prediction waits for the worker to load and warm up;
                # the first chunks warm the bulk path itself.
                client.predict_many(x[: args.chunk * 4], chunk_size=args.chunk, timeout=300)
                rates: list[float] = []
                error = 0.0
                for _ in range(args.reps):
                    started = time.perf_counter()
                    out = client.predict_many(x, chunk_size=args.chunk, timeout=300)
                    rates.append(len(x) / (time.perf_counter() - started))
                    error = max(error, float(np.max(np.abs(np.asarray(out) - expected))))
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
            raise
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    code = os.path.dirname(os.path.dirname(os.path.abspath(producer.__file__)))
    print(json.dumps({"samples_per_s": rates, "max_abs_error": error, "code": code}), flush=True)


if __name__ == "__main__":
    main()
