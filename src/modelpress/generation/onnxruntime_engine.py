"""ONNX Runtime engine: the KV-cache decoder graph (``decoder.onnx``, :mod:`modelpress.export.onnx_decoder`)
run by ONNX Runtime in the shared step loop (continuous batching, sampling, stops and streaming
are :mod:`modelpress.generation._core`'s).

Sources:

- a folder written by ``modelpress export MODEL --format onnx`` (or its :class:`Artifact`): its
  ``decoder.onnx``, checked on generated tokens when it was exported; exported from a GPTQ or
  round-to-nearest decoder variant (:mod:`modelpress.export.onnx_compressed`), its weights are that
  variant's integer codes as ``MatMulNBits`` (``quantize`` is then refused: they are quantized already);
- a Hugging Face folder (or an Artifact of one): the decoder is exported once into the cache
  (``cache_dir``, default ``$MODELPRESS_HOME/cache/generation``) and checked the same way.

``quantize``: None (default: the float graph, greedy tokens equal the torch reference), ``"int8"``
or ``"int4"`` (weight-only ``MatMulNBits``), ``"int8-dynamic"`` (ONNX Runtime's dynamic
quantization: int8 weights and activations, integer matmuls); see
:func:`modelpress.export.onnx_decoder.quantize_decoder`. The quantized graph is made once from the
float one and cached.

The prefill and the decode step over a block-grown cache buffer are
:class:`modelpress.generation._explicit_kv.ExplicitKVEngine`'s, shared with the OpenVINO engine.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from modelpress._fs import atomic_folder
from modelpress.artifacts import MANIFEST_NAME, Artifact
from modelpress.errors import ConfigError, UnsupportedModelError, require
from modelpress.export import onnx_decoder
from modelpress.generation._core import KV
from modelpress.generation._explicit_kv import ExplicitKVEngine
from modelpress.generation._load import ModelSource, load_tokenizer, resolve, stop_ids_of
from modelpress.locations import cache_dir as cache_root
from modelpress.runtimes.torch import hf_load_kwargs


def _fingerprint(parts: str, files: list[Path]) -> str:
    """A cache key from ``parts`` and the names, sizes and times of ``files``."""
    h = hashlib.sha256(parts.encode())
    for p in sorted(files):
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:20]


def onnx_folder(source: Any) -> Path | None:
    """The folder of an exported ONNX artifact (``source`` an Artifact of format onnx, or a path to one), else None."""
    if isinstance(source, Artifact):
        return source.path if source.format == "onnx" and source.path is not None else None
    if isinstance(source, str | os.PathLike):
        folder = Path(source)
        if (folder / MANIFEST_NAME).is_file():
            art = Artifact.open(folder)
            return folder if art.format == "onnx" else None
    return None


class OnnxRuntimeEngine(ExplicitKVEngine):
    name = "onnxruntime"

    def __init__(
        self,
        source: Any,
        *,
        quantize: str | None = None,
        threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        require("onnxruntime", "onnx")
        if quantize not in onnx_decoder.QUANTIZE:
            raise ConfigError(
                f"Unknown quantize '{quantize}' for the onnxruntime engine.", hint="Use quantize='int8', 'int4', 'int8-dynamic' or None."
            )
        self.quantize = quantize
        root = Path(cache_dir) if cache_dir else cache_root("generation")
        t0 = time.perf_counter()
        exported = onnx_folder(source)
        if exported is not None:
            name, tokenizer_dir, f32 = Artifact.open(exported).name, exported, exported
            carried = onnx_decoder.read_meta(exported).get("quantize")  # a clear error when the export has no KV-cache decoder
            if quantize and carried:
                raise ConfigError(
                    f"'{exported}' already holds {carried} weights (MatMulNBits carried over from its variant): "
                    f"quantize='{quantize}' would quantize them again.",
                    hint="Load it without quantize: create_engine(folder, 'onnxruntime') or modelpress serve FOLDER --engine onnxruntime",
                )
            key_files = list(exported.glob(onnx_decoder.DECODER_FILE + "*"))
        else:
            src = resolve(source)
            name, tokenizer_dir = src.name, src.tokenizer
            f32 = root / f"{src.name}-onnx-fp32-{_source_key(src)}"
            if not (f32 / onnx_decoder.DECODER_FILE).is_file():
                self._export(src, f32)
            key_files = list(f32.glob(onnx_decoder.DECODER_FILE + "*"))
        folder = f32
        if quantize:
            settings = f"v{onnx_decoder.FORMAT_VERSION}|{quantize}|{onnx_decoder.NBITS.get(quantize)}"
            folder = root / f"{name}-onnx-{quantize}-{_fingerprint(settings, key_files)}"
            if not (folder / onnx_decoder.DECODER_FILE).is_file():
                with atomic_folder(folder) as tmp:
                    onnx_decoder.quantize_decoder(f32, Path(tmp), quantize)
        self.export_seconds = time.perf_counter() - t0
        self.decoder_path = folder / onnx_decoder.DECODER_FILE
        self.session = onnx_decoder.DecoderSession(folder, threads)
        meta = self.session.meta
        self.cache_heads, self.head_dim = self.session.cache_heads, self.session.head_dim
        self.vocab_size = int(meta["vocab_size"])
        config = SimpleNamespace(eos_token_id=meta.get("eos_token_id"), bos_token_id=meta.get("bos_token_id"))
        gen_cfg = SimpleNamespace(eos_token_id=meta.get("generation_eos_token_id"), bos_token_id=meta.get("generation_bos_token_id"))
        super().__init__(
            tokenizer=load_tokenizer(Path(tokenizer_dir)),
            context_length=int(meta["context_length"]),
            stop_token_ids=stop_ids_of(config, gen_cfg),
            bos_token_id=meta.get("bos_token_id"),
            model_name=name,
            **options,
        )

    @staticmethod
    def _export(src: ModelSource, target: Path) -> None:
        """Export the decoder of ``src`` into ``target`` (atomically), checked on the parity prompts."""
        hf_model = src.module if src.module is not None else _load_hf(src)
        if not onnx_decoder.supported(hf_model.config):
            raise UnsupportedModelError(
                f"The onnxruntime engine runs {', '.join(onnx_decoder.SUPPORTED_TYPES)} decoders without sliding windows; "
                f"'{src.name}' is a '{getattr(hf_model.config, 'model_type', None)}'.",
                hint="Use engine='torch' for this model.",
            )
        tok = load_tokenizer(src.tokenizer)
        prompts = [tok(p)["input_ids"] for p in onnx_decoder.PARITY_PROMPTS]
        bos = getattr(hf_model.config, "bos_token_id", None)
        prompts = [[bos, *p] if bos is not None and (not p or p[0] != bos) else list(p) for p in prompts]
        with atomic_folder(target) as tmp:
            onnx_decoder.write_checked(hf_model, Path(tmp), prompts)

    def _run(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[torch.Tensor, KV]:
        logits, new_k, new_v = self.session.run(ids, positions, mask, k, v)  # fresh arrays: no copy needed
        return torch.from_numpy(logits), [(torch.from_numpy(new_k), torch.from_numpy(new_v))]


def _source_key(src: ModelSource) -> str:
    parts = f"v{onnx_decoder.FORMAT_VERSION}|fp32"
    if src.folder is not None:
        files = [p for p in Path(src.folder).glob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")]
        return _fingerprint(parts, files)
    h = hashlib.sha256(parts.encode())
    for name, t in src.module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:20]


def _load_hf(src: ModelSource) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if src.folder is None:  # resolve() gives a module or a folder
        raise UnsupportedModelError(f"'{src.name}' has neither a module nor a folder.")
    kwargs = hf_load_kwargs(src.folder)  # no remote code; pickled-only weights refused unless allowed
    return AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32, **kwargs).eval()
