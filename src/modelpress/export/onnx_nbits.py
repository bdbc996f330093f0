"""ONNX with a KV cache from a weight-compressed OpenVINO decoder (GPTQ, round-to-nearest, scale estimation),
carrying the very integer weights the compression chose.

An LLM technique on ``openvino-decoder`` (:mod:`modelpress.optimize.quantize.llm`) writes a decoder folder whose
IR holds each linear layer as NNCF left it: integer codes (``u4``/``i4``/``u8``/``i8``), a scale per output
channel or group and, asymmetric, a zero point; ``w = (q - zero_point) * scale``. NNCF's ONNX backend refuses
GPTQ, and ONNX Runtime's own GPTQ needs Intel Neural Compressor, so instead of quantizing again this module
moves the codes across:

1. the float model is rebuilt from the folder's ``config.json`` with every weight read from the IR (the
   linear layers dequantized, the norms' weights from the ``Multiply`` their module's name labels), so that
   the KV-cache decoder (:func:`modelpress.export.onnx_decoder.export_decoder`) and the full-sequence graph
   the runners score (``model.onnx``) are exported by the usual exporters;
2. in both ONNX graphs, each ``MatMul`` whose weight is one of those dequantized matrices (found by value:
   the exporters rename and transpose initializers) becomes ONNX Runtime's ``com.microsoft::MatMulNBits``
   with the IR's codes, scales and zero points (4 or 8 bits; a block per group, per channel one block of
   the next power of two at or above the input width, padded with the zero point); the embedding
   ``Gather`` reads a ``DequantizeLinear`` of its codes (8-bit storage, exact);
3. :mod:`.onnx_compressed` checks both graphs against the OpenVINO decoder before anything is written.

Written by hand (a few lines of packing: two codes a byte, low nibble first) because ONNX Runtime's packing
helpers (``quantize_matmul_4bits`` and the ``MatMulNBitsQuantizer``) take float weights and choose the
codes themselves by round-to-nearest; here the codes are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ExportError, UnsupportedModelError, require
from modelpress.export import onnx_decoder

IR_FILE = "decoder.xml"
# accuracy_level 0: MatMulNBits dequantizes to f32 and multiplies in f32, as the OpenVINO f32 reference does
# (levels 1-4 quantize the activations to int8 per block: faster where VNNI exists, and another model)
ACCURACY_LEVEL = 0
MIN_BLOCK = 16  # MatMulNBits' smallest block
_INT_TYPES = {"u4": (4, False), "i4": (4, True), "u8": (8, False), "i8": (8, True)}


@dataclass
class Quantized:
    """One compressed weight ``[N, K]`` (out, in) as groups: ``codes`` unsigned ``[N, G, g]`` (signed
    codes shifted by ``2**(bits-1)``), ``scale`` f32 ``[N, G]``, ``zero_point`` ``[N, G]`` (None: symmetric,
    i.e. the shift)."""

    bits: int
    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None

    @property
    def shape(self) -> tuple[int, int]:
        n, g, size = self.codes.shape
        return n, g * size

    def zp(self) -> np.ndarray:
        """The zero points, the symmetric shift included."""
        if self.zero_point is not None:
            return self.zero_point
        return np.full(self.scale.shape, 1 << (self.bits - 1), dtype=np.uint8)

    def dequantize(self) -> np.ndarray:
        """``(q - zp) * scale`` as f32 ``[N, K]``."""
        q = self.codes.astype(np.float32) - self.zp().astype(np.float32)[..., None]
        return np.ascontiguousarray((q * self.scale[..., None]).reshape(self.shape), dtype=np.float32)


# -- reading the IR ------------------------------------------------------------------------------------
def _consumers(node: Any) -> list[Any]:
    return [t.get_node() for t in node.output(0).get_target_inputs()]


def _const_input(node: Any, skip: Any) -> Any:
    """The Constant feeding ``node`` (through Converts) other than ``skip``; None when there is none."""
    for i in range(node.get_input_size()):
        src = node.input_value(i).get_node()
        if src is skip:
            continue
        while src.get_type_name() == "Convert":
            src = src.input_value(0).get_node()
        if src.get_type_name() == "Constant":
            return src
    return None


def _ints(const: Any) -> np.ndarray:
    """A u4/i4/u8/i8 Constant's values, unpacked (4-bit ones are stored two a byte, low nibble first)."""
    bits, signed = _INT_TYPES[const.get_element_type().get_type_name()]
    raw = np.asarray(const.get_data())
    shape = [int(d) for d in const.get_output_shape(0)]
    if bits == 8:
        return raw.view(np.int8 if signed else np.uint8).reshape(shape).astype(np.int16)
    flat = raw.view(np.uint8).ravel()
    vals = np.empty(flat.size * 2, dtype=np.int16)
    vals[0::2], vals[1::2] = flat & 0x0F, flat >> 4
    vals = vals[: int(np.prod(shape))]
    if signed:
        vals = np.where(vals > 7, vals - 16, vals)
    return vals.reshape(shape)


