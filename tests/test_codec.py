"""The ndarray wire format (pure unit tests)."""

from __future__ import annotations

import base64
import pickle

import msgpack
import numpy as np
import pytest
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import loads as kombu_loads

from predictq import codec
from predictq.errors import InvalidInput, PayloadTooLarge


@pytest.mark.parametrize(
    "dtype", ["float32", "float64", "float16", "int8", "int32", "int64", "uint8", "uint16", "bool"]
)
def test_arrays_round_trip_with_dtype_and_shape(dtype: str) -> None:
    x = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    back = codec.loads(codec.dumps(x))
    assert back.dtype == x.dtype and back.shape == x.shape
    assert np.array_equal(back, x)


def test_raw_bytes_travel_not_lists_of_numbers() -> None:
    x = np.random.default_rng(0).random((100, 64), dtype=np.float32)
    body = codec.dumps(x)
    assert len(body) < x.nbytes + 100  # 4 bytes per float, plus a small header
    wire = msgpack.unpackb(body, raw=False)
    assert wire["dtype"] == "<f4" and wire["shape"] == [100, 64]
    assert isinstance(wire["data"], bytes)


def test_non_contiguous_empty_and_nested_values_round_trip() -> None:
    x = np.arange(20, dtype=np.float32).reshape(4, 5)
    value = {
        "cols": x[:, 1],
        "empty": np.zeros((0, 3), np.int16),
        "n": np.int64(7),
        "list": [x.T, "text", None],
    }
    back = codec.loads(codec.dumps(value))
    assert np.array_equal(back["cols"], x[:, 1])
    assert back["empty"].shape == (0, 3)
    assert back["n"] == 7 and back["list"][1:] == ["text", None]
    assert np.array_equal(back["list"][0], x.T)


@pytest.mark.parametrize(
    "array", [np.array(["a", "b"]), np.array([1 + 2j]), np.array([object()], dtype=object)]
)
def test_unsafe_dtypes_are_refused_when_encoding(array: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match="expected a numeric dtype"):
        codec.dumps(array)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            {"__ndarray__": 1, "dtype": "|O", "shape": [1], "data": b"12345678"},
            "expected a numeric dtype .* received dtype '|O'",
        ),
        (
            {"__ndarray__": 1, "dtype": "<U3", "shape": [1], "data": b"x" * 12},
            "received dtype '<U3'",
        ),
        (
            {"__ndarray__": 1, "dtype": "<c8", "shape": [1], "data": b"x" * 8},
            "received dtype '<c8'",
        ),
        (
            {"__ndarray__": 1, "dtype": "<f4", "shape": [2, 3], "data": b"x" * 20},
            r"shape \[2, 3\] of dtype <f4 needs 24 bytes, received 20 bytes",
        ),
        (
            {"__ndarray__": 1, "dtype": "<f4", "shape": [-1], "data": b""},
            "expected 'shape' as a list of non-negative integers",
        ),
        (
            {"__ndarray__": 1, "dtype": "nonsense", "shape": [1], "data": b""},
            "expected a numpy dtype string",
        ),
        ({"__ndarray__": 1, "shape": [1], "data": b""}, "expected keys 'dtype', 'shape'"),
        ({"__ndarray__": 1, "dtype": "<f4", "shape": [1], "data": 3}, "expected 'data' as bytes"),
    ],
)
def test_malformed_array_maps_are_refused_with_expected_and_received(
    wire: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        codec.loads(msgpack.packb(wire, use_bin_type=True))


def test_base64_data_is_accepted_for_json_producers() -> None:
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    wire = {
        "__ndarray__": 1,
        "dtype": "<f4",
        "shape": [2, 3],
        "data": base64.b64encode(x.tobytes()).decode(),
    }
    assert np.array_equal(codec.decode_array(wire), x)
    with pytest.raises(InvalidInput, match="not valid base64"):
        codec.decode_array({**wire, "data": "***"})


def test_corrupted_msgpack_is_a_typed_error() -> None:
    body = codec.dumps([np.ones(4, np.float32)])
    with pytest.raises(InvalidInput, match="do not decode"):
        codec.loads(body[:-3])
    with pytest.raises(InvalidInput, match="do not decode"):
        codec.loads(b"\xc1\xc1\xc1")


def test_oversized_bodies_are_refused_before_decoding() -> None:
    body = codec.dumps(np.ones(1000, np.float32))
    with pytest.raises(PayloadTooLarge, match=r"expected at most 1024 bytes .* received 4\d\d\d"):
        codec.loads(body, max_payload_bytes=1024)


def test_registered_with_kombu_and_pickle_is_not_accepted() -> None:
    codec.register_serializer()
    content_type, encoding, body = kombu_dumps({"x": np.ones(2)}, serializer="predictq-msgpack")
    assert content_type == codec.CONTENT_TYPE
    back = kombu_loads(body, content_type, encoding, accept=list(codec.ACCEPT_CONTENT))
    assert np.array_equal(back["x"], np.ones(2))
    from kombu.exceptions import ContentDisallowed

    with pytest.raises(ContentDisallowed):
        kombu_loads(
            pickle.dumps({"x": 1}),
            "application/x-python-serialize",
            "binary",
            accept=list(codec.ACCEPT_CONTENT),
        )
