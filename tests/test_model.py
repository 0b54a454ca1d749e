"""Model loading in every format, and the compiled, batch-polymorphic call (in-process TF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from predictq.errors import DeviceOutOfMemory, ModelLoadError
from tests.support import models
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