def _decompression(weight: Any) -> Quantized:
    """The codes, scale and zero point of one compressed weight Constant: ``Convert -> [Subtract zp] -> Multiply scale``."""
    name = weight.get_friendly_name()
    bits, signed = _INT_TYPES[weight.get_element_type().get_type_name()]
    (node,) = [c for c in _consumers(weight) if c.get_type_name() == "Convert"] or [None]
    nxt = _consumers(node) if node is not None else []
    zero_point = None
    if len(nxt) == 1 and nxt[0].get_type_name() == "Subtract":
        zp_const = _const_input(nxt[0], node)
        if zp_const is None:
            raise ExportError(f"The zero point of '{name}' is not a constant in the IR.")
        zero_point = _ints(zp_const)
        node, nxt = nxt[0], _consumers(nxt[0])
    if len(nxt) != 1 or nxt[0].get_type_name() != "Multiply" or (scale_const := _const_input(nxt[0], node)) is None:
        raise ExportError(
            f"The IR's weight '{name}' is not decompressed as NNCF writes it (Convert, Subtract, Multiply by a scale).",
            hint="Export the decoder folder an LLM technique wrote, unmodified.",
        )
    codes = _ints(weight)
    scale = np.asarray(scale_const.get_data(), dtype=np.float32)
    if codes.ndim == 2:  # per output channel: one group of the whole input width
        codes = codes[:, None, :]
    if codes.ndim != 3:
        raise ExportError(f"The IR's weight '{name}' has shape {list(codes.shape)}; a linear layer's is [out, in] or [out, groups, size].")
    group_shape = codes.shape[:2]
    scale = scale.reshape(group_shape)
    shift = 1 << (bits - 1) if signed else 0
    if zero_point is not None:
        zero_point = (zero_point.reshape(group_shape) + shift).astype(np.uint8)
    return Quantized(bits, (codes + shift).astype(np.uint8), scale, zero_point)


def read_ir(path: Path) -> tuple[dict[str, Quantized], Any]:
    """The compressed weights of ``decoder.xml`` by the KV decoder's parameter name (``inner.layers.0.mlp.up_proj.weight``),
    and the ``openvino.Model``."""
    ov = require("openvino", "openvino")
    model = ov.Core().read_model(str(path))
    found: dict[str, Quantized] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_element_type().get_type_name() not in _INT_TYPES:
            continue
        name = op.get_friendly_name()
        if name.endswith("/zero_point") or not name.startswith("self."):
            continue
        found[name.removeprefix("self.")] = _decompression(op)
    return found, model


def _float_weight(model: Any, module: str, numel: int) -> np.ndarray | None:
    """The float Constant of ``module`` (e.g. ``inner.layers.0.input_layernorm``) with ``numel`` values: the input
    of an op the frontend named after the module (``__module.inner.layers.0.input_layernorm/aten::mul/...``)."""
    prefix, found = f"__module.{module}/", {}
    for op in model.get_ordered_ops():
        if not op.get_friendly_name().startswith(prefix):
            continue
        for i in range(op.get_input_size()):
            src = op.input_value(i).get_node()
            if src.get_type_name() == "Constant" and src.get_element_type().get_type_name() in ("f32", "f16"):
                data = np.asarray(src.get_data(), dtype=np.float32)
                if data.size == numel:
                    found[src.get_friendly_name()] = data
    return next(iter(found.values())) if len(found) == 1 else None


