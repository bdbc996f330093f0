"""KServe v2 / Open Inference Protocol tensors: JSON and the binary tensor data extension.

An input is ``{"name", "shape", "datatype", "data"}``; with the binary extension (what
tritonclient sends by default) the JSON header is followed by raw bytes and the input says
``"parameters": {"binary_data_size": N}``; the request's ``Inference-Header-Content-Length``
header gives the JSON header's size. BYTES elements travel as a 4-byte little-endian length
and the bytes. Nothing is allocated from a declared shape: the element count of the data must
equal the product of the shape.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


def _flatten(data: Any, out: list[Any]) -> None:
    for item in data:
        if isinstance(item, list):
            _flatten(item, out)
        else:
            out.append(item)


def _shape(raw: Any, name: str) -> list[int]:
    if not isinstance(raw, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in raw):
        raise InvalidInputError(
            f"Input '{name}' has the shape {raw!r}; a shape is a list of non-negative integers.", hint='Example: "shape": [2]'
        )
    return raw


def _bytes_elements(buf: memoryview, name: str) -> list[str]:
    out, i, n = [], 0, len(buf)
    while i < n:
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
    doc = loads(head, example=EXAMPLE)
    if not isinstance(doc, dict):
        raise InvalidInputError(f"An infer request is a JSON object, not {type(doc).__name__}.", hint=f"Example: {EXAMPLE}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError("The infer request has no 'inputs' (a non-empty list of tensors).", hint=f"Example: {EXAMPLE}")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInputError("'parameters' must be a JSON object.")
    offset = 0
    inputs = []
    for k, t in enumerate(raw_inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise InvalidInputError(f"Input {k} is not a tensor object with a 'name'.", hint=f"Example: {EXAMPLE}")
        name = t["name"]
        datatype = t.get("datatype")
        if datatype != "BYTES" and datatype not in DTYPES:
            raise InvalidInputError(f"Input '{name}' has the datatype {datatype!r}.", hint=f"Use one of BYTES, {', '.join(DTYPES)}.")
        shape = _shape(t.get("shape"), name)
        count = math.prod(shape)
        tparams = t.get("parameters") or {}
        size = tparams.get("binary_data_size") if isinstance(tparams, dict) else None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInputError(
                    f"Input '{name}' says binary_data_size={size!r}, but only {len(binary) - offset} binary bytes are left."
                )
            chunk = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                data: Any = _bytes_elements(chunk, name)
                got = len(data)
            else:
                itemsize = DTYPES[datatype].itemsize
                if size % itemsize:
                    raise InvalidInputError(f"Input '{name}' has {size} bytes of {datatype}, not a multiple of {itemsize}.")
                got = size // itemsize
                data = np.frombuffer(chunk, dtype=DTYPES[datatype].newbyteorder("<")).astype(DTYPES[datatype], copy=False)
        else:
            if "data" not in t:
                raise InvalidInputError(f"Input '{name}' has neither 'data' nor binary data.", hint=f"Example: {EXAMPLE}")
            raw = t["data"]
            flat: list[Any] = []
            if isinstance(raw, list):
                _flatten(raw, flat)
            else:
                flat.append(raw)
            got = len(flat)
            data = _typed(flat, datatype, name)
        if got != count:
            raise InvalidInputError(
                f"Input '{name}' has {got} elements, but its shape {shape} needs {count}.", hint="Make the shape match the data."
            )
        if datatype != "BYTES":
            data = data.reshape(shape)
        inputs.append(Tensor(name, datatype, shape, data))
    outputs = doc.get("outputs")
    if outputs is not None and (
        not isinstance(outputs, list) or any(not isinstance(o, dict) or not isinstance(o.get("name"), str) for o in outputs)
    ):
        raise InvalidInputError("'outputs' must be a list of objects with a 'name'.", hint='Example: "outputs": [{"name": "embedding"}]')
    rid = doc.get("id")
    return InferRequest(rid if isinstance(rid, str) else None, inputs, outputs, bool(params.get("binary_data_output")), params)


_NONE = object()


def _fits(x: Any, datatype: str) -> bool:
    if datatype == "BOOL":
        return isinstance(x, bool)
    if isinstance(x, bool):
        return False
    if datatype.startswith(("INT", "UINT")):
        return isinstance(x, int)
    return isinstance(x, int | float)


def _typed(flat: list[Any], datatype: str, name: str) -> Any:
    if datatype == "BYTES":
        if any(not isinstance(x, str) for x in flat):
            raise InvalidInputError(
                f"Input '{name}' is BYTES, so its data must be strings.", hint='Example: "data": ["first text", "second text"]'
            )
        return flat
    bad = next((x for x in flat if not _fits(x, datatype)), _NONE)
    if bad is not _NONE:
        raise InvalidInputError(
            f"Input '{name}' is {datatype}, but its data holds {type(bad).__name__} values such as {str(bad)[:40]!r}.",
            hint=f"Send {datatype} values, or declare the datatype that matches the data.",
        )
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
