"""PyTorch: the model called eagerly under ``torch.no_grad()``, on one device.

No ``torch.compile``: measured on the benchmark's MLP (CPU, 2 cores), it took
35 s to compile, halved the batch-1 time (1.2 -> 0.6 ms) and did nothing for
large batches, and it recompiles for new shapes (batch size 1 is always its own
graph); a worker loads once per process and must be ready in seconds.

Device settings: ``PREDICTQ_DEVICE`` picks the device Keras puts tensors on
(``KERAS_TORCH_DEVICE``, read when Keras is imported: cpu, or cuda for the
current CUDA device); ``PREDICTQ_GPU_MEMORY_LIMIT_MB`` becomes
``torch.cuda.set_per_process_memory_fraction``; PyTorch's caching allocator
always grows on demand, so ``PREDICTQ_GPU_MEMORY_GROWTH`` changes nothing;
the thread settings are ``torch.set_num_threads`` and
``torch.set_num_interop_threads``. ``PREDICTQ_GPU_TF32`` sets both of
PyTorch's TF32 switches (matrix products, and cuDNN's convolutions, which
PyTorch runs in TF32 by default); off, float32 is float32 on every op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from predictq.errors import ConfigError, DeviceOutOfMemory, PredictqError
from predictq.settings import Settings
from predictq.structure import flatten, unflatten
from workers.backends.base import (
    Array,
    Backend,
    CompiledCall,
    DeviceInfo,
    failed,
    short_text,
    warm_sizes,
)
from workers.spec import ModelSpec

log = logging.getLogger(__name__)

#: What PyTorch's allocators say when memory runs out (CUDA, and the CPU's DefaultCPUAllocator).
_OOM_TEXTS = ("out of memory", "can't allocate memory")


class TorchBackend(Backend):
    """Keras on PyTorch."""

    name = "torch"

    def configure_devices(self, settings: Settings) -> DeviceInfo:
        import torch

        if settings.intra_op_threads is not None:
            torch.set_num_threads(settings.intra_op_threads)
        if settings.inter_op_threads is not None:
            torch.set_num_interop_threads(settings.inter_op_threads)
        torch.backends.cuda.matmul.allow_tf32 = settings.gpu_tf32
        torch.backends.cudnn.allow_tf32 = settings.gpu_tf32
        has_gpu = torch.cuda.is_available()
        if settings.device == "gpu" and not has_gpu:
            raise ConfigError(
                "PREDICTQ_DEVICE=gpu but PyTorch sees no GPU (check CUDA_VISIBLE_DEVICES, the "
                "NVIDIA driver, and that torch is a CUDA build)"
            )
        if settings.device == "cpu" or not has_gpu:
            os.environ["KERAS_TORCH_DEVICE"] = "cpu"
            return DeviceInfo("cpu", ())
        os.environ["KERAS_TORCH_DEVICE"] = "cuda"
        index = torch.cuda.current_device()
        if settings.gpu_memory_limit_mb is not None:
            total = torch.cuda.get_device_properties(index).total_memory
            fraction = min(1.0, settings.gpu_memory_limit_mb * 2**20 / total)
            torch.cuda.set_per_process_memory_fraction(fraction, index)
        names = (f"cuda:{index} {torch.cuda.get_device_name(index)}",)
        log.info("computing on GPU(s) %s", ", ".join(names))
        return DeviceInfo("gpu", names)

    def compile(
        self, model: Any, spec: ModelSpec, out_names: Sequence[str], *, max_batch_size: int | None
    ) -> CompiledCall:
        import keras
        import torch

        layout, order = spec.input_layout, list(out_names)

        def call(*xs: Array) -> list[Array]:
            # Eagerly, every layer call runs through Keras's traceback filter,
            # which rewraps a model's error with the call's arguments and terminal
            # colour codes; the job's caller gets the error itself. (A per-thread
            # setting, so set on the device thread, where the calls run.)
            keras.config.disable_traceback_filtering()
            with torch.no_grad():
                out = model(unflatten(layout, xs), training=False)
                return [o.cpu().numpy() for o in flatten(out, order=order)[1]]

        return CompiledCall(call, lambda: 0, warm_sizes(max_batch_size))

    def model_error(self, error: Exception) -> PredictqError | None:
        import torch

        text = short_text(str(error), skip=lambda line: False)
        if isinstance(error, torch.OutOfMemoryError) or (
            isinstance(error, RuntimeError) and any(t in text.lower() for t in _OOM_TEXTS)
        ):
            return DeviceOutOfMemory(f"device out of memory: {text}")
        if isinstance(error, RuntimeError | ValueError | TypeError | IndexError):
            return failed(error, text)
        return None
