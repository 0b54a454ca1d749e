"""`python -m bench.bulk_baseline`: bulk (`predict_many`) now vs the code before coalescing.

Issue #9 asks that bulk be "not slower than today": the code of the day
coalescing began (``BEFORE_COALESCING``), not a ratio to the in-process raw
speed, which moves with the machine of the hour. So this runs both, on this
machine, in one run: the base commit is unpacked from git (``git archive``)
into a temporary directory, and rounds alternate the two checkouts (base,
current, current, base, ...) so that both see the same drift. Each round
starts a worker from its checkout (threads pool, 8 threads, the same
``PREDICTQ_MAX_BATCH_SIZE``), runs ``predict_many`` once to warm up, then
``--reps`` timed runs whose outputs are checked against the in-process model
(bench/bulk_round.py, run with the checkout first on ``sys.path``). Same models,
inputs and chunk sizes as ``python -m bench``.

Prints samples/s per round and the ratio of the means (current / base), and
writes bench/results/bulk-baseline.json. Exits non-zero if an output differs
from the in-process model by more than 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.__main__ import reference
from bench.models import build
from predictq_ops.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: The last commit before coalescing (issue #9): "today" for its bulk target.
BEFORE_COALESCING = "274b627"
ATOL = 1e-5
#: Per model: device batch (PREDICTQ_MAX_BATCH_SIZE) and rows per chunk, as `python -m bench`
#: chooses them on the 2-core machine (raw's best batch; chunks of 8192 and of rows // 20).
SIZES = {"mlp": (4096, 8192), "mobilenetv2": (1024, 1000)}


def unpack(ref: str, into: Path) -> str:
    """The tree of ``ref`` under ``into``; returns the full commit id."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if commit.returncode != 0:
        raise SystemExit(
            f"--base {ref}: not a commit of this clone ({commit.stderr.strip()}); "
            "bench.bulk_baseline needs the project's git history"
        )
    tar = subprocess.run(
        ["git", "archive", "--format=tar", ref], cwd=ROOT, capture_output=True, check=True
    )
    with tarfile.open(fileobj=BytesIO(tar.stdout)) as archive:
        # Files and folders only: some old commits track a `.venv` link to an absolute path.
        members = [m for m in archive.getmembers() if m.isfile() or m.isdir()]
        archive.extractall(into, members=members, filter="data")
    return commit.stdout.strip()


def one_round(
    checkout: Path, server: RedisServer, model: str, files: dict[str, str], reps: int
) -> dict[str, Any]:
    batch, chunk = SIZES[model]
    argv = [sys.executable, str(ROOT / "bench" / "bulk_round.py")]
    argv += ["--broker", server.url(0), "--backend", server.url(1), "--model", files["model"]]
    argv += ["--inputs", files["inputs"], "--expected", files["expected"]]
    argv += ["--chunk", str(chunk), "--max-batch-size", str(batch), "--reps", str(reps)]
    argv += ["--queue", f"bulk-{model}-{time.monotonic_ns()}"]
    # Only the checkout's own code: none of this project's, none of an editable install's path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bulk round in {checkout} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["code"]).resolve() != checkout.resolve():
        raise SystemExit(f"the round for {checkout} ran the client of {result['code']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=BEFORE_COALESCING, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side and model")
    parser.add_argument("--reps", type=int, default=2, help="timed predict_many per round")
    parser.add_argument("--models", default="mlp,mobilenetv2")
    args = parser.parse_args()

    started = time.monotonic()
    report: dict[str, Any] = {"base": args.base, "models": {}}
    failed = False
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        base = Path(tmp) / "base"
        report["base_commit"] = unpack(args.base, base)
        models = {m.name: m for m in build(tmp, quick=False)}
        for name in args.models.split(","):
            m = models[name]
            x = m.inputs(m.bulk_rows, seed=3)
            files = {"model": m.path}
            for label, array in (("inputs", x), ("expected", reference(m.path, x))):
                files[label] = os.path.join(tmp, f"{name}-{label}.npy")
                np.save(files[label], array)
            rates: dict[str, list[float]] = {"base": [], "current": []}
            error = 0.0
            for i in range(args.rounds):
                # base, current, current, base, ...: neither side always runs first.
                order = ("base", "current") if i % 2 == 0 else ("current", "base")
                for side in order:
                    checkout = base if side == "base" else ROOT
                    r = one_round(checkout, server, name, files, args.reps)
                    rates[side] += r["samples_per_s"]
                    error = max(error, r["max_abs_error"])
                    shown = ", ".join(f"{v:,.0f}" for v in r["samples_per_s"])
                    print(f"[{name}] round {i + 1} {side:>7}: {shown} samples/s", flush=True)
            ratio = statistics.mean(rates["current"]) / statistics.mean(rates["base"])
            failed |= error > ATOL
            report["models"][name] = {
                "rows": m.bulk_rows,
                "chunk": SIZES[name][1],
                "max_batch_size": SIZES[name][0],
                "samples_per_s": {k: [round(v) for v in vs] for k, vs in rates.items()},
                "mean_samples_per_s": {k: round(statistics.mean(vs)) for k, vs in rates.items()},
                "current_over_base": round(ratio, 3),
                "max_abs_error": error,
            }
            print(
                f"[{name}] bulk now / before coalescing ({args.base}): {ratio:.2f} "
                f"(means {statistics.mean(rates['current']):,.0f} vs "
                f"{statistics.mean(rates['base']):,.0f} samples/s); "
                f"largest |output - in-process output|: {error:.1e}",
                flush=True,
            )
    report["seconds"] = round(time.monotonic() - started)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bulk-baseline.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['seconds']}s in all)")
    if failed:
        raise SystemExit(f"an output differs from the in-process model by more than {ATOL}")


if __name__ == "__main__":
    main()
