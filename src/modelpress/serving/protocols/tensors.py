"""KServe v2 / Open Inference Protocol tensors: JSON and the binary tensor data extension.

An input is ``{"name", "shape", "datatype", "data"}``; with the binary extension (what
tritonclient sends by default) the JSON header is followed by raw bytes and the input says
``"parameters": {"binary_data_size": N}``; the request's ``Inference-Header-Content-Length``
header gives the JSON header's size. BYTES elements travel as a 4-byte little-endian length
and the bytes. Nothing is allocated from a declared shape: the element count of the data must
equal the product of the shape.

Bounded before any loop over the body: at most :data:`MAX_TENSORS` inputs and outputs, a rank of
at most :data:`MAX_RANK`, and an element count (checked dimension by dimension, stopping at the
first excess) of at most the body's size in bytes (every element takes at least one byte) and
:data:`MAX_ELEMENTS`. The request's JSON is validated by :class:`InferRequestBody`, the pydantic
model whose schema the OpenAPI document shows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelpress.errors import InvalidInputError
from modelpress.serving.http import dumps, loads

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
EXAMPLE = '{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["A man is playing a guitar."]}]}'
MAX_TENSORS = 16  # inputs (and requested outputs) per request; the built-in models take one
MAX_RANK = 8  # dimensions per tensor: images are [N, C, H, W]
MAX_ELEMENTS = 1 << 28  # elements per tensor, whatever the body size (a 1 GiB body of UINT8)
MAX_NAME = 256  # characters of a tensor name
Datatype = Literal["BYTES", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
_DATA_SCHEMA = {
    "description": "The elements, flat in row-major order or nested as the shape; strings for BYTES",
    "anyOf": [{"type": "array"}, {"type": "string"}, {"type": "number"}, {"type": "boolean"}],
}


class TensorParameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data_size: Annotated[int, Field(ge=0, strict=True)] | None = None
    binary_data: bool | None = None


class InputTensor(BaseModel):
    """One input: ``{"name", "shape", "datatype", "data"}`` (or ``parameters.binary_data_size`` with the binary extension)."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=MAX_NAME)
    shape: list[Annotated[int, Field(ge=0, le=MAX_ELEMENTS, strict=True)]] = Field(max_length=MAX_RANK)
    datatype: Datatype
    data: Any = Field(None, json_schema_extra=_DATA_SCHEMA)
    parameters: TensorParameters | None = None


class OutputTensor(BaseModel):
    """A requested output: its name, and ``parameters.binary_data`` to get it as binary."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=MAX_NAME)
    parameters: TensorParameters | None = None


class RequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data_output: bool | None = None


class InferRequestBody(BaseModel):
    """A KServe v2 infer request (the JSON part; with the binary extension the tensors' bytes follow it)."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "example": {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["A man is playing a guitar."]}]}
        },
    )
    id: str | None = Field(None, max_length=256)
    inputs: list[InputTensor] = Field(min_length=1, max_length=MAX_TENSORS)
    outputs: list[OutputTensor] | None = Field(None, max_length=MAX_TENSORS)
    parameters: RequestParameters | None = None


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: Any  # np.ndarray for numbers, list[str] for BYTES


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[dict[str, Any]] | None = None  # requested outputs, as sent
    binary_output: bool = False  # parameters.binary_data_output
    parameters: dict[str, Any] = field(default_factory=dict)


def _flatten(data: list[Any], limit: int, depth: int, name: str) -> list[Any]:
    """The elements of ``data`` (nested at most ``depth`` lists deep), stopping once there are more than ``limit``."""
    out: list[Any] = []
    stack = [(iter(data), 1)]
    while stack:
        items, level = stack[-1]
        for item in items:
            if isinstance(item, list):
                if level >= depth:
                    raise InvalidInputError(
                        f"The data of input '{name}' is nested deeper than its shape has dimensions.",
                        hint="Send the data flat, or nested as the shape says.",
                    )
                stack.append((iter(item), level + 1))
                break
            out.append(item)
            if len(out) > limit:
                return out
        else:
            stack.pop()
    return out


def element_count(shape: list[int], limit: int, name: str) -> int:
    """The product of ``shape``, refused as soon as a partial product passes ``limit`` (no big-number arithmetic)."""
    count = 1
    for d in shape:
        count *= d
        if count > limit:
            raise InvalidInputError(
                f"Input '{name}' has the shape {shape[:MAX_RANK]}, more elements than this request's body can hold (at most {limit:,}).",
                hint="Make the shape match the data.",
            )
    return count


