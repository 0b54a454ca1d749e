"""Device set-up on a machine without a GPU.

The GPU branches (memory growth, memory limit) have no automated test: CI has no
GPU, and this project's GPU machines could not install TensorFlow (see README).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.processes import base_env

PROBE = """
from predictq.errors import ConfigError
from predictq.settings import Settings
from workers.device import configure_devices
try:
    configure_devices(Settings.from_env({"PREDICTQ_DEVICE": "gpu"}))
except ConfigError as e:
    print("gpu:", e)
info = configure_devices(Settings.from_env({"PREDICTQ_DEVICE": "auto",
                                            "PREDICTQ_INTRA_OP_THREADS": "1"}))
import tensorflow as tf
print("auto:", info.kind, tf.config.threading.get_intra_op_parallelism_threads())
"""


def test_asking_for_a_gpu_without_one_fails_clearly_and_auto_falls_back_to_cpu() -> None:
    # A fresh process: device settings only apply before TensorFlow initialises.
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=base_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert (
        "gpu: PREDICTQ_DEVICE=gpu but TensorFlow sees no GPU (check CUDA_VISIBLE_DEVICES"
        in out.stdout
    )
    assert "auto: cpu 1" in out.stdout


def test_tensorflow_and_tensorflow_cpu_side_by_side_are_refused() -> None:
    from predictq.errors import ConfigError
    from workers.device import check_one_tensorflow

    check_one_tensorflow()  # this environment: tensorflow only
    check_one_tensorflow(lambda name: name == "tensorflow")
    with pytest.raises(ConfigError, match="both tensorflow and tensorflow-cpu are installed"):
        check_one_tensorflow(lambda name: name in ("tensorflow", "tensorflow-cpu"))
