"""Binary ndarray wire format, registered with kombu for task and result bodies.

An array travels as a msgpack map, readable from any language with msgpack::

    {"__ndarray__": 1, "dtype": "<f4", "shape": [8, 64], "data": <bin 2048 bytes>}

``data`` is the C-contiguous raw buffer, so encoding and decoding cost one
memory copy and no per-element Python work. In JSON messages the same map is
accepted with ``data`` as a base64 string (see ``predictq.arrays``).

Results have a serializer of their own (``RESULT_SERIALIZER``): Redis keeps no
content type next to a stored result, and a worker stores JSON results for jobs
that arrived as JSON (``workers.results``), msgpack for the others, so the
reader tells the two apart by their first byte.

Only plain numeric dtypes cross the wire (bool, signed/unsigned ints, floats):
object, string, complex, void and datetime arrays are refused on both sides,
and pickle is never involved.
"""

from __future__ import annotations

import binascii
import functools
import math
import re
from typing import Any, Final

import msgpack
import numpy as np
import pybase64
from kombu.serialization import register
from kombu.utils import json as kombu_json

from predictq.errors import InvalidInput, InvalidMessage, PayloadTooLarge

SERIALIZER_NAME: Final = "predictq-msgpack"
CONTENT_TYPE: Final = "application/x-predictq-msgpack"
JSON_CONTENT_TYPE: Final = "application/json"
#: What workers and producers accept. Pickle is deliberately absent.
ACCEPT_CONTENT: Final = (CONTENT_TYPE, JSON_CONTENT_TYPE)
#: Stored results: written as msgpack, read as msgpack or JSON (see ``loads_result``).
RESULT_SERIALIZER: Final = "predictq-result"
RESULT_CONTENT_TYPE: Final = "application/x-predictq-result"

NDARRAY_KEY: Final = "__ndarray__"
_DTYPE_STRING: Final = re.compile(r"[<>=|]?[A-Za-z0-9\[\]]{1,16}")
ALLOWED_KINDS: Final = frozenset("biuf")
_KIND_NAMES: Final = "bool, int, uint or float"


def describe(value: object) -> str:
    """A short human description of a value, for error messages."""
    if isinstance(value, np.ndarray):
        return _array_description(value.dtype, value.shape)
    if isinstance(value, dict):
        return f"dict with keys {sorted(map(str, value))[:8]}"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


@functools.lru_cache(maxsize=1024)
def _array_description(dtype: np.dtype[Any], shape: tuple[int, ...]) -> str:
    # Every job's input is described (its argsrepr), and str(dtype) runs numpy's
    # Python-level naming code: ~10 us a job in a storm's producer, once per kind here.
    return f"array of dtype {dtype} and shape {shape}"


def check_dtype(dtype: np.dtype[Any], where: str = "array") -> None:
    """Refuse dtypes that cannot be fed to a model (object, str, complex, ...)."""
    if dtype.kind not in ALLOWED_KINDS:
        raise InvalidInput(
            f"{where}: expected a numeric dtype ({_KIND_NAMES}), received dtype {dtype.str!r} "
            f"({dtype.name})"
        )


def encode_array(array: np.ndarray[Any, Any]) -> dict[str, Any]:
    """The wire map of ``array`` (raw bytes, C order)."""
    check_dtype(array.dtype)
    contiguous = np.ascontiguousarray(array)
    return {
        NDARRAY_KEY: 1,
        "dtype": contiguous.dtype.str,
        "shape": list(contiguous.shape),
        "data": contiguous.data if contiguous.size else b"",
    }


def decode_array(obj: dict[Any, Any]) -> np.ndarray[Any, Any]:
    """The array carried by a wire map; raises InvalidInput naming what is wrong.

    The result shares memory with the message buffer and is read-only.
    """
    try:
        dtype_field, shape_field, data = obj["dtype"], obj["shape"], obj["data"]
    except KeyError as e:
        raise InvalidInput(
            f"ndarray map: expected keys 'dtype', 'shape' and 'data', received {describe(obj)}"
        ) from e
    dtype = _checked_dtype(dtype_field)
    check_dtype(dtype, "ndarray map")
    shape = _checked_shape(shape_field)
    if isinstance(data, str):
        try:
            data = pybase64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidInput("ndarray map: 'data' is a string but not valid base64") from e
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput(
            f"ndarray map: expected 'data' as bytes (or base64 text), received {describe(data)}"
        )
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"ndarray map: shape {list(shape)} of dtype {dtype.str} needs {expected} bytes, "
            f"received {len(data)} bytes"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as e:
        # e.g. a zero-size array with a dimension beyond numpy's index range.
        raise InvalidInput(f"ndarray map: shape {list(shape)!r:.100} is not usable: {e}") from e


