"""Device set-up for one worker process, by its Keras backend (workers/backends/).

Must run before Keras or its framework touches a device: memory growth, memory
limits and the device itself cannot be changed once a GPU is initialized.
``CUDA_VISIBLE_DEVICES`` is honoured as is, because every framework reads it
itself; predictq never overrides it, so one GPU per worker process is configured
from the outside (docker-compose, systemd, ...).
"""

from __future__ import annotations

from predictq.settings import Settings
from workers.backends import DeviceInfo, select
from workers.backends.tf_backend import check_one_tensorflow

__all__ = ["DeviceInfo", "check_one_tensorflow", "configure_devices"]


def configure_devices(settings: Settings) -> DeviceInfo:
    """Select the Keras backend and apply the device settings; returns the devices in use."""
    return select(settings).configure_devices(settings)
