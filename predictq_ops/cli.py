"""The ``predictq`` command: worker, flower, up, predict, health, info.

Every command reads its settings from ``PREDICTQ_*`` variables (see
``predictq info``); options override single settings. Errors print one line
(use ``--debug`` for the traceback) and exit with status 1 (2 for usage).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any, NoReturn

import click
import numpy as np
import redis

from predictq.errors import PredictqError
from predictq.settings import Settings, mask_url


class _Cli(click.Group):
    """Turns any error into one clear line (the full traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors and deliberate exits: click reports them itself
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            described = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            click.echo(f"predictq: error: {described}", err=True)
            ctx.exit(1)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="predictq")
def cli(debug: bool) -> None:
    """Asynchronous Keras prediction through Celery and Redis.

    Settings come from PREDICTQ_* environment variables; `predictq info` lists them.
    """


#: The Celery command line for predictq's worker app, run by this interpreter.
_CELERY = (sys.executable, "-m", "celery", "-A", "workers")


def _exec(argv: list[str], env: dict[str, str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--model", "model_path", help="Model to serve (sets PREDICTQ_MODEL_PATH).")
@click.option(
    "--pool",
    type=click.Choice(["threads", "prefork", "solo"]),
    default="threads",
    show_default=True,
    help="Celery pool; threads shares one model per process.",
)
@click.option(
    "-c",
    "--concurrency",
    type=int,
    help="Pool size (default PREDICTQ_WORKER_CONCURRENCY): jobs that can share a batch.",
)
@click.option(
    "-n", "--hostname", default="predictq@%h", show_default=True, help="Celery node name."
)
@click.option("-l", "--loglevel", help="Log level (default PREDICTQ_LOG_LEVEL).")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    model_path: str | None,
    pool: str,
    concurrency: int | None,
    hostname: str,
    loglevel: str | None,
    celery_args: tuple[str, ...],
) -> None:
    """Run a worker: `celery -A workers worker` with predictq's defaults.

    Extra arguments go to Celery unchanged, e.g. `predictq worker -- --max-tasks-per-child 0`.
    """
    env = dict(os.environ)
    if model_path:
        env["PREDICTQ_MODEL_PATH"] = model_path
    settings = Settings.from_env(env)
    if not settings.model_path and not settings.model_repository:
        raise click.UsageError(
            "no model: pass --model, or set PREDICTQ_MODEL_PATH or PREDICTQ_MODEL_REPOSITORY"
        )
    argv = [
        *_CELERY,
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency or settings.worker_concurrency),
        "--queues",
        settings.queue,
        "--hostname",
        hostname,
        "--loglevel",
        loglevel or settings.log_level,
        # Mingle and gossip make every worker talk to every other on start and
        # on each event; predictq workers share nothing, so they only cost.
        "--without-mingle",
        "--without-gossip",
        *celery_args,
    ]
    _exec(argv, env)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", type=int, help="HTTP port (default PREDICTQ_FLOWER_PORT).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int | None, flower_args: tuple[str, ...]) -> None:
    """Run Flower against the predictq queue, with basic auth from PREDICTQ_FLOWER_BASIC_AUTH.

    Without basic auth, Flower listens on 127.0.0.1 only (any other --address is an error).
    """
    settings = Settings.from_env()
    argv = [
        *_CELERY,
        "flower",
        f"--port={port or settings.flower_port}",
    ]
    if settings.flower_basic_auth:
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth  # not argv: ps shows argv
    _exec([*argv, *flower_args], dict(os.environ))


@cli.command()
@click.option(
    "--demo",
    is_flag=True,
    help="Train a small model on scikit-learn's digits, serve it, predict through it.",
)
@click.option("--model", "model_path", help="Model to serve (default PREDICTQ_MODEL_PATH).")
@click.option("--once", is_flag=True, help="Stop everything after start-up (and the demo).")
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
def up(demo: bool, model_path: str | None, once: bool, no_flower: bool) -> None:
    """Start Redis (embedded if none is configured or reachable), a worker and Flower.

    Ctrl-C (or SIGTERM) stops all of them; during start-up, with status 130 (143).
    """
    from predictq_ops.up import StartupInterrupted, Supervisor, UpOptions

    settings = Settings.from_env()
    options = UpOptions(
        demo=demo, once=once, flower=not no_flower, model_path=model_path, echo=click.echo
    )
    supervisor = Supervisor(settings, options)
    supervisor.install_signal_handlers()
    code = 0
    try:
        started = supervisor.start()
        if demo:
            _run_demo(settings, started)
            supervisor.raise_if_interrupted()
        if not once:
            click.echo("predictq is up; press Ctrl-C to stop.")
            code = supervisor.wait()
    except StartupInterrupted as e:
        click.echo(f"predictq: {e}", err=True)
        # What a shell reports for a process that the signal ended.
        code = 128 + supervisor.stop_signal
    finally:
        click.echo("stopping ...")
        supervisor.stop()
        click.echo("stopped.")
    sys.exit(code)


