"""Device and backend set-up on a machine without a GPU.

The GPU branches (memory growth, memory limit) have no automated test: CI has no
GPU; bench/gpu_check.sh measures them on a GPU machine (see README).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from predictq.errors import ConfigError
from predictq.settings import Settings
from tests.support import backends
from tests.support.processes import base_env
from workers.backends import resolve, select

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
print("auto:", info.kind, tf.config.threading.get_intra_op_parallelism_threads(), info.cpu_shards)
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
    # An explicit intra-op thread count: no row parts unless asked for.
    assert "auto: cpu 1 1" in out.stdout


THREADS_PROBE = """
import os
from predictq.settings import Settings
from workers.device import configure_devices
info = configure_devices(Settings.from_env(dict(os.environ)))
import tensorflow as tf
print("cpu:", info.kind, info.cpu_shards, tf.config.threading.get_intra_op_parallelism_threads())
"""


@pytest.mark.parametrize(
    ("env", "shards", "intra"),
    [
        ({}, len(os.sched_getaffinity(0)), 1),
        ({"PREDICTQ_CPU_SHARDS": "3"}, 3, 1),
        ({"PREDICTQ_CPU_SHARDS": "3", "PREDICTQ_INTRA_OP_THREADS": "2"}, 3, 2),
        ({"PREDICTQ_CPU_SHARDS": "1"}, 1, 0),  # 0: TensorFlow's own default
    ],
)
def test_a_cpu_worker_splits_batches_by_core_with_one_intra_op_thread_each(
    env: dict[str, str], shards: int, intra: int
) -> None:
    if not env and shards == 1:
        intra = 0  # one usable core: nothing to split, TensorFlow's default threads
    # Without the test suite's own thread counts: the defaults a deployment gets.
    probe_env = base_env(CUDA_VISIBLE_DEVICES="")
    del probe_env["PREDICTQ_INTRA_OP_THREADS"], probe_env["PREDICTQ_INTER_OP_THREADS"]
    out = subprocess.run(
        [sys.executable, "-c", THREADS_PROBE],
        env={**probe_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert f"cpu: cpu {shards} {intra}" in out.stdout


def test_tensorflow_and_tensorflow_cpu_side_by_side_are_refused() -> None:
    from predictq.errors import ConfigError
    from workers.device import check_one_tensorflow

    check_one_tensorflow()  # this environment: tensorflow only
    check_one_tensorflow(lambda name: name == "tensorflow")
    with pytest.raises(ConfigError, match="both tensorflow and tensorflow-cpu are installed"):
        check_one_tensorflow(lambda name: name in ("tensorflow", "tensorflow-cpu"))


BACKEND_PROBE = """
import os, sys
from predictq.errors import ConfigError
from predictq.settings import Settings
from workers.device import configure_devices
backend = sys.argv[1]
try:
    configure_devices(Settings.from_env({"PREDICTQ_KERAS_BACKEND": backend,
                                         "PREDICTQ_DEVICE": "gpu"}))
except ConfigError as e:
    print("gpu:", e)
info = configure_devices(Settings.from_env({"PREDICTQ_KERAS_BACKEND": backend,
                                            "PREDICTQ_INTRA_OP_THREADS": "1"}))
import keras
print("auto:", info.kind, keras.backend.backend(), "tensorflow" in sys.modules)
if backend == "torch":
    import torch
    print("threads:", torch.get_num_threads(), os.environ["KERAS_TORCH_DEVICE"])
else:
    print("threads:", os.environ["XLA_FLAGS"])