def _check_raw_bounds(doc: dict[str, Any]) -> None:
    """The counts a loop would run over, checked on the raw JSON before anything else reads it."""
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError("The infer request has no 'inputs' (a non-empty list of tensors).", hint=f"Example: {EXAMPLE}")
    for key in ("inputs", "outputs"):
        raw = doc.get(key)
        if isinstance(raw, list) and len(raw) > MAX_TENSORS:
            raise InvalidInputError(f"The request has {len(raw)} {key}; at most {MAX_TENSORS} are accepted.", hint=f"Example: {EXAMPLE}")
    for t in doc.get("inputs") or ():
        shape = t.get("shape") if isinstance(t, dict) else None
        if isinstance(shape, list) and len(shape) > MAX_RANK:
            raise InvalidInputError(
                f"An input has a shape of {len(shape):,} dimensions; at most {MAX_RANK} are accepted.", hint='Example: "shape": [2]'
            )


def validate_body(doc: Any) -> InferRequestBody:
    """``doc`` (parsed JSON) as an :class:`InferRequestBody`, or 400 saying what is wrong."""
    if not isinstance(doc, dict):
        raise InvalidInputError(f"An infer request is a JSON object, not {type(doc).__name__}.", hint=f"Example: {EXAMPLE}")
    _check_raw_bounds(doc)
    try:
        return InferRequestBody.model_validate(doc)
    except ValidationError as exc:
        raise InvalidInputError(f"Invalid infer request: {validation_summary(exc)}.", hint=f"Example: {EXAMPLE}") from None


def validation_summary(exc: ValidationError, most: int = 3) -> str:
    """The first few problems of a pydantic error, one line each, without echoing large inputs."""
    errors = exc.errors(include_input=False, include_url=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:most]]
    more = f" (and {len(errors) - most} more)" if len(errors) > most else ""
    return "; ".join(parts) + more


