"""Model loading in every format, and the compiled, batch-polymorphic call: in-process on
TensorFlow, and in a fresh process on each other installed Keras backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from predictq.errors import DeviceOutOfMemory, ModelLoadError
from tests.support import backends, models
from tests.support.processes import base_env
from workers.model import import_model_modules, load_model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_files_load_and_match_the_model_call(tmp_path: Path, suffix: str) -> None:
    path = models.build_mlp(str(tmp_path / f"m{suffix}"))
    loaded = load_model(path)
    assert loaded.spec.format == suffix[1:]
    assert loaded.spec.inputs[0].shape == (None, models.FEATURES)
    assert loaded.spec.inputs[0].dtype == np.float32
    x = np.random.default_rng(0).random((7, models.FEATURES), dtype=np.float32)
    (out,) = loaded([x])
    assert np.allclose(out, models.reference(path, x), atol=1e-5)


def test_savedmodel_directories_load_through_their_serving_signature(tmp_path: Path) -> None:
    path = models.export_savedmodel(str(tmp_path / "sm"))
    loaded = load_model(path)
    assert loaded.spec.format == "savedmodel"
    assert loaded.spec.input_names == ["x"]
    x = np.random.default_rng(1).random((5, models.FEATURES), dtype=np.float32)
    (out,) = loaded([x])
    assert out.shape == (5, 5)
    import tensorflow as tf

    expected = tf.saved_model.load(path).signatures["serving_default"](x=x)
    assert np.allclose(out, next(iter(expected.values())).numpy(), atol=1e-5)


@pytest.mark.parametrize("dict_io", [True, False])
def test_multi_input_multi_output_models_keep_their_structure(
    tmp_path: Path, dict_io: bool
) -> None:
    path = models.build_multi_io(str(tmp_path / "multi.keras"), dict_io=dict_io)
    loaded = load_model(path)
    spec = loaded.spec
    assert spec.input_structure == ("dict" if dict_io else "list")
    assert spec.output_structure == ("dict" if dict_io else "list")
    a = np.random.default_rng(2).random((4, 6), dtype=np.float32)
    b = np.random.default_rng(3).random((4, 3, 2), dtype=np.float32)
    structured = spec.structure_outputs(loaded([a, b]))
    ref = models.reference(path, {"a": a, "b": b} if dict_io else [a, b])
    if dict_io:
        assert set(structured) == {"score", "klass"}
        for k in ref:
            assert np.allclose(structured[k], ref[k], atol=1e-5)
    else:
        for got, want in zip(structured, ref, strict=True):
            assert np.allclose(got, want, atol=1e-5)


def test_one_trace_serves_every_batch_size(tmp_path: Path) -> None:
    loaded = load_model(models.build_mlp(str(tmp_path / "m.keras")))
    for n in (1, 3, 64, 200, 1):
        assert loaded([np.zeros((n, models.FEATURES), np.float32)])[0].shape[0] == n
    # One concrete function, traced once with a None batch dimension, serves
    # them all (a concrete function cannot retrace: a mismatch would raise).
    (spec,) = loaded._fn.structured_input_signature[0]
    assert spec.shape.as_list() == [None, models.FEATURES]


def test_a_real_device_oom_becomes_device_out_of_memory(tmp_path: Path) -> None:
    import_model_modules(["tests.support.layers"])
    path = models.build_oom_model(str(tmp_path / "oom.keras"), max_rows=4)
    loaded = load_model(path)
    assert loaded([np.zeros((4, models.FEATURES), np.float32)])[0].shape == (4, 3)
    with pytest.raises(DeviceOutOfMemory, match="out of memory"):
        loaded([np.zeros((5, models.FEATURES), np.float32)])


def test_load_errors_are_typed_and_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no file or directory"):
        load_model(str(tmp_path / "missing.keras"))
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"expected a \.keras or \.h5 file"):
        load_model(str(bad))
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(corrupt))
    with pytest.raises(ModelLoadError, match="cannot import 'no_such_module_xyz'"):
        import_model_modules(["no_such_module_xyz"])


def test_jax_compiles_one_program_per_power_of_two_batch_size_up_to_the_largest() -> None:
    from workers.backends.jax_backend import bucket_for, buckets

    assert buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert buckets(1000)[-3:] == (256, 512, 1000) and len(buckets(4096)) == 13
    assert buckets(1) == buckets(None) == (1,)
    sizes = buckets(1000)
    assert [bucket_for(n, sizes) for n in (1, 3, 512, 513, 1000, 1001)] == [
        1,
        4,
        512,
        1000,
        1000,
        1024,
    ]


PROBE = """
import json, sys
import numpy as np
from predictq.errors import DeviceOutOfMemory, ModelLoadError
from predictq.settings import Settings
from workers.device import configure_devices