def rebuild(folder: Path) -> tuple[Any, dict[str, Quantized]]:
    """The float model of a decoder folder with every weight read from its IR (the compressed ones dequantized),
    and the compressed weights by Hugging Face parameter name."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from modelpress.export.kv_decoder import KVDecoder

    compressed, model = read_ir(folder / IR_FILE)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)  # the folder's code never runs
    if not onnx_decoder.supported(config):
        raise UnsupportedModelError(
            f"The KV-cache ONNX export spells out the attention of {', '.join(onnx_decoder.SUPPORTED_TYPES)} decoders; "
            f"'{folder}' holds a '{getattr(config, 'model_type', None)}'.",
            hint="Serve the decoder folder with the OpenVINO engine instead: modelpress serve FOLDER --engine openvino",
        )
    # random weights, every one overwritten below
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False).eval()
    dec = KVDecoder(hf)
    missing, by_hf = [], {}
    hf_names = {id(p): n for n, p in hf.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        for name, param in dec.named_parameters():
            if name in compressed:
                q = compressed[name]
                if q.shape != tuple(param.shape):
                    raise ExportError(f"The IR's '{name}' has shape {list(q.shape)}; the config's model has {list(param.shape)}.")
                param.copy_(torch.from_numpy(q.dequantize()))
                by_hf[hf_names[id(param)]] = q
                continue
            value = _float_weight(model, name.rsplit(".", 1)[0], param.numel())
            if value is None:
                missing.append(name)
            else:
                param.copy_(torch.from_numpy(np.array(value, dtype=np.float32).reshape(tuple(param.shape))))
    if missing:
        raise ExportError(
            f"The weights {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} were not found in '{folder / IR_FILE}'.",
            hint="Export a decoder folder an LLM technique wrote (modelpress optimize MODEL --recipe recipes/llm-int4.yaml).",
        )
    return hf, by_hf


# -- rewriting the ONNX graph --------------------------------------------------------------------------
def _block(q: Quantized) -> int | None:
    """MatMulNBits' block for ``q``: its group, or for one group per channel the next power of two at or above
    the input width; None when the groups are no power of two of at least :data:`MIN_BLOCK`."""
    k = q.shape[1]
    groups, size = q.codes.shape[1:]
    if groups == 1:
        return max(MIN_BLOCK, 1 << (k - 1).bit_length())
    return size if size >= MIN_BLOCK and size & (size - 1) == 0 else None


def _pack4(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values a byte along the last axis, the first in the low nibble (MatMulNBits' and ONNX's order)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), dtype=np.uint8)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _nbits_inputs(q: Quantized, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B ``[N, blocks, block*bits/8]``, scales ``[N, blocks]``, zero points) of ``MatMulNBits``."""
    k = q.shape[1]
    codes, zp = q.codes, q.zp()
    if codes.shape[1] == 1 and block > k:  # per channel: pad the one block with its zero point (weight 0)
        pad = np.repeat(zp[:, :, None], block - k, axis=2)
        codes = np.concatenate([codes, pad], axis=2)
    if q.bits == 4:
        return _pack4(codes), q.scale.astype(np.float32), _pack4(zp)
    return codes.astype(np.uint8), q.scale.astype(np.float32), zp.astype(np.uint8)