def _run_demo(settings: Settings, started: dict[str, str]) -> None:
    from predictq_ops.demo import evaluate
    from producer import PredictionClient

    config = settings.replace(
        broker_url=started["broker_url"], result_backend=started["result_backend"]
    )
    with PredictionClient(config) as client:
        with np.load(started["holdout"]) as data:
            x, y = data["x"], data["y"]
        click.echo("demo:   5 single jobs through the queue:")
        for i in range(5):
            t0 = time.perf_counter()
            probs = client.predict(x[i : i + 1], timeout=60)
            ms = (time.perf_counter() - t0) * 1000
            click.echo(
                f"          sample {i}: predicted {int(probs.argmax())} "
                f"(p={probs.max():.3f}), true {int(y[i])}  [{ms:.1f} ms]"
            )
        accuracy, _ = evaluate(
            lambda batch: client.predict_many(batch, chunk_size=16, progress=True, timeout=120),
            started["holdout"],
        )
    click.echo(
        f"demo:   accuracy on {len(y)} held-out digits, predicted through the queue: {accuracy:.1%}"
    )
    if started["flower_url"]:
        click.echo(f"demo:   watch the tasks in Flower: {started['flower_url']}/tasks")


@cli.command()
@click.argument("input_path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o",
    "--output",
    "output_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write predictions: .npy (one output) or .npz.",
)
@click.option("--chunk-size", type=int, default=4096, show_default=True, help="Rows per job.")
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show a progress bar."
)
@click.option("--timeout", "timeout_s", type=float, help="Seconds to wait for each chunk.")
def predict(
    input_path: str, output_path: str, chunk_size: int, progress: bool, timeout_s: float | None
) -> None:
    """Predict a .npy file (or a .npz of named inputs) through the queue."""
    from producer import PredictionClient

    if not output_path.endswith((".npy", ".npz")):
        raise click.BadParameter(
            f"must end in .npy (one output) or .npz, got {output_path!r}",
            param_hint="'-o' / '--output'",
        )
    if input_path.endswith(".npz"):
        with np.load(input_path) as data:
            inputs: Any = {k: data[k] for k in data.files}
        if len(inputs) == 1:
            inputs = next(iter(inputs.values()))
    else:
        inputs = np.load(input_path, mmap_mode="r")
    with PredictionClient() as client:
        outputs = client.predict_many(
            inputs, chunk_size=chunk_size, progress=progress, timeout=timeout_s
        )
    _write_outputs(outputs, output_path)
    click.echo(f"wrote {output_path}", err=True)


class OutputFormatError(PredictqError):
    """The ``-o`` file type cannot hold the model's outputs (several outputs need .npz)."""


def _write_outputs(outputs: Any, path: str) -> None:
    """Write exactly ``path`` (.npy or .npz, checked up front): one array, or every output."""
    if isinstance(outputs, np.ndarray) and path.endswith(".npy"):
        np.save(path, outputs)
        return
    if path.endswith(".npy"):
        what = (
            f"named outputs ({', '.join(outputs)})"
            if isinstance(outputs, dict)
            else f"a list of {len(outputs)} outputs"
        )
        raise OutputFormatError(
            f"the model returns {what} and a .npy file holds one array: "
            f"write them to a .npz instead (-o {path.removesuffix('.npy')}.npz)"
        )
    if isinstance(outputs, dict):
        named = outputs
    elif isinstance(outputs, list | tuple):
        named = {f"output_{i}": o for i, o in enumerate(outputs)}
    else:
        named = {"output_0": outputs}
    np.savez(path, **named)


@cli.command()
@click.option(
    "--any",
    "any_host",
    is_flag=True,
    help="Healthy if any worker anywhere is ready (default: a worker on this host).",
)
@click.option("--verbose", "-v", is_flag=True, help="Print the ready workers.")
def health(any_host: bool, verbose: bool) -> None:
    """Exit 0 only if a worker has its model loaded and warm and is consuming jobs."""
    from predictq.readiness import serving_records
    from predictq.redis_client import client_for

    settings = Settings.from_env()
    client = client_for(settings, settings.result_backend, socket_timeout_s=3.0)
    records = serving_records(client, hostname=None if any_host else socket.gethostname())
    if verbose:
        for r in records:
            click.echo(
                f"{r['nodename']} pid {r['pid']}: {r['pool']} pool on {r['device']}, models "
                f"{_versions_line(r)}, loads={r['loads']}"
            )
    if not records:
        where = "anywhere" if any_host else f"on host {socket.gethostname()}"
        click.echo(f"unhealthy: no worker with a warm model consuming jobs {where}", err=True)
        sys.exit(1)
    click.echo(f"healthy: {len(records)} worker process(es) ready")