backend, folder = sys.argv[1], sys.argv[2]
configure_devices(Settings.from_env({"PREDICTQ_KERAS_BACKEND": backend, "PREDICTQ_DEVICE": "cpu"}))
from workers.model import import_model_modules, load_model

report = {}
for name in ("mlp.keras", "multi.keras", "mlp.h5"):
    if name == "mlp.h5":
        # Keras's legacy .h5 reader imports TensorFlow where it is installed (not needed).
        report["tensorflow_imported"] = "tensorflow" in sys.modules
    model = load_model(f"{folder}/{name}", max_batch_size=64)
    model.warm_up()
    warm = model.compiles
    with np.load(f"{folder}/{name}.npz") as data:
        inputs = [data[f"in{i}"] for i in range(len(model.spec.inputs))]
        expected = [data[f"out{i}"] for i in range(len(model.spec.outputs))]
    error = 0.0
    for n in (1, 3, 64, 37, 1):
        outputs = model([a[:n] for a in inputs])
        error = max(error, *(float(np.abs(o - e[:n]).max()) for o, e in zip(outputs, expected)))
    report[name] = {
        "format": model.spec.format, "backend": model.backend, "error": error,
        "compiles_after_warm_up": warm, "compiles": model.compiles,
    }
try:
    load_model(f"{folder}/savedmodel")
except ModelLoadError as e:
    report["savedmodel"] = str(e)
import_model_modules(["tests.support.layers"])
oom = load_model(f"{folder}/oom.keras", max_batch_size=8)
oom.warm_up()
report["fits"] = list(oom([np.zeros((4, 16), np.float32)])[0].shape)
try:
    oom([np.zeros((5, 16), np.float32)])
except DeviceOutOfMemory as e:
    report["oom"] = str(e)
print("REPORT", json.dumps(report))
"""


@pytest.mark.parametrize("backend", backends.OTHERS)
def test_keras_and_h5_files_load_on_jax_and_torch_and_match_tensorflow(
    tmp_path: Path, backend: str
) -> None:
    rng = np.random.default_rng(4)
    x = rng.random((64, models.FEATURES), dtype=np.float32)
    ab = [rng.random((64, 6), dtype=np.float32), rng.random((64, 3, 2), dtype=np.float32)]
    for name, inputs in (("mlp.keras", [x]), ("mlp.h5", [x]), ("multi.keras", ab)):
        path = str(tmp_path / name)
        if name == "multi.keras":
            models.build_multi_io(path, dict_io=True)
            ref = models.reference(path, {"a": ab[0], "b": ab[1]})
            outputs = [ref[s.name] for s in load_model(path).spec.outputs]
        else:
            outputs = [models.reference(models.build_mlp(path), x)]
        arrays = {f"in{i}": a for i, a in enumerate(inputs)}
        np.savez(f"{path}.npz", **arrays, **{f"out{i}": o for i, o in enumerate(outputs)})
    models.export_savedmodel(str(tmp_path / "savedmodel"))
    models.build_oom_model(str(tmp_path / "oom.keras"), max_rows=4)
    # A fresh process: Keras runs one backend per process, chosen before it is imported.
    out = subprocess.run(
        [sys.executable, "-c", PROBE, backend, str(tmp_path)],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.split("REPORT ", 1)[1])
    compiled = {"jax": 7, "torch": 0}[backend]  # JAX: buckets 1, 2, 4, ..., 64; all at warm-up
    for name, fmt in (("mlp.keras", "keras"), ("mlp.h5", "h5"), ("multi.keras", "keras")):
        got = report[name]
        assert (got["format"], got["backend"]) == (fmt, backend)
        assert got["error"] < 1e-5, (name, got)
        assert got["compiles_after_warm_up"] == got["compiles"] == compiled, (name, got)
    assert "loads only with PREDICTQ_KERAS_BACKEND=tensorflow" in report["savedmodel"]
    assert report["fits"] == [4, 3]
    assert "device out of memory" in report["oom"]
    assert report["tensorflow_imported"] is False