def _dequantize_nodes(helper: Any, numpy_helper: Any, q: Quantized, stem: str, out: str) -> tuple[list[Any], list[Any]]:
    """``DequantizeLinear`` of the codes, one scale per group (8-bit storage: exact), reshaped to ``[N, K]`` as ``out``."""
    n, k = q.shape
    rows = q.codes.reshape(-1, q.codes.shape[2])
    inits = [
        numpy_helper.from_array(rows.astype(np.uint8), f"{stem}_codes"),
        numpy_helper.from_array(q.scale.reshape(-1).astype(np.float32), f"{stem}_scale"),
        numpy_helper.from_array(q.zp().reshape(-1).astype(np.uint8), f"{stem}_zero_point"),
        numpy_helper.from_array(np.asarray([n, k], dtype=np.int64), f"{stem}_shape"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", [i.name for i in inits[:3]], [f"{stem}_rows"], axis=0, name=f"{stem}_DequantizeLinear"),
        helper.make_node("Reshape", [f"{stem}_rows", inits[3].name], [out], name=f"{stem}_Reshape"),
    ]
    return nodes, inits


def to_nbits(model: Any, weights: dict[str, Quantized]) -> dict[str, int]:
    """Replace, in the ONNX ``model`` (in place), every float weight equal to one of ``weights`` dequantized by its
    integer form: ``MatMul`` -> ``MatMulNBits``, an embedding ``Gather`` -> ``Gather`` of a ``DequantizeLinear``.

    Returns how many nodes of each kind were written; raises :class:`ExportError` when a weight is not found.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    by_value = {q.dequantize().tobytes(): name for name, q in weights.items()}
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    used: set[str] = set()
    counts = {"MatMulNBits": 0, "DequantizeLinear": 0}

    def weight_of(node: Any) -> tuple[str | None, bool]:
        """The compressed weight a node's weight input holds, and whether the input is its transpose [K, N]."""
        if node.op_type == "Gather" and node.input[0] in inits:
            return by_value.get(numpy_helper.to_array(inits[node.input[0]]).astype(np.float32).tobytes()), False
        if node.op_type != "MatMul":
            return None, False
        b = node.input[1]
        if b in inits:
            arr = numpy_helper.to_array(inits[b])
            return (by_value.get(np.ascontiguousarray(arr.T, dtype=np.float32).tobytes()), True) if arr.ndim == 2 else (None, False)
        src = producer.get(b)
        if src is not None and src.op_type == "Transpose" and src.input[0] in inits:
            perm = next((list(a.ints) for a in src.attribute if a.name == "perm"), [1, 0])
            if perm == [1, 0]:
                return by_value.get(numpy_helper.to_array(inits[src.input[0]]).astype(np.float32).tobytes()), True
        return None, False

    for node in graph.node:
        name, _ = weight_of(node)
        if name is None:
            new_nodes.append(node)
            continue
        used.add(name)
        q = weights[name]
        stem = f"{name}_{node.op_type}_{len(new_nodes)}".replace("/", "_")
        block = _block(q) if node.op_type == "MatMul" else None
        if block is not None:
            b, scales, zp = _nbits_inputs(q, block)
            n, k = q.shape
            new_inits += [
                numpy_helper.from_array(b, f"{stem}_B{q.bits}"),
                numpy_helper.from_array(scales, f"{stem}_scales"),
                numpy_helper.from_array(zp, f"{stem}_zero_points"),
            ]
            attrs: dict[str, Any] = {"K": k, "N": n, "bits": q.bits, "block_size": block, "accuracy_level": ACCURACY_LEVEL}
            inputs = [node.input[0], *(i.name for i in new_inits[-3:])]
            out = list(node.output)
            new_nodes.append(helper.make_node("MatMulNBits", inputs, out, f"{stem}_MatMulNBits", None, "com.microsoft", **attrs))
            counts["MatMulNBits"] += 1
            continue
        nodes, extra = _dequantize_nodes(helper, numpy_helper, q, stem, f"{stem}_weight")
        new_inits += extra
        new_nodes += nodes
        counts["DequantizeLinear"] += 1
        if node.op_type == "Gather":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            new_nodes.append(helper.make_node("Gather", [f"{stem}_weight", node.input[1]], list(node.output), name=node.name, axis=axis))
        else:  # a group no MatMulNBits block fits: the float weight, dequantized at run time
            new_nodes.append(helper.make_node("Transpose", [f"{stem}_weight"], [f"{stem}_weightT"], perm=[1, 0], name=f"{stem}_Transpose"))
            new_nodes.append(helper.make_node("MatMul", [node.input[0], f"{stem}_weightT"], list(node.output), name=node.name))
    lost = sorted(set(weights) - used)
    if lost:
        raise ExportError(
            f"The ONNX graph has no float weight equal to {', '.join(lost[:4])} dequantized: the codes could not be carried over.",
            hint="Report the model; nothing was written.",
        )
    del graph.node[:]
    graph.node.extend(_live(new_nodes, graph))
    graph.initializer.extend(new_inits)
    needed = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import) and counts["MatMulNBits"]:
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts


def _live(nodes: list[Any], graph: Any) -> list[Any]:
    """``nodes`` without those whose outputs nothing reads (the Transposes of replaced weights), in order."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        kept = [n for n in nodes if any(o in read for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def write_nbits(path: Path, weights: dict[str, Quantized]) -> dict[str, int]:
    """:func:`to_nbits` on the ONNX file at ``path`` (rewritten in place), without the exporter's per-node metadata.

    The dynamo exporter stores each node's Python stack trace (about 1.8 kB a node: 730 kB of stories260k's
    987 kB ``model.onnx``, four times its int4 weights); ONNX Runtime never reads it."""
    onnx = require("onnx", "onnx")
    model = onnx.load(str(path))
    counts = to_nbits(model, weights)
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))
    return counts


__all__ = ["ACCURACY_LEVEL", "Quantized", "read_ir", "rebuild", "to_nbits", "write_nbits"]