@cli.command()
@click.option(
    "--load", is_flag=True, help="Load PREDICTQ_MODEL_PATH here instead of asking a running worker."
)
def info(load: bool) -> None:
    """Print the effective settings (secrets masked), the models and versions served, and the
    default model's input/output spec."""
    from predictq.readiness import read_records
    from predictq.redis_client import client_for
    from workers.backends import resolve

    settings = Settings.from_env()
    click.echo("settings:")
    for name, value in settings.public_items():
        click.echo(f"  {name}={value}")
    backend = resolve(settings)  # what a worker started here would run
    spec: dict[str, Any] | None = None
    source = ""
    served: dict[str, Any] = {}
    if not load:
        try:
            records = read_records(
                client_for(settings, settings.result_backend, socket_timeout_s=2)
            )
        except redis.RedisError as e:
            click.echo(
                f"(no running worker reachable at {mask_url(settings.result_backend)}: {e})",
                err=True,
            )
            records = []
        if records:
            spec, source = records[0].get("model"), f"worker {records[0]['nodename']}"
            served = records[0].get("models") or {}
            backend = records[0].get("backend", "tensorflow")
    if spec is None and not served and settings.model_path:
        from workers.backends import select
        from workers.model import load_model

        select(settings)  # before Keras is imported
        spec, source = load_model(settings.model_path).spec.as_dict(), "loaded here"
    click.echo(f"keras backend: {backend}")
    if served:
        click.echo(f"models ({source}):")
        for name, entry in served.items():
            click.echo(
                f"  {name}: versions {entry['versions']}, inputs {entry['spec']['inputs']}, "
                f"outputs {entry['spec']['outputs']}"
            )
    elif settings.model_repository:
        from workers.repository import scan

        on_disk = {n: [v.version for v in vs] for n, vs in scan(settings).items()}
        click.echo(f"models on disk in {settings.model_repository}: {on_disk}")
    if spec is None:
        if not served and not settings.model_repository:
            click.echo("model: unknown (no running worker and no PREDICTQ_MODEL_PATH)")
        return
    click.echo(f"model ({source}):")
    click.echo("  " + json.dumps(spec, indent=2).replace("\n", "\n  "))


def _versions_line(record: dict[str, Any]) -> str:
    models = record.get("models") or {}
    return ", ".join(f"{name} {entry['versions']}" for name, entry in models.items()) or "none"


@cli.group("dead-letters")
def dead_letters() -> None:
    """Inspect refused broker messages (predictq:dead-letters in the broker's Redis)."""


def _dead_letter_store() -> Any:
    from predictq.deadletters import DeadLetters
    from predictq.redis_client import client_for

    settings = Settings.from_env()
    return DeadLetters(
        client_for(settings, settings.broker_url),
        max_entries=settings.dead_letter_max,
        max_chars=settings.dead_letter_max_bytes,
    )


@dead_letters.command("list")
@click.option("--limit", type=int, default=50, show_default=True, help="Newest entries to show.")
def dead_letters_list(limit: int) -> None:
    """One line per entry, newest first: id, time, reason, task id, queue, detail."""
    store = _dead_letter_store()
    for e in store.entries(limit):
        click.echo(
            f"{e.entry_id[:12]}  {e.at[:19]}  {e.reason:<12}  {e.task_id or '-'}  "
            f"{e.queue}  {e.detail[:120]}"
        )
    summary = store.summary()
    click.echo(f"{summary['entries']} dead letter(s): {summary['by_reason']}", err=True)


@dead_letters.command("show")
@click.argument("entry_id")
def dead_letters_show(entry_id: str) -> None:
    """The whole entry as JSON (ENTRY_ID may be a unique prefix)."""
    click.echo(json.dumps(_dead_letter_store().get(entry_id).__dict__, indent=2))


@dead_letters.command("requeue")
@click.argument("entry_id")
def dead_letters_requeue(entry_id: str) -> None:
    """Push the message back onto its queue (after fixing the cause) and drop the entry."""
    entry = _dead_letter_store().requeue(entry_id)
    click.echo(f"requeued {entry.entry_id} onto {entry.queue}")


@dead_letters.command("purge")
def dead_letters_purge() -> None:
    """Delete every entry."""
    click.echo(f"purged {_dead_letter_store().purge()} dead letter(s)")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="predictq")


if __name__ == "__main__":
    main()
