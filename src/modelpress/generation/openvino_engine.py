"""The fast CPU engine: the decoder exported to OpenVINO with an explicit KV cache, its weights
compressed by NNCF (``quantize="int8"``: INT8_SYM per channel; ``"int4"``: INT4_SYM in groups
of 128, embeddings and head in int8; None: as loaded), run by the same step loop as the
reference (continuous batching by left padding, :mod:`modelpress.generation._core`).

The exported graph is :class:`modelpress.export.kv_decoder.KVDecoder`: a Llama decoder with the
cache as plain tensors in and out (past K/V in, the new positions' K/V out).

Decode steps (:class:`modelpress.generation._explicit_kv.ExplicitKVEngine`, shared with the ONNX
Runtime engine) keep the cache in a buffer whose length grows in blocks of ``KV_BLOCK`` positions
(the unused ones masked): the graph sees a new input shape once per block instead of at every
token (a new shape costs OpenVINO milliseconds), and only the new position is written per step.

The IR is cached by the model's files and the options (``cache_dir``, default
``$MODELPRESS_HOME/cache/generation``). ``precision``: ``f32`` (default without ``quantize``:
greedy tokens equal the torch reference) or ``bf16`` (OpenVINO's default on CPUs with bf16,
the default with ``quantize``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress._fs import atomic_folder
from modelpress.errors import ConfigError, ModelpressError, UnsupportedModelError, require
from modelpress.export.kv_decoder import SUPPORTED_TYPES, KVDecoder
from modelpress.generation._core import KV
from modelpress.generation._explicit_kv import ExplicitKVEngine
from modelpress.generation._load import ModelSource, load_tokenizer, resolve, stop_ids_of
from modelpress.locations import cache_dir as cache_root
from modelpress.runtimes.openvino import exact_f32
from modelpress.runtimes.torch import hf_load_kwargs

FORMAT_VERSION = 5  # bump when the exported graph changes meaning (5: grouped-query attention without repeating K/V)
QUANTIZE = (None, "int8", "int4")
INT4_GROUP_SIZE = 128


def supported(source: Any) -> bool:
    """Whether ``source`` is a decoder this engine exports (a Llama-style config)."""
    try:
        src = resolve(source)
    except ModelpressError:
        return False
    cfg = _read_config(src)
    return cfg.get("model_type") in SUPPORTED_TYPES and not cfg.get("sliding_window") and not cfg.get("use_sliding_window")


def _read_config(src: ModelSource) -> dict[str, Any]:
    if src.module is not None:
        return src.module.config.to_dict()
    return json.loads((Path(src.folder) / "config.json").read_text()) if src.folder else {}


def _fingerprint(src: ModelSource, quantize: str | None) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{quantize}".encode())
    if src.folder is not None:
        for p in sorted(Path(src.folder).glob("*")):
            if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"):
                st = p.stat()
                h.update(f"{p.name}|{st.st_size}|{int(st.st_mtime)}".encode())
    else:
        for name, t in src.module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:20]


def export_decoder(hf_model: Any, folder: Path, *, all_logits: bool = False) -> Path:
    """Trace the decoder and write its f32 IR, ``decoder.xml``, and ``engine.json`` into ``folder``.

    ``all_logits``: the graph returns the logits of every new position (perplexity on the graph
    that generates; the engine reads the last one), else only the last position's.
    """
    ov = require("openvino", "openvino")

    cfg = hf_model.config
    dec = KVDecoder(hf_model, all_logits=all_logits).eval()
    n = dec.cache_heads
    example = dec.example_inputs()
    inputs = [
        ("input_ids", [-1, -1], ov.Type.i64),
        ("position_ids", [-1, -1], ov.Type.i64),
        ("attention_mask", [-1, -1], ov.Type.i64),
        ("past_k", [-1, n, -1, dec.head_dim], ov.Type.f32),
        ("past_v", [-1, n, -1, dec.head_dim], ov.Type.f32),
    ]
    with torch.no_grad(), warnings.catch_warnings():
        # OpenVINO converts through torch.jit.trace (deprecated by torch 2.13, TracerWarnings on shape
        # arithmetic) and reads every attribute of the transformers model, deprecated ones included:
        # none of it is about this graph, whose output is checked against the reference in the tests
        warnings.simplefilter("ignore")
        model = ov.convert_model(dec, example_input=example, input=[(name, ov.PartialShape(shape), t) for name, shape, t in inputs])
    for out, name in zip(model.outputs, ("logits", "new_k", "new_v"), strict=True):
        out.get_tensor().set_names({name})
    ov.save_model(model, str(folder / "decoder.xml"), compress_to_fp16=False)
    meta = {"format_version": FORMAT_VERSION, "quantize": None, "model_type": cfg.model_type, "all_logits": all_logits}
    (folder / "engine.json").write_text(json.dumps(meta))
    return folder / "decoder.xml"


def compress_decoder(f32_ir: Path, folder: Path, quantize: str) -> Path:
    """The f32 IR with its weights compressed by NNCF, written to ``folder/decoder.xml``."""
    nncf = require("nncf", "openvino")
    ov = require("openvino", "openvino")
    model = ov.Core().read_model(str(f32_ir))
    if quantize == "int8":
        # symmetric: no zero point to apply; measured here on the 1.1B config, 4 interleaved rounds
        # on a loaded machine: 8.7 tok/s against 7.5 for INT8_ASYM
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
    else:
        # a layer whose input size is no multiple of the group gets the largest group that divides it
        adjust = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
        model = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=INT4_GROUP_SIZE, ratio=1.0, advanced_parameters=adjust
        )
    ov.save_model(model, str(folder / "decoder.xml"), compress_to_fp16=False)
    meta = json.loads((f32_ir.parent / "engine.json").read_text())
    (folder / "engine.json").write_text(json.dumps({**meta, "quantize": quantize}))
    return folder / "decoder.xml"


class OpenVINOEngine(ExplicitKVEngine):
    name = "openvino"

    def __init__(
        self,
        source: Any,
        *,
        quantize: str | None = "int8",
        precision: str | None = None,
        threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        ov = require("openvino", "openvino")
        require("nncf", "openvino")
        if quantize not in QUANTIZE:
            raise ConfigError(f"Unknown quantize '{quantize}' for the openvino engine.", hint="Use quantize='int8', 'int4' or None.")
        precision_arg = precision
        precision = precision or ("f32" if quantize is None else "bf16")
        if precision not in ("f32", "bf16"):
            raise ConfigError(f"Unknown precision '{precision}'.", hint="Use precision='f32' or 'bf16'.")
        src = resolve(source)
        if not supported(source):
            raise UnsupportedModelError(
                f"The openvino engine exports {', '.join(SUPPORTED_TYPES)} decoders without sliding windows; "
                f"'{src.name}' is a '{_read_config(src).get('model_type')}'.",
                hint="Use engine='torch' for this model.",
            )
        from transformers import AutoConfig, GenerationConfig

        config = src.module.config if src.module is not None else AutoConfig.from_pretrained(str(src.folder), trust_remote_code=False)
        self.quantize = quantize
        self.precision = precision
        prebuilt = prebuilt_decoder(src)
        if prebuilt is not None:  # a decoder IR written by modelpress (e.g. GPTQ/AWQ): run as it is
            meta = json.loads((prebuilt.parent / "engine.json").read_text())
            self.quantize = meta.get("quantize")
            self.precision = precision = precision_arg or meta.get("precision") or ("f32" if self.quantize is None else "bf16")
        root = Path(cache_dir) if cache_dir else cache_root("generation")
        # the f32 IR is traced once; each quantized variant is compressed from it
        f32 = root / f"{src.name}-fp32-{_fingerprint(src, None)}"
        target = root / f"{src.name}-{quantize}-{_fingerprint(src, quantize)}" if quantize else f32
        t0 = time.perf_counter()
        if prebuilt is not None:
            target = prebuilt.parent
        elif not (target / "decoder.xml").is_file():
            if not (f32 / "decoder.xml").is_file():
                hf_model = src.module if src.module is not None else _load_hf(src)
                with atomic_folder(f32) as tmp:
                    export_decoder(hf_model, Path(tmp))
                del hf_model
            if quantize:
                with atomic_folder(target) as tmp:
                    compress_decoder(f32 / "decoder.xml", Path(tmp), quantize)
        self.export_seconds = time.perf_counter() - t0
        self.ir_path = target / "decoder.xml"
        core = ov.Core()
        props: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", **exact_f32(precision)}
        if threads:
            props["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(self.ir_path)), "CPU", props)
        self.request = self.compiled.create_infer_request()
        self.all_logits = bool(json.loads((target / "engine.json").read_text()).get("all_logits", False))
        attn_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.layers = int(attn_cfg.num_hidden_layers)
        self.kv_heads = int(getattr(attn_cfg, "num_key_value_heads", None) or attn_cfg.num_attention_heads)
        self.head_dim = int(getattr(attn_cfg, "head_dim", None) or attn_cfg.hidden_size // attn_cfg.num_attention_heads)
        self.cache_heads = self.layers * self.kv_heads
        self.vocab_size = int(attn_cfg.vocab_size)
        try:
            gen_cfg = GenerationConfig.from_pretrained(str(src.folder)) if src.folder is not None else None
        except OSError:
            gen_cfg = None
        super().__init__(
            tokenizer=load_tokenizer(src.tokenizer),
            context_length=int(getattr(attn_cfg, "max_position_embeddings", 0) or 2048),
            stop_token_ids=stop_ids_of(config, gen_cfg),
            bos_token_id=getattr(config, "bos_token_id", None),
            model_name=src.name,
            **options,
        )

    def _run(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[torch.Tensor, KV]:
        """One inference: logits and the K/V of the new positions (copied: the request reuses its output buffers)."""
        inputs = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "past_k": k, "past_v": v}
        self.request.infer(inputs, share_inputs=True)  # no copy of the cache in
        out = self.request.get_tensor("logits").data
        logits = torch.from_numpy((out[:, -1] if self.all_logits else out).copy())
        new_k = torch.from_numpy(self.request.get_tensor("new_k").data.copy())
        new_v = torch.from_numpy(self.request.get_tensor("new_v").data.copy())
        return logits, [(new_k, new_v)]


def prebuilt_decoder(src: ModelSource) -> Path | None:
    """``folder/decoder.xml`` when ``src`` is a folder holding a decoder IR this engine wrote
    (``engine.json`` of the current format beside it), else None.

    Such a folder (the IR, ``engine.json``, ``config.json``, the tokenizer files, optionally
    ``generation_config.json``) is what LLM quantization writes: the engine runs it as it is.
    """
    if src.folder is None or not (Path(src.folder) / "decoder.xml").is_file():
        return None
    meta_path = Path(src.folder) / "engine.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"'{src.folder}' holds an OpenVINO decoder of format {meta.get('format_version')!r}; "
            f"this modelpress reads format {FORMAT_VERSION}.",
            hint="Write it again from the original model with this version, e.g. modelpress optimize MODEL --recipe recipes/llm-int4.yaml.",
        )
    return Path(src.folder) / "decoder.xml"


def _load_hf(src: ModelSource) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = hf_load_kwargs(src.folder)  # no remote code; pickled-only weights refused unless allowed
    return AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32, **kwargs).eval()