def _bytes_elements(buf: memoryview, name: str, count: int) -> list[str]:
    out: list[str] = []
    i, n = 0, len(buf)
    while i < n:
        if len(out) >= count:
            raise InvalidInputError(f"The binary BYTES data of input '{name}' holds more elements than its shape's {count}.")
        if i + 4 > n:
            raise InvalidInputError(f"The binary BYTES data of input '{name}' ends inside an element's 4-byte length.")
        (size,) = struct.unpack_from("<I", buf, i)
        i += 4
        if i + size > n:
            raise InvalidInputError(f"The binary BYTES data of input '{name}' is shorter than its element lengths say.")
        try:
            out.append(bytes(buf[i : i + size]).decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInputError(f"An element of input '{name}' is not UTF-8 text.", hint="Send text encoded as UTF-8.") from None
        i += size
    return out


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode an infer request body (JSON, or JSON header + binary tensors)."""
    binary = memoryview(b"")
    head: bytes | memoryview = body
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise InvalidInputError(f"Inference-Header-Content-Length is {header_length!r}, but the body has {len(body)} bytes.")
        view = memoryview(body)
        head, binary = view[:n], view[n:]
    doc = validate_body(loads(head, example=EXAMPLE))
    limit = min(MAX_ELEMENTS, len(body))  # every element takes at least one byte of the body
    offset = 0
    inputs = []
    for t in doc.inputs:
        name, datatype, shape = t.name, t.datatype, t.shape
        count = element_count(shape, limit, name)
        size = t.parameters.binary_data_size if t.parameters is not None else None
        if size is not None:
            if offset + size > len(binary):
                raise InvalidInputError(
                    f"Input '{name}' says binary_data_size={size!r}, but only {len(binary) - offset} binary bytes are left."
                )
            chunk = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                data: Any = _bytes_elements(chunk, name, count)
                got = len(data)
            else:
                itemsize = DTYPES[datatype].itemsize
                if size % itemsize:
                    raise InvalidInputError(f"Input '{name}' has {size} bytes of {datatype}, not a multiple of {itemsize}.")
                got = size // itemsize
                data = np.frombuffer(chunk, dtype=DTYPES[datatype].newbyteorder("<")).astype(DTYPES[datatype], copy=False)
        else:
            if t.data is None:
                raise InvalidInputError(f"Input '{name}' has neither 'data' nor binary data.", hint=f"Example: {EXAMPLE}")
            raw = t.data
            if not isinstance(raw, list):
                flat = [raw]
            elif list in set(map(type, raw)):  # nested as the shape (one pass in C to know)
                flat = _flatten(raw, count, max(1, len(shape)), name)
            else:  # flat already: no Python-level walk
                flat = raw
            got = len(flat)  # at most count + 1: the walk stops there
            if got == count:
                data = _typed(flat, datatype, name)
        if got != count:
            raise InvalidInputError(
                f"Input '{name}' has {f'more than {count}' if got > count else got} elements, but its shape {shape} needs {count}.",
                hint="Make the shape match the data.",
            )
        if datatype != "BYTES":
            data = data.reshape(shape)
        inputs.append(Tensor(name, datatype, shape, data))
    outputs = None
    if doc.outputs is not None:
        outputs = [{"name": o.name, "parameters": o.parameters.model_dump(exclude_none=True) if o.parameters else {}} for o in doc.outputs]
    params = doc.parameters.model_dump(exclude_none=True) if doc.parameters is not None else {}
    return InferRequest(doc.id, inputs, outputs, bool(params.get("binary_data_output")), params)


_NONE = object()


def _fits(x: Any, datatype: str) -> bool:
    if datatype == "BOOL":
        return isinstance(x, bool)
    if isinstance(x, bool):
        return False
    if datatype.startswith(("INT", "UINT")):
        return isinstance(x, int)
    return isinstance(x, int | float)


_ALLOWED_TYPES: dict[str, frozenset[type]] = {
    "BYTES": frozenset({str}),
    "BOOL": frozenset({bool}),
    **{dt: frozenset({int}) for dt in DTYPES if dt.startswith(("INT", "UINT"))},
    **{dt: frozenset({int, float}) for dt in ("FP16", "FP32", "FP64")},
}


def _typed(flat: list[Any], datatype: str, name: str) -> Any:
    # the element types in one pass in C (a Python loop per element took a second for 4M numbers); the slow search for
    # the offending value only runs when there is one
    if set(map(type, flat)) <= _ALLOWED_TYPES[datatype]:
        return flat if datatype == "BYTES" else _as_array(flat, datatype, name)
    if datatype == "BYTES":
        raise InvalidInputError(
            f"Input '{name}' is BYTES, so its data must be strings.", hint='Example: "data": ["first text", "second text"]'
        )
    bad = next((x for x in flat if not _fits(x, datatype)), _NONE)
    if bad is not _NONE:
        raise InvalidInputError(
            f"Input '{name}' is {datatype}, but its data holds {type(bad).__name__} values such as {str(bad)[:40]!r}.",
            hint=f"Send {datatype} values, or declare the datatype that matches the data.",
        )
    return _as_array(flat, datatype, name)


def _as_array(flat: list[Any], datatype: str, name: str) -> Any:
    try:
        return np.asarray(flat, dtype=DTYPES[datatype])
    except (OverflowError, ValueError) as exc:
        raise InvalidInputError(f"Input '{name}' has values that do not fit {datatype}: {exc}.") from None


def _serialize_bytes(values: np.ndarray) -> bytes:
    parts = []
    for v in values.reshape(-1):
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def datatype_of(arr: np.ndarray) -> str:
    if arr.dtype == object or arr.dtype.kind in "US":
        return "BYTES"
    for name, dt in DTYPES.items():
        if arr.dtype == dt:
            return name
    raise InvalidInputError(f"Output dtype {arr.dtype} has no KServe datatype.")


def encode_response(model: str, version: str, request: InferRequest, tensors: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and headers; outputs the request asked for in binary are appended raw."""
    wanted: list[tuple[str, bool]]
    if request.outputs:
        unknown = [o["name"] for o in request.outputs if o["name"] not in tensors]
        if unknown:
            raise InvalidInputError(f"This model has no output {unknown[0]!r}.", hint=f"Its outputs: {', '.join(tensors)}.")
        wanted = [(o["name"], bool((o.get("parameters") or {}).get("binary_data", request.binary_output))) for o in request.outputs]
    else:
        wanted = [(name, request.binary_output) for name in tensors]
    outs, blobs = [], []
    for name, binary in wanted:
        arr = tensors[name]
        dt = datatype_of(arr)
        entry: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if binary:
            blob = (
                _serialize_bytes(arr)
                if dt == "BYTES"
                else np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [str(v) for v in arr.reshape(-1)] if dt == "BYTES" else np.ascontiguousarray(arr).reshape(-1)
        outs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outs}
    if request.id is not None:
        doc["id"] = request.id
    head = dumps(doc)
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}
