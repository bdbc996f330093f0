"""A Hugging Face Llama folder to a GGUF file (for llama.cpp), with the ``gguf`` package's writer
and quantizer: no llama.cpp checkout, no ``convert_hf_to_gguf.py``.

``convert(folder, out, quantize)``: ``quantize`` is ``"q8_0"``, ``"q4_0"``, ``"f16"`` or None
(f32). Every 2-D weight (projections, MLPs, embeddings, head) is stored in that type; a weight
whose rows are no multiple of the 32-value block (e.g. stories260k's 172-wide MLP) stays f32, as
do the norms. q/k projection rows are permuted as ``convert_hf_to_gguf.py`` does (llama.cpp's
rotary embedding pairs neighbouring values). The tokenizer's vocabulary is written so llama.cpp
loads the file, but the engine passes token ids: tokenization stays the Hugging Face tokenizer's.

``cached_gguf(folder, quantize)``: the converted file in the modelpress cache
(``$MODELPRESS_HOME/cache/gguf``), keyed by the sha256 of the folder's model files and the
type; written atomically, converted once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from modelpress._fs import atomic_file, file_lock
from modelpress.errors import ConfigError, UnsupportedModelError, require
from modelpress.locations import cache_dir as cache_root

FORMAT_VERSION = 1  # bump when the written file changes meaning
SUPPORTED_TYPES = ("llama", "mistral")  # written as GGUF architecture "llama"
QUANTIZE = {None: "F32", "f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
ALIASES = {"int8": "q8_0", "int4": "q4_0", "fp32": "f32", "fp16": "f16"}
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "tokenizer.model")

_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_PER_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def normalize_quantize(quantize: str | None) -> str | None:
    """``"Q8_0"``, ``"int8"`` -> ``"q8_0"``; ``"int4"`` -> ``"q4_0"``; None/``"f32"`` -> None; ``"f16"``."""
    q = None if quantize is None else ALIASES.get(str(quantize).lower(), str(quantize).lower())
    if q == "f32":
        q = None
    if q not in QUANTIZE:
        raise ConfigError(
            f"Unknown quantize '{quantize}' for the llamacpp engine.",
            hint="Use quantize='q8_0' (int8), 'q4_0' (int4), 'f16' or None (f32), e.g. create_engine(path, 'llamacpp', quantize='q8_0').",
        )
    return q


def read_config(folder: Path) -> dict[str, Any]:
    return dict(json.loads((Path(folder) / "config.json").read_text()))


def check_supported(folder: Path) -> dict[str, Any]:
    """The folder's config when it is a decoder this converter writes, else an UnsupportedModelError."""
    cfg = read_config(folder)
    why = ""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if cfg.get("model_type") not in SUPPORTED_TYPES:
        why = f"its model_type is '{cfg.get('model_type')}'"
    elif cfg.get("sliding_window") or cfg.get("use_sliding_window"):
        why = "it uses sliding-window attention"
    elif cfg.get("attention_bias") or cfg.get("mlp_bias"):
        why = "its projections have biases"
    elif rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        why = f"its rotary embedding is scaled ('{rope.get('rope_type', rope.get('type'))}')"
    elif not any(Path(folder).glob("*.safetensors")):
        why = "it has no safetensors weights"
    if why:
        raise UnsupportedModelError(
            f"The llamacpp engine converts Llama-architecture decoders ({', '.join(SUPPORTED_TYPES)}, plain rotary "
            f"embedding, no biases, safetensors weights); '{folder}' is not one: {why}.",
            hint="Use engine='openvino' or engine='torch' for this model.",
        )
    return cfg


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _vocab(folder: Path, size: int) -> tuple[list[str], list[int]]:
    """Token strings and GGUF token types (1 normal, 2 unknown, 3 control, 6 byte) from the HF tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    pieces = tok.convert_ids_to_tokens(list(range(size)))
    special = {int(i) for i in getattr(tok, "all_special_ids", [])}
    unk = getattr(tok, "unk_token_id", None)
    names, types = [], []
    for i, piece in enumerate(pieces):
        name = piece if isinstance(piece, str) and piece else f"<unused{i}>"
        names.append(name)
        if i == unk:
            types.append(2)
        elif i in special:
            types.append(3)
        elif len(name) == 6 and name.startswith("<0x") and name.endswith(">"):
            types.append(6)
        else:
            types.append(1)
    return names, types


def convert(folder: str | os.PathLike, out: str | os.PathLike, quantize: str | None = None) -> Path:
    """Write ``folder`` (a Hugging Face Llama) as a GGUF file at ``out`` (see the module's doc)."""
    gguf = require("gguf", "llamacpp")
    folder, out = Path(folder), Path(out)
    cfg = check_supported(folder)
    q = normalize_quantize(quantize)
    quiet = logging.getLogger("gguf")  # its writer logs each file at INFO: the CLI and server stay quiet
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return _write(gguf, folder, out, cfg, q)
    finally:
        quiet.setLevel(level)


def _write(gguf: Any, folder: Path, out: Path, cfg: dict[str, Any], q: str | None) -> Path:
    from safetensors import safe_open

    qtype = getattr(gguf.GGMLQuantizationType, QUANTIZE[q])
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = int(cfg["vocab_size"])
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(folder.resolve().name)
    w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(vocab)
    w.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}[QUANTIZE[q]])
    names, types = _vocab(folder, vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(names)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    for key, adder in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id), ("pad_token_id", w.add_pad_token_id)):
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            adder(int(value))

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name in _NAMES:
                    gname = _NAMES[name]
                else:
                    parts = name.split(".")  # model.layers.N.<module>.<sub>.weight
                    module = ".".join(parts[3:-1])
                    if parts[:2] != ["model", "layers"] or module not in _PER_LAYER:
                        raise UnsupportedModelError(
                            f"'{path.name}' holds a tensor the Llama converter does not know: '{name}'.",
                            hint="Use engine='openvino' or engine='torch' for this model.",
                        )
                    gname = f"blk.{parts[2]}.{_PER_LAYER[module]}.weight"
                x = f.get_tensor(name).float()
                # llama.cpp's rotary embedding pairs neighbours: permute q/k rows as convert_hf_to_gguf.py does
                if gname.endswith(("attn_q.weight", "attn_k.weight")):
                    n = heads if gname.endswith("attn_q.weight") else kv_heads
                    x = x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
                a = x.numpy()
                block = gguf.GGML_QUANT_SIZES[qtype][0]
                if a.ndim == 2 and "norm" not in gname and a.shape[-1] % block == 0 and qtype != gguf.GGMLQuantizationType.F32:
                    data = a.astype(np.float16) if QUANTIZE[q] == "F16" else gguf.quants.quantize(a, qtype)
                    w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)
                else:  # norms, and rows no multiple of the block: f32
                    w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def content_hash(folder: str | os.PathLike) -> str:
    """sha256 over the folder's model files (config, weights, tokenizer), names and contents."""
    from modelpress.artifacts import sha256_file

    folder = Path(folder)
    h = hashlib.sha256(f"gguf-v{FORMAT_VERSION}".encode())
    files = sorted({p for pattern in MODEL_FILES for p in folder.glob(pattern) if p.is_file()})
    for p in files:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _FILE_HASHES:  # a 2 GB checkpoint takes seconds: hashed once per process while unchanged
            _FILE_HASHES[key] = sha256_file(p)
        h.update(f"{p.name}\0{_FILE_HASHES[key]}\n".encode())
    return h.hexdigest()


def cached_gguf(folder: str | os.PathLike, quantize: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The GGUF of ``folder`` in ``quantize``, converted once into ``cache_dir`` (default the modelpress cache)."""
    folder = Path(folder)
    check_supported(folder)
    q = normalize_quantize(quantize)
    root = Path(cache_dir) if cache_dir else cache_root("gguf")
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{folder.resolve().name}-{QUANTIZE[q].lower()}-{content_hash(folder)[:20]}.gguf"
    if target.is_file():
        return target
    with file_lock(root / f".{target.name}.lock"):
        if not target.is_file():  # another process may have written it meanwhile
            with atomic_file(target) as tmp:
                convert(folder, tmp, q)
    return target
