"""What sparsity really buys on disk: weights stored as a bitmask plus values, or compressed.

A pruned model is saved dense (zeros included) so that it loads, exports and runs everywhere;
its size on disk is exactly the original's. Stored sparse it is smaller:

* **bitmask + values** (:func:`pack` / :func:`unpack`, one safetensors file): for each tensor
  where it pays, one bit per weight saying which are non-zero (``numpy.packbits``) plus the
  non-zero values in order. At 50% sparsity in fp32 that is 1/32 + 1/2 of the dense bytes
  (about 53%); a tensor with too few zeros to pay for its mask stays dense. The round trip is
  exact (:func:`unpack` gives back every tensor bit for bit).
* **zlib** of the dense safetensors (the standard library's DEFLATE; zstd is not installed
  here): what a generic compressor makes of runs of zeros among random-looking floats.

:func:`size_report` gives all of these for a model folder. Speed is another matter: dense
kernels (PyTorch, ONNX Runtime, OpenVINO on CPU) do the same work with or without zeros, so a
masked model runs at the original's speed; :func:`modelpress.bench.measure.compare_speed`
measures it side by side, in interleaved rounds, as for every variant (benchmarks/prune_bench.py
also times PyTorch's sparse CSR kernel against dense).
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ArtifactError

MASK_SUFFIX = "::mask"
VALUES_SUFFIX = "::values"
FORMAT = "modelpress-bitmask-v1"
ZLIB_LEVEL = 6  # zlib's default trade-off; level 9 saves under 1% more on float weights, at twice the time


def _pays(arr: np.ndarray) -> bool:
    """A bitmask + values is smaller than the dense tensor (one bit per weight against the zeros saved)."""
    if arr.dtype.kind != "f" or arr.size < 64:
        return False
    zeros = arr.size - int(np.count_nonzero(arr))
    return zeros * arr.itemsize > (arr.size + 7) // 8


def pack_arrays(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors as (stored tensors, metadata): sparse ones become ``NAME::mask`` + ``NAME::values``."""
    stored: dict[str, np.ndarray] = {}
    layout: dict[str, list[Any]] = {}
    for name, arr in arrays.items():
        if MASK_SUFFIX in name or VALUES_SUFFIX in name:
            raise ArtifactError(f"A tensor name contains '{MASK_SUFFIX}' or '{VALUES_SUFFIX}', which this format reserves: {name}")
        if _pays(arr):
            flat = arr.reshape(-1)
            nonzero = flat != 0
            stored[name + MASK_SUFFIX] = np.packbits(nonzero)
            stored[name + VALUES_SUFFIX] = np.ascontiguousarray(flat[nonzero])
            layout[name] = [list(arr.shape), str(arr.dtype)]
        else:
            stored[name] = np.ascontiguousarray(arr)
    return stored, {"format": FORMAT, "sparse": json.dumps(layout)}


def unpack_arrays(stored: dict[str, np.ndarray], metadata: dict[str, str]) -> dict[str, np.ndarray]:
    if metadata.get("format") != FORMAT:
        raise ArtifactError(
            f"Not a {FORMAT} file (format {metadata.get('format')!r}).", hint="Pack it with modelpress.optimize.prune.sparse_store.pack."
        )
    layout = json.loads(metadata["sparse"])
    out = {k: v for k, v in stored.items() if not k.endswith((MASK_SUFFIX, VALUES_SUFFIX))}
    for name, (shape, dtype) in layout.items():
        size = int(np.prod(shape))
        nonzero = np.unpackbits(stored[name + MASK_SUFFIX], count=size).astype(bool)
        flat = np.zeros(size, dtype=np.dtype(dtype))
        flat[nonzero] = stored[name + VALUES_SUFFIX]
        out[name] = flat.reshape(shape)
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    arrays = {}
    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata() or {}
        for key in fh.keys():  # noqa: SIM118  (a safetensors handle is not a dict: it has keys(), no __iter__)
            arrays[key] = fh.get_tensor(key)
    return arrays, meta


def pack(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, Any]:
    """Write the safetensors file ``src`` as a bitmask + values file ``dst``; returns both sizes."""
    from safetensors.numpy import save_file

    arrays, meta = _read_safetensors(Path(src))
    stored, layout = pack_arrays(arrays)
    save_file(stored, str(dst), metadata={**{k: v for k, v in meta.items() if k not in layout}, **layout})
    return {
        "dense_bytes": Path(src).stat().st_size,
        "packed_bytes": Path(dst).stat().st_size,
        "sparse_tensors": len(json.loads(layout["sparse"])),
    }


def unpack(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The dense tensors of a packed file (and, with ``dst``, write them back as plain safetensors)."""
    stored, meta = _read_safetensors(Path(src))
    arrays = unpack_arrays(stored, meta)
    if dst is not None:
        from safetensors.numpy import save_file

        rest = {k: v for k, v in meta.items() if k not in ("format", "sparse")}
        save_file(arrays, str(dst), metadata=rest or None)
    return arrays


def _zlib_size(path: Path) -> int:
    comp = zlib.compressobj(ZLIB_LEVEL)
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            size += len(comp.compress(block))
    return size + len(comp.flush())


def size_report(folder: str | os.PathLike) -> dict[str, Any]:
    """Bytes of a model folder's weights: dense, bitmask + values, and zlib of each.

    Every ``*.safetensors`` file is packed into a temporary file that is measured and removed,
    so the figures are real file sizes, not estimates.
    """
    folder = Path(folder)
    files = sorted(folder.rglob("*.safetensors"))
    dense = packed = dense_zlib = packed_zlib = 0
    sparse_tensors = 0
    for file in files:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "packed.safetensors"
            sizes = pack(file, target)
            dense += sizes["dense_bytes"]
            packed += sizes["packed_bytes"]
            sparse_tensors += sizes["sparse_tensors"]
            dense_zlib += _zlib_size(file)
            packed_zlib += _zlib_size(target)
    if not files:
        return {"weights_files": 0}
    return {
        "weights_files": len(files),
        "dense_bytes": dense,
        "bitmask_bytes": packed,
        "dense_zlib_bytes": dense_zlib,
        "bitmask_zlib_bytes": packed_zlib,
        "bitmask_fraction": packed / dense,
        "zlib_fraction": dense_zlib / dense,
        "sparse_tensors": sparse_tensors,
    }
