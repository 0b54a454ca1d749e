"""TensorFlow: a concrete function traced once, memory growth or a memory limit per GPU.

Inference never goes through ``model.predict()``, which builds a data pipeline
per call (about 100 ms for a tiny MLP) and leaks memory when called in a loop;
one ``tf.function`` with a batch-polymorphic input signature is traced once, and
its concrete function serves batches of any size.

Device settings must be applied before TensorFlow touches a device (the first
op or model load): memory growth and memory limits cannot be changed once a GPU
is initialized. ``CUDA_VISIBLE_DEVICES`` is honoured as is, because TensorFlow
reads it itself; predictq never overrides it. TensorFlow runs float32 matrix
products and convolutions in TF32 on NVIDIA GPUs by default; predictq turns
that off unless ``PREDICTQ_GPU_TF32`` is on (README, Deployment).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from predictq.errors import ConfigError, DeviceOutOfMemory, ModelLoadError, PredictqError
from predictq.settings import Settings
from predictq.structure import flatten, unflatten
from workers.backends.base import Backend, CompiledCall, DeviceInfo, failed, warm_sizes
from workers.spec import ModelSpec, check_inputs, tensor_spec

log = logging.getLogger(__name__)


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def check_one_tensorflow(installed: Callable[[str], bool] = _installed) -> None:
    """Refuse an environment holding both ``tensorflow`` and ``tensorflow-cpu``.

    Both install the same ``tensorflow`` module: whichever was installed last
    overwrote part of the other's files, and the mix fails in ways that look
    like model bugs (missing ops, wrong kernels, crashes on the first call).
    """
    if installed("tensorflow") and installed("tensorflow-cpu"):
        raise ConfigError(
            "both tensorflow and tensorflow-cpu are installed, and they overwrite each other: "
            "pip uninstall -y tensorflow tensorflow-cpu, then pip install tensorflow "
            "(predictq[gpu] for CUDA)"
        )


def op_error_text(error: BaseException, max_chars: int = 1000) -> str:
    """The error's own text, without the Python traceback of where the op was traced.

    TensorFlow prefixes graph errors with "Graph execution error: Detected at
    node ... defined at (most recent call last):" and a stack of the *tracing*
    call (here: the worker's start-up), which says nothing about the job and
    would fill the caller's error message with kilobytes of file paths.
    """
    paragraphs = str(getattr(error, "message", None) or error).split("\n\n")
    kept = [
        p
        for p in paragraphs
        if p.strip() != "Graph execution error:"
        and not p.startswith(("Detected at node", "  File "))
    ]
    text = " ".join(" ".join(kept).split())
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _disable_thread_spinning() -> None:
    """Make TensorFlow's thread pools sleep between ops instead of spin-waiting for work.

    TensorFlow spins by default: after each op its idle pool threads keep a core
    busy for a while, waiting for the next. That core is what the worker's
    Celery and predictq threads (and, on a shared host, Redis and producers)
    need. Measured on 2 shared cores (README, Benchmark): in process, the conv
    net's batch-16 call 6.9 -> 5.4 ms at 8.7 -> 5.9 ms of CPU, batch 1 4.0 ->
    2.8 ms, batches of 256+ unchanged; through the worker, an asyncio storm
    gains 10-20% and a closed-loop storm loses about as much (each call then
    wakes sleeping threads): spinning stays on by default, as in TensorFlow.

    TF 2 has no public API for ``ConfigProto.experimental.disable_thread_spinning``
    in eager mode (``tf.compat.v1.enable_eager_execution(config=...)`` is a no-op
    once eager is the default), but the eager context serializes its
    ``ConfigProto`` (``Context._config`` plus the ``tf.config`` deltas) into the
    runtime when it initializes, which creates the pools; so the proto is set
    there, before that. Like ``tf.config.threading``, it cannot change later.
    """
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    ctx: Any = context.context()
    if ctx._initialized:
        log.warning(
            "TensorFlow is already initialized in this process: its thread pools keep spinning"
        )
        return
    config = config_pb2.ConfigProto()
    if ctx._config is not None:
        config.CopyFrom(ctx._config)
    config.experimental.disable_thread_spinning = True
    ctx._config = config
    log.info("TensorFlow thread pools sleep between ops (PREDICTQ_TF_THREAD_SPINNING=false)")


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may run on: its CPU affinity (``taskset``), capped by a
    cgroup v2 CPU quota (``docker run --cpus``, a Kubernetes CPU limit), which the
    affinity does not show: a container limited to 2 CPUs of a 16-core host sees 16."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    try:
        with open(cpu_max) as f:
            quota = quota_cores(f.read())
    except OSError:
        quota = None  # no cgroup v2 CPU controller here
    return cores if quota is None else min(cores, quota)


def quota_cores(cpu_max: str) -> int | None:
    """Whole cores of a cgroup v2 ``cpu.max`` ("<quota> <period>", or "max ..." for none)."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return max(1, -(-quota // period)) if period > 0 else None


def _cpu_threads(settings: Settings) -> int:
    """Set TensorFlow's intra-op threads for CPU compute; returns the row parts of a batch.

    By default one part per usable core, each op on one thread (workers/shards.py);
    an explicit ``PREDICTQ_INTRA_OP_THREADS`` turns the parts off unless
    ``PREDICTQ_CPU_SHARDS`` asks for them too.
    """
    import tensorflow as tf

    parts = settings.cpu_shards
    if parts is None:
        parts = usable_cores() if settings.intra_op_threads is None else 1
    intra = settings.intra_op_threads
    if intra is None and parts > 1:
        intra = 1
    if intra is not None:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if parts > 1:
        log.info(
            "CPU: batches of %d+ rows run as up to %d parts at once, %s intra-op thread(s) each",
            2 * settings.cpu_shard_min_rows,
            parts,
            intra,
        )
    return parts


class TensorflowBackend(Backend):
    """Keras on TensorFlow (the default)."""

    name = "tensorflow"

    def configure_devices(self, settings: Settings) -> DeviceInfo:
        check_one_tensorflow()
        import tensorflow as tf

        if not settings.tf_thread_spinning:
            _disable_thread_spinning()
        if settings.inter_op_threads is not None:
            tf.config.threading.set_inter_op_parallelism_threads(settings.inter_op_threads)
        tf.config.experimental.enable_tensor_float_32_execution(settings.gpu_tf32)

        # Listing devices does not initialize the runtime: thread counts can still change.
        gpus = tf.config.list_physical_devices("GPU")
        if settings.device == "cpu" or not gpus:
            if settings.device == "gpu":
                raise ConfigError(
                    "PREDICTQ_DEVICE=gpu but TensorFlow sees no GPU (check CUDA_VISIBLE_DEVICES, "
                    "the NVIDIA driver, and that predictq[gpu] is installed)"
                )
            if gpus:
                tf.config.set_visible_devices([], "GPU")
            return DeviceInfo("cpu", (), _cpu_threads(settings))
        if settings.intra_op_threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(settings.intra_op_threads)
        for gpu in gpus:
            if settings.gpu_memory_limit_mb is not None:
                # A logical device with a memory limit replaces memory growth:
                # TensorFlow refuses both on one device.
                limit = tf.config.LogicalDeviceConfiguration(
                    memory_limit=settings.gpu_memory_limit_mb
                )
                tf.config.set_logical_device_configuration(gpu, [limit])
            elif settings.gpu_memory_growth:
                tf.config.experimental.set_memory_growth(gpu, True)
        names = tuple(g.name for g in gpus)
        log.info("computing on GPU(s) %s", ", ".join(names))
        return DeviceInfo("gpu", names)

    def compile(
        self, model: Any, spec: ModelSpec, out_names: Sequence[str], *, max_batch_size: int | None
    ) -> CompiledCall:
        import tensorflow as tf

        signature = [tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=s.name) for s in spec.inputs]
        traces = [0]

        def call(*xs: Any) -> list[Any]:
            traces[0] += 1  # runs while tracing only
            out = model(unflatten(spec.input_layout, xs), training=False)
            return flatten(out, order=list(out_names))[1]

        # Calling the concrete function skips tf.function's per-call signature
        # dispatch (about 0.3 ms per call, most of a small model's batch-1 time).
        fn = tf.function(call, input_signature=signature, autograph=False).get_concrete_function()
        return CompiledCall(fn, lambda: traces[0], warm_sizes(max_batch_size))

    def model_error(self, error: Exception) -> PredictqError | None:
        import tensorflow as tf

        if isinstance(error, tf.errors.ResourceExhaustedError):
            return DeviceOutOfMemory(f"device out of memory: {op_error_text(error)}")
        if isinstance(error, tf.errors.OpError | ValueError | TypeError):
            return failed(error, op_error_text(error))
        return None

    def load_savedmodel(
        self, path: str, *, max_batch_size: int | None
    ) -> tuple[ModelSpec, CompiledCall]:
        """A SavedModel directory, through its ``serving_default`` signature."""
        import tensorflow as tf

        loaded = tf.saved_model.load(path)
        try:
            signature = loaded.signatures["serving_default"]
        except KeyError as e:
            raise ModelLoadError(
                f"SavedModel {path!r} has no 'serving_default' signature "
                f"(signatures: {list(loaded.signatures)})"
            ) from e
        _, kw_specs = signature.structured_input_signature
        names = sorted(kw_specs)
        inputs = tuple(tensor_spec(n, kw_specs[n].shape, kw_specs[n].dtype) for n in names)
        out_specs = signature.structured_outputs
        out_names = sorted(out_specs)
        outputs = tuple(tensor_spec(n, out_specs[n].shape, out_specs[n].dtype) for n in out_names)
        check_inputs(path, inputs)
        spec = ModelSpec(
            path,
            "savedmodel",
            inputs,
            outputs,
            "single" if len(inputs) == 1 else "dict",
            "single" if len(outputs) == 1 else "dict",
        )

        def call(*xs: Any) -> list[Any]:
            # The signature is already a concrete function with a None batch
            # dimension; keep `loaded` referenced so its variables stay alive.
            result = signature(**dict(zip(names, xs, strict=True)))
            return [result[k] for k in out_names]

        call.__dict__["_keepalive"] = loaded
        return spec, CompiledCall(call, lambda: 1, warm_sizes(max_batch_size))