def _checked_dtype(field: object) -> np.dtype[Any]:
    # Only plain type strings ('<f4', 'float32'): numpy also parses sub-array
    # and structured forms ('(-1,)f4', '[("a", "<f4")]'), which are no model input.
    if not isinstance(field, str) or not _DTYPE_STRING.fullmatch(field):
        raise InvalidInput(
            f"ndarray map: expected a numpy dtype string such as '<f4', received {field!r:.60}"
        )
    try:
        return np.dtype(field)
    except (TypeError, ValueError) as e:
        raise InvalidInput(
            f"ndarray map: expected a numpy dtype string such as '<f4', received {field!r:.60}"
        ) from e


def _checked_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(
            f"ndarray map: expected 'shape' as a list of non-negative integers, "
            f"received {shape!r:.100}"
        )
    return tuple(shape)


def _default(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return encode_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialize {type(obj).__name__} with {SERIALIZER_NAME}")


def _object_hook(obj: dict[Any, Any]) -> object:
    if NDARRAY_KEY in obj:
        return decode_array(obj)
    return obj


def dumps(value: object) -> bytes:
    """Encode a task or result body."""
    return msgpack.packb(value, default=_default, use_bin_type=True)  # type: ignore[no-any-return]


def _check_body_size(body: bytes | bytearray | memoryview | str, max_bytes: int | None) -> None:
    if max_bytes is not None and len(body) > max_bytes:
        raise PayloadTooLarge(
            f"message body: expected at most {max_bytes} bytes "
            f"(PREDICTQ_MAX_PAYLOAD_BYTES), received {len(body)} bytes"
        )


def loads(body: bytes | bytearray | memoryview, *, max_payload_bytes: int | None = None) -> Any:
    """Decode a task or result body, refusing oversized bodies before any decoding."""
    _check_body_size(body, max_payload_bytes)
    try:
        return msgpack.unpackb(body, object_hook=_object_hook, raw=False, strict_map_key=False)
    except InvalidInput:
        raise
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        # msgpack signals truncated/corrupted data with ValueError subclasses
        # (ExtraData, FormatError, StackError) or UnpackValueError.
        raise InvalidMessage(
            f"message body: expected {SERIALIZER_NAME} (msgpack) data, "
            f"received {len(body)} bytes that do not decode: {e}"
        ) from e


def _json_object_hook(obj: dict[Any, Any]) -> object:
    if NDARRAY_KEY in obj:
        return decode_array(obj)
    return kombu_json.object_hook(obj)


def loads_result(body: bytes | bytearray | memoryview | str) -> Any:
    """Decode a stored result record, JSON or msgpack.

    A JSON record is an object, so it starts with ``{`` (0x7b); in msgpack that
    byte is the integer 123, never a result record, which is a map. JSON is read
    as kombu reads it (Celery's JSON results), with ndarray maps as arrays.
    """
    if isinstance(body, str):
        body = body.encode()
    if bytes(body[:1]) == b"{":
        return kombu_json.loads(body, object_hook=_json_object_hook)  # type: ignore[no-untyped-call]
    return loads(body)


def register_serializer() -> None:
    """Register the msgpack and result serializers with kombu (process-wide, idempotent).

    Size limits are not the codec's business: workers check a message's size
    where they receive it (``workers.guard``), before anything decodes it, and
    payloads by reference in ``predictq.payloads``. kombu's own JSON codec is
    left as it is.
    """
    register(  # type: ignore[no-untyped-call]
        SERIALIZER_NAME,
        dumps,
        loads,
        content_type=CONTENT_TYPE,
        content_encoding="binary",
    )
    register(  # type: ignore[no-untyped-call]
        RESULT_SERIALIZER,
        dumps,
        loads_result,
        content_type=RESULT_CONTENT_TYPE,
        content_encoding="binary",
    )
