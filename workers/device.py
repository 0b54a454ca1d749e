"""TensorFlow device set-up for one worker process.

Must run before TensorFlow touches a device (the first op or model load):
memory growth and memory limits cannot be changed once a GPU is initialized.
``CUDA_VISIBLE_DEVICES`` is honoured as is, because TensorFlow reads it itself;
predictq never overrides it, so one GPU per worker process is configured from
the outside (docker-compose, systemd, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from predictq.errors import ConfigError
from predictq.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """What the process computes on."""

    kind: str  # "gpu" or "cpu"
    gpus: tuple[str, ...]


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


def configure_devices(settings: Settings) -> DeviceInfo:
    """Apply the device settings; returns the devices in use."""
    check_one_tensorflow()
    import tensorflow as tf

    if settings.intra_op_threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(settings.intra_op_threads)
    if settings.inter_op_threads is not None:
        tf.config.threading.set_inter_op_parallelism_threads(settings.inter_op_threads)

    gpus = tf.config.list_physical_devices("GPU")
    if settings.device == "cpu":
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        return DeviceInfo("cpu", ())
    if not gpus:
        if settings.device == "gpu":
            raise ConfigError(
                "PREDICTQ_DEVICE=gpu but TensorFlow sees no GPU (check CUDA_VISIBLE_DEVICES, "
                "the NVIDIA driver, and that predictq[gpu] is installed)"
            )
        return DeviceInfo("cpu", ())
    for gpu in gpus:
        if settings.gpu_memory_limit_mb is not None:
            # A logical device with a memory limit replaces memory growth:
            # TensorFlow refuses both on one device.
            limit = tf.config.LogicalDeviceConfiguration(memory_limit=settings.gpu_memory_limit_mb)
            tf.config.set_logical_device_configuration(gpu, [limit])
        elif settings.gpu_memory_growth:
            tf.config.experimental.set_memory_growth(gpu, True)
    names = tuple(g.name for g in gpus)
    log.info("computing on GPU(s) %s", ", ".join(names))
    return DeviceInfo("gpu", names)
