"""The fast CPU engine: the decoder exported to OpenVINO with an explicit KV cache, its weights
compressed by NNCF (``quantize="int8"``: INT8_SYM per channel; ``"int4"``: INT4_SYM in groups
of 128, embeddings and head in int8; None: as loaded), run by the same step loop as the
reference (continuous batching by left padding, :mod:`modelpress.generation._core`).

The exported graph is a Llama decoder written out here with the transformers model's own
modules (embeddings, norms, projections, MLPs, rotary embedding): only attention is spelled out,
so the cache is plain tensors in and out and the graph has no Python control flow::

    (input_ids [B,S], position_ids [B,S], attention_mask [B,T+S], past_k, past_v [B, layers*kv_heads, T, head_dim])
        -> (logits of the last position [B, vocab], new_k, new_v [B, layers*kv_heads, S, head_dim])

Decode steps keep the cache in a buffer whose length grows in blocks of ``KV_BLOCK`` positions
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
from modelpress.generation._core import KV, BatchingEngine
from modelpress.generation._load import ModelSource, load_tokenizer, resolve, stop_ids_of
from modelpress.locations import cache_dir as cache_root
from modelpress.runtimes.torch import hf_load_kwargs

FORMAT_VERSION = 4  # bump when the exported graph changes meaning
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")  # decoders whose attention is the one spelled out below
QUANTIZE = (None, "int8", "int4")
INT4_GROUP_SIZE = 128
KV_BLOCK = 64  # decode-cache positions added at a time (one new input shape per block)


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


class _Decoder(torch.nn.Module):
    """The export graph: one forward over new tokens given the cache of earlier ones."""

    def __init__(self, hf_model: Any) -> None:
        super().__init__()
        cfg = hf_model.config
        self.inner = hf_model.model
        self.lm_head = hf_model.lm_head
        self.layers = len(self.inner.layers)
        attn = self.inner.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.scaling = float(attn.scaling)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def forward(self, input_ids, position_ids, attention_mask, past_k, past_v):
        b, s = input_ids.shape
        h = self.inner.embed_tokens(input_ids)
        cos, sin = self.inner.rotary_emb(h, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D]
        t = past_k.shape[2]
        # query i (absolute position t+i) sees key j when j <= t+i and the key is not padding
        keys = torch.arange(t + s).view(1, 1, 1, t + s)
        queries = (torch.arange(s) + t).view(1, 1, s, 1)
        # a padding query (left padding of a batched prefill) sees itself too: no row is empty, since an
        # empty row gives NaN, and a NaN key or value of a padding position would spoil later steps
        visible = ((keys <= queries) & attention_mask.view(b, 1, 1, t + s).bool()) | (keys == queries)
        group = self.heads // self.kv_heads
        new_k, new_v = [], []
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            lo, hi = i * self.kv_heads, (i + 1) * self.kv_heads
            new_k.append(k)
            new_v.append(v)
            k = torch.cat([past_k[:, lo:hi], k], dim=2)
            v = torch.cat([past_v[:, lo:hi], v], dim=2)
            kr = k.repeat_interleave(group, dim=1) if group > 1 else k
            vr = v.repeat_interleave(group, dim=1) if group > 1 else v
            o = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=visible, scale=self.scaling)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.lm_head(self.inner.norm(h[:, -1:]))[:, 0]
        return logits, torch.cat(new_k, dim=1), torch.cat(new_v, dim=1)


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


def export_decoder(hf_model: Any, folder: Path) -> Path:
    """Trace the decoder and write its f32 IR, ``decoder.xml``, into ``folder``."""
    ov = require("openvino", "openvino")

    cfg = hf_model.config
    dec = _Decoder(hf_model).eval()
    n = dec.layers * dec.kv_heads
    example = (
        torch.ones(2, 3, dtype=torch.long),
        torch.tensor([[4, 5, 6], [2, 3, 4]]),
        torch.ones(2, 7, dtype=torch.long),
        torch.zeros(2, n, 4, dec.head_dim),
        torch.zeros(2, n, 4, dec.head_dim),
    )
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
    (folder / "engine.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "quantize": None, "model_type": cfg.model_type}))
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


class OpenVINOEngine(BatchingEngine):
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
        root = Path(cache_dir) if cache_dir else cache_root("generation")
        # the f32 IR is traced once; each quantized variant is compressed from it
        f32 = root / f"{src.name}-fp32-{_fingerprint(src, None)}"
        target = root / f"{src.name}-{quantize}-{_fingerprint(src, quantize)}" if quantize else f32
        t0 = time.perf_counter()
        if not (target / "decoder.xml").is_file():
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
        props: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            props["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(self.ir_path)), "CPU", props)
        self.request = self.compiled.create_infer_request()
        self._buffer: tuple[torch.Tensor, torch.Tensor] | None = None  # the decode cache (see KV_BLOCK)
        self._buffer_len = 0
        attn_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.layers = int(attn_cfg.num_hidden_layers)
        self.kv_heads = int(getattr(attn_cfg, "num_key_value_heads", None) or attn_cfg.num_attention_heads)
        self.head_dim = int(getattr(attn_cfg, "head_dim", None) or attn_cfg.hidden_size // attn_cfg.num_attention_heads)
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
        logits = torch.from_numpy(self.request.get_tensor("logits").data.copy())
        new_k = torch.from_numpy(self.request.get_tensor("new_k").data.copy())
        new_v = torch.from_numpy(self.request.get_tensor("new_v").data.copy())
        return logits, [(new_k, new_v)]

    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, KV]:
        x = np.asarray([ids], dtype=np.int64)
        empty = np.zeros((1, self.layers * self.kv_heads, 0, self.head_dim), dtype=np.float32)
        logits, kv = self._run(x, np.arange(len(ids), dtype=np.int64)[None], np.ones_like(x), empty, empty)
        return logits[0], kv

    def _prefill_padded(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        empty = np.zeros((ids.shape[0], self.layers * self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return self._run(ids.numpy(), positions.numpy(), mask.numpy(), empty, empty)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KV, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        (k, v) = kv[0]
        b, n, t, d = k.shape
        buf = self._buffer
        # the cache the last step returned is a view of the buffer: go on in place; anything else
        # (a sequence joined or left, a new batch) is copied into a fresh buffer
        if buf is None or buf[0].shape[0] != b or buf[0].shape[2] <= t or k.data_ptr() != buf[0].data_ptr() or self._buffer_len != t:
            size = (t // KV_BLOCK + 1) * KV_BLOCK
            buf = (k.new_zeros(b, n, size, d), v.new_zeros(b, n, size, d))
            buf[0][:, :, :t], buf[1][:, :, :t] = k, v
            self._buffer = buf
        size = buf[0].shape[2]
        full_mask = torch.zeros(b, size + 1, dtype=mask.dtype)
        full_mask[:, :t] = mask[:, :t]
        full_mask[:, size] = 1  # the new token, last in the graph's key order
        logits, new = self._run(tokens.numpy()[:, None], positions.numpy()[:, None], full_mask.numpy(), buf[0].numpy(), buf[1].numpy())
        buf[0][:, :, t : t + 1], buf[1][:, :, t : t + 1] = new[0]
        self._buffer_len = t + 1
        if t + 1 == size:  # full: the next step starts a larger buffer
            self._buffer = None
        return logits, [(buf[0][:, :, : t + 1], buf[1][:, :, : t + 1])]


def _load_hf(src: ModelSource) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = hf_load_kwargs(src.folder)  # no remote code; pickled-only weights refused unless allowed
    return AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32, **kwargs).eval()