"""


@pytest.mark.parametrize("backend", backends.OTHERS)
def test_jax_and_torch_workers_find_no_gpu_clearly_and_fall_back_to_cpu(backend: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", BACKEND_PROBE, backend],
        env=base_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    name = {"jax": "JAX", "torch": "PyTorch"}[backend]
    assert f"gpu: PREDICTQ_DEVICE=gpu but {name} sees no GPU" in out.stdout
    assert f"auto: cpu {backend} False" in out.stdout  # and TensorFlow never loaded
    # PREDICTQ_INTRA_OP_THREADS=1: XLA's switch to one thread; PyTorch's thread count.
    threads = {"jax": "--xla_cpu_multi_thread_eigen=false", "torch": "1 cpu"}[backend]
    assert f"threads: {threads}" in out.stdout


def test_the_backend_setting_wins_over_keras_backend_which_wins_over_the_default() -> None:
    assert resolve(Settings(keras_backend="jax"), {"KERAS_BACKEND": "torch"}) == "jax"
    assert resolve(Settings(), {"KERAS_BACKEND": "Torch"}) == "torch"
    assert resolve(Settings(), {}) == "tensorflow"
    assert Settings.from_env({"PREDICTQ_KERAS_BACKEND": "JAX"}).keras_backend == "jax"
    with pytest.raises(ConfigError, match="PREDICTQ_KERAS_BACKEND must be one of tensorflow"):
        Settings.from_env({"PREDICTQ_KERAS_BACKEND": "mxnet"})
    with pytest.raises(ConfigError, match=r"KERAS_BACKEND must be one of .* got 'numpy'"):
        resolve(Settings(), {"KERAS_BACKEND": "numpy"})


def test_a_process_whose_keras_already_runs_another_backend_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import keras  # this process: TensorFlow

    monkeypatch.delenv("KERAS_BACKEND", raising=False)  # select() sets it; restored after

    assert keras.backend.backend() == "tensorflow"
    assert select(Settings(keras_backend="tensorflow")).name == "tensorflow"
    with pytest.raises(ConfigError, match="Keras was already imported with tensorflow"):
        select(Settings(keras_backend="jax"))


SPINNING_PROBE = """
import os
from predictq.settings import Settings
from workers.device import configure_devices
configure_devices(Settings.from_env(dict(os.environ)))
import tensorflow as tf
from tensorflow.python.eager import context
tf.constant(1.0) + 1.0  # initializes the runtime, which reads the config once
print("disabled:", context.context().config.experimental.disable_thread_spinning)
"""


@pytest.mark.parametrize(("setting", "disabled"), [(None, False), ("false", True)])
def test_tensorflow_thread_pools_sleep_between_ops_when_spinning_is_turned_off(
    setting: str | None, disabled: bool
) -> None:
    extra = {} if setting is None else {"PREDICTQ_TF_THREAD_SPINNING": setting}
    out = subprocess.run(
        [sys.executable, "-c", SPINNING_PROBE],
        env=base_env(CUDA_VISIBLE_DEVICES="", **extra),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert f"disabled: {disabled}" in out.stdout, out.stderr[-2000:]


TF32_PROBE = """
import os, sys
from predictq.settings import Settings
from workers.device import configure_devices
backend = sys.argv[1]
configure_devices(Settings.from_env({**os.environ, "PREDICTQ_KERAS_BACKEND": backend}))
if backend == "tensorflow":
    import tensorflow as tf
    print("tf32:", tf.config.experimental.tensor_float_32_execution_enabled())
elif backend == "jax":
    import jax
    print("tf32:", jax.config.jax_default_matmul_precision != "float32")
else:
    import torch
    print("tf32:", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
"""


@pytest.mark.parametrize("backend", backends.ALL)
@pytest.mark.parametrize("setting", [None, "true"])
def test_float32_stays_float32_on_a_gpu_unless_tf32_is_allowed(
    backend: str, setting: str | None
) -> None:
    # Every framework's own default lets (some) float32 ops on an NVIDIA GPU round
    # their inputs to TF32, which makes a job's outputs depend on its batch's size
    # (README, GPUs). The switches are the same on a CPU, where they change nothing.
    extra = {} if setting is None else {"PREDICTQ_GPU_TF32": setting}
    out = subprocess.run(
        [sys.executable, "-c", TF32_PROBE, backend],
        env=base_env(CUDA_VISIBLE_DEVICES="", **extra),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    allowed = setting is not None
    expected = f"{allowed} {allowed}" if backend == "torch" else f"{allowed}"
    assert f"tf32: {expected}\n" in out.stdout, out.stderr[-2000:]
