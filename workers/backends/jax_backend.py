"""JAX: ``jax.jit`` of the model's ``stateless_call``, batch sizes bucketed, weights held once.

XLA compiles one program per input shape. Jobs come in every batch size, so a
batch is padded (with copies of its last row, which the model already handles)
up to the next *bucket*: the powers of two below ``PREDICTQ_MAX_BATCH_SIZE``
and that size itself, e.g. 1, 2, 4, ..., 2048, 4096. Every bucket is compiled
once during warm-up (13 compiles for a maximum of 4096), so no job pays for a
compilation, and a padded batch costs at most twice its size. The variables are
passed to the compiled program as arguments, the same device arrays on every
call: never copied, never baked into the program as constants.

Device settings become JAX's environment variables, set before JAX is imported
(JAX reads them once): ``PREDICTQ_DEVICE=cpu`` is ``JAX_PLATFORMS=cpu``;
``PREDICTQ_GPU_MEMORY_GROWTH`` turns preallocation off
(``XLA_PYTHON_CLIENT_PREALLOCATE=false``: JAX's default takes 75% of the GPU
at start); ``PREDICTQ_GPU_MEMORY_LIMIT_MB`` becomes
``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the GPU's total memory. Variables the
operator set already are left as they are. Unless ``PREDICTQ_GPU_TF32`` is on,
float32 matrix products and convolutions run in full float32
(``JAX_DEFAULT_MATMUL_PRECISION=float32``): JAX's default on NVIDIA GPUs rounds
their inputs to TF32.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import numpy as np

from predictq.errors import ConfigError, DeviceOutOfMemory, PredictionError, PredictqError
from predictq.settings import Settings
from predictq.structure import flatten, unflatten
from workers.backends.base import Array, Backend, CompiledCall, DeviceInfo, failed, short_text
from workers.spec import ModelSpec

log = logging.getLogger(__name__)


def buckets(max_batch_size: int | None) -> tuple[int, ...]:
    """The batch sizes compiled: powers of two below ``max_batch_size``, and it."""
    if not max_batch_size:
        return (1,)
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` samples (beyond the last: the next power of two)."""
    for size in sizes:
        if size >= n:
            return size
    return 1 << (n - 1).bit_length()


def _pad(x: Array, size: int) -> Array:
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def _gpu_total_mb() -> int | None:
    """The first visible GPU's memory (MiB), read without initialising CUDA; None: no GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible else "0"
    if visible is not None and not first:
        return None  # CUDA_VISIBLE_DEVICES="" hides every GPU
    try:
        import pynvml  # nvidia-ml-py, where installed

        pynvml.nvmlInit()
        try:
            handle = (
                pynvml.nvmlDeviceGetHandleByUUID(first)
                if first.startswith(("GPU-", "MIG-"))
                else pynvml.nvmlDeviceGetHandleByIndex(int(first))
            )
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // 2**20
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no nvml, or no GPU it can see: ask nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", first]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
        return int(out.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _memory_environment(settings: Settings) -> dict[str, str]:
    """JAX's allocator variables for the memory settings (none when on CPU)."""
    env = {}
    if settings.gpu_memory_growth:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if settings.gpu_memory_limit_mb is not None:
        total_mb = _gpu_total_mb()
        if total_mb is None:
            if settings.device == "gpu":
                raise ConfigError(
                    "PREDICTQ_GPU_MEMORY_LIMIT_MB on JAX needs the GPU's total memory, and "
                    "neither nvidia-ml-py nor nvidia-smi could read it; set "
                    "XLA_PYTHON_CLIENT_MEM_FRACTION instead"
                )
            return env  # no GPU: nothing to limit
        fraction = min(1.0, settings.gpu_memory_limit_mb / total_mb)
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
    return env


class JaxBackend(Backend):
    """Keras on JAX."""

    name = "jax"

    def configure_devices(self, settings: Settings) -> DeviceInfo:
        if settings.device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        else:
            for key, value in _memory_environment(settings).items():
                if key in os.environ:
                    log.info("%s=%s set by the environment, kept", key, os.environ[key])
                else:
                    os.environ[key] = value
        if settings.intra_op_threads == 1:
            # XLA:CPU has no thread-count setting, only this switch to one thread.
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
        if not settings.gpu_tf32:
            # JAX's default on an NVIDIA GPU rounds float32 inputs to TF32, and XLA
            # picks kernels per shape, so a row's output depends on the size of the
            # (padded) batch it lands in: MobileNetV2 on an H200 moved by up to
            # 4.6e-2 between batch sizes, and by under 5e-7 in float32. On a CPU: no
            # effect (measured: same outputs, same time).
            os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "float32")
        import jax

        if settings.device == "gpu" and jax.default_backend() != "gpu":
            raise ConfigError(
                "PREDICTQ_DEVICE=gpu but JAX sees no GPU (check CUDA_VISIBLE_DEVICES, the "
                "NVIDIA driver, and that JAX has CUDA: pip install 'jax[cuda12]')"
            )
        if jax.default_backend() != "gpu":
            return DeviceInfo("cpu", ())
        names = tuple(str(d) for d in jax.local_devices())
        log.info("computing on GPU(s) %s", ", ".join(names))
        return DeviceInfo("gpu", names)

    def compile(
        self, model: Any, spec: ModelSpec, out_names: Sequence[str], *, max_batch_size: int | None
    ) -> CompiledCall:
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        layout, order = spec.input_layout, list(out_names)
        traces = [0]

        def infer(tv: Any, ntv: Any, *xs: Any) -> list[Any]:
            traces[0] += 1  # runs while tracing only: once per compiled shape
            out, _ = model.stateless_call(tv, ntv, unflatten(layout, xs), training=False)
            return flatten(out, order=order)[1]

        jitted = jax.jit(infer)
        sizes = buckets(max_batch_size)

        def call(*xs: Array) -> list[Array]:
            n = xs[0].shape[0]
            size = bucket_for(n, sizes)
            if size == n:
                return [np.asarray(o) for o in jitted(trainable, non_trainable, *xs)]
            outs = jitted(trainable, non_trainable, *(_pad(x, size) for x in xs))
            return [_unpad(np.asarray(o), i, n, size) for i, o in enumerate(outs)]

        return CompiledCall(call, lambda: traces[0], sizes)

    def model_error(self, error: Exception) -> PredictqError | None:
        import jax

        text = short_text(str(error), skip=_traceback_line).replace(_TRACEBACK, "")
        if isinstance(error, jax.errors.JaxRuntimeError) and text.startswith("RESOURCE_EXHAUSTED"):
            return DeviceOutOfMemory(f"device out of memory: {text}")
        if isinstance(error, jax.errors.JaxRuntimeError | ValueError | TypeError):
            return failed(error, text)
        return None


_TRACEBACK = "Traceback (most recent call last): "


def _traceback_line(line: str) -> bool:
    # A host callback's error carries the Python traceback of the callback.
    return line.startswith(("  File ", "    ", "During handling"))


def _unpad(out: Array, i: int, n: int, size: int) -> Array:
    if out.ndim == 0 or out.shape[0] != size:
        rows = "no" if out.ndim == 0 else out.shape[0]
        raise PredictionError(
            f"model output {i} has {rows} rows for a batch of {size} samples "
            f"({n} padded to the compiled batch size)"
        )
    return out[:n]
