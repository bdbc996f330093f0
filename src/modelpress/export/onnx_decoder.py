"""ONNX with a KV cache: the explicit-KV decoder (:class:`~modelpress.export.kv_decoder.KVDecoder`)
exported with ``torch.onnx`` (the dynamo exporter; the TorchScript one as fallback) and checked on
generated tokens.

The graph, ``decoder.onnx``, has dynamic batch, new-token and past-length axes::

    (input_ids [batch, new], position_ids [batch, new], attention_mask [batch, past+new],
     past_k, past_v [batch, layers*kv_heads, past, head_dim])
        -> (logits [batch, vocab] of the last position, new_k, new_v [batch, layers*kv_heads, new, head_dim])

``decoder.json`` beside it holds what an engine needs without the Hugging Face config (cache
shape, context length, the ids that end a sequence). The ONNX Runtime generation engine
(``create_engine(folder, "onnxruntime")``) runs it.

The parity check (:func:`check_decoder`) generates greedily with the graph on ONNX Runtime (a
prefill, then one decode step per token with the past growing, each prompt alone and all of them
left-padded in one batch) and with the torch model (a plain loop without a cache, the definition of
the torch reference engine's greedy tokens): the tokens must be equal and every step's logits
within :data:`~modelpress.export.parity.PARITY_RTOL` of the reference's largest logit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ConfigError, ExportError, ParityError, UnsupportedModelError, require
from modelpress.export.decoder_spec import INPUT_NAMES, OUTPUT_NAMES, SUPPORTED_TYPES
from modelpress.export.parity import PARITY_RTOL
from modelpress.runtimes.onnxruntime import session as ort_session

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when decoder.onnx or decoder.json change meaning
DECODER_FILE = "decoder.onnx"
META_FILE = "decoder.json"
DEFAULT_OPSET = 18
QUANTIZE = (None, "int8", "int4", "int8-dynamic")
# Weight-only MatMulNBits settings (bits, block size, symmetric, accuracy level), chosen by greedy
# agreement with the torch reference on stories260k (8 tinystories prompts x 32 tokens: identical,
# mean share before the first difference) and by decode speed on the 1.1B config (2 loaded cores):
# accuracy level 4 (int8 activations per block, the VNNI kernels) takes 0.27 s per int8 step where
# level 0 took 15 s (no fast 8-bit kernel), 0.23 s per int4 step against 0.55 s; its agreement:
# int8 block 128 symmetric 7/8, 0.88 (8/8 at level 0; blocks of 32: 6/8, 64: 7/8);
# int4 block 32 asymmetric 0/8, 0.25 (symmetric 0.10, block 128 0.09): round-to-nearest 4 bits is
# too coarse for a model this small (GPTQ/AWQ are issue 14 item 1).
# A layer whose input width is no multiple of the block is padded by the quantizer.
NBITS = {"int8": (8, 128, True, 4), "int4": (4, 32, False, 4)}
PARITY_PROMPTS = ("Once upon a time", "The little dog")
PARITY_NEW_TOKENS = 16  # greedy tokens generated per prompt by the parity check
# the reference loop runs one small forward per token: below this many parameters it runs on one
# torch thread (stories260k on 2 loaded cores: 16 tokens in 12 s with 2 OpenMP threads, 0.19 s with one)
ONE_THREAD_PARAMS = 50_000_000
EXTERNAL_DATA_BYTES = 1_900_000_000  # protobuf's 2 GB limit: larger graphs keep their weights beside the file


def supported(hf_config: Any) -> bool:
    """Whether :class:`KVDecoder` spells out this model's attention (a Llama-style decoder without sliding window)."""
    return (
        getattr(hf_config, "model_type", None) in SUPPORTED_TYPES
        and not getattr(hf_config, "sliding_window", None)
        and not getattr(hf_config, "use_sliding_window", False)
    )


def decoder_meta(hf_model: Any, exporter: str) -> dict[str, Any]:
    """What ``decoder.json`` records: the cache shape, the context, the raw end ids of both configs."""
    cfg = hf_model.config
    gen = getattr(hf_model, "generation_config", None)
    dec_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    return {
        "format_version": FORMAT_VERSION,
        "model_type": cfg.model_type,
        "layers": int(cfg.num_hidden_layers),
        "kv_heads": dec_heads,
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        "vocab_size": int(cfg.vocab_size),
        "context_length": int(getattr(cfg, "max_position_embeddings", 0) or 2048),
        "bos_token_id": getattr(cfg, "bos_token_id", None),
        "eos_token_id": getattr(cfg, "eos_token_id", None),
        "generation_eos_token_id": getattr(gen, "eos_token_id", None) if gen is not None else None,
        "generation_bos_token_id": getattr(gen, "bos_token_id", None) if gen is not None else None,
        "quantize": None,
        "exporter": exporter,
    }


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``decoder.json`` of a folder holding ``decoder.onnx``."""
    path = Path(folder) / META_FILE
    if not path.is_file() or not (Path(folder) / DECODER_FILE).is_file():
        raise UnsupportedModelError(
            f"'{folder}' holds no KV-cache decoder ({DECODER_FILE} and {META_FILE}).",
            hint="Export the causal LM with its KV cache: modelpress export ../shared/data/models/stories260k --format onnx -o out/st",
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UnsupportedModelError(
            f"'{folder}' holds a KV-cache decoder of format {meta.get('format_version')}; this modelpress reads {FORMAT_VERSION}.",
            hint="Export the model again with this modelpress.",
        )
    return meta


def _dynamic(n: int, d: int) -> tuple[list[dict[int, str]], dict[str, dict[int, str]]]:
    """The dynamic axes: per input (dynamo exporter) and per name (TorchScript exporter)."""
    shapes = [{0: "batch", 1: "new"}, {0: "batch", 1: "new"}, {0: "batch", 1: "total"}, {0: "batch", 2: "past"}, {0: "batch", 2: "past"}]
    axes = dict(zip(INPUT_NAMES, shapes, strict=True))
    axes.update({"logits": {0: "batch"}, "new_k": {0: "batch", 2: "new"}, "new_v": {0: "batch", 2: "new"}})
    return shapes, axes


def export_decoder(hf_model: Any, folder: str | Path, *, dynamo: bool = True, opset: int = DEFAULT_OPSET) -> str:
    """Write ``decoder.onnx`` and ``decoder.json`` for ``hf_model`` into ``folder``; returns the exporter used.

    Not checked here: :func:`check_decoder` (or :func:`write_checked`) does that.
    """
    import torch

    if not supported(hf_model.config):
        raise UnsupportedModelError(
            f"The KV-cache ONNX export spells out the attention of {', '.join(SUPPORTED_TYPES)} decoders without sliding "
            f"windows; this model is a '{getattr(hf_model.config, 'model_type', None)}'.",
            hint="Export it without the KV cache: mp.export(model, 'onnx', out, kv_cache=False).",
        )
    folder = Path(folder)
    from modelpress.export.kv_decoder import KVDecoder  # imports torch: only when exporting

    dec = KVDecoder(hf_model).eval()
    example = dec.example_inputs()
    path = folder / DECODER_FILE
    shapes, axes = _dynamic(dec.cache_heads, dec.head_dim)
    external = sum(p.numel() * p.element_size() for p in hf_model.parameters()) > EXTERNAL_DATA_BYTES
    how, reason = "dynamo", "dynamo=False was asked for"
    # the exporters warn about deprecated transformers attributes and TracerWarnings on shape
    # arithmetic; none of it is about this graph, which the parity check runs against the source
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            try:
                program = torch.onnx.export(
                    dec, example, dynamo=True, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                    dynamic_shapes=tuple(shapes), opset_version=max(opset, DEFAULT_OPSET), verbose=False,
                )  # fmt: skip
                if program is None:
                    raise ExportError("torch.onnx.export returned no program.")
                program.save(str(path), external_data=external)
            except Exception as exc:  # noqa: BLE001 - the dynamo exporter raises many types; fall back and say why
                reason = f"the dynamo exporter failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                log.warning("KV-cache ONNX export: %s; using the TorchScript exporter", reason)
                for f in folder.glob(DECODER_FILE + "*"):
                    f.unlink()
                dynamo = False
        if not dynamo:
            how = f"legacy ({reason})"
            try:
                torch.onnx.export(
                    dec, example, str(path), dynamo=False, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                    dynamic_axes=axes, opset_version=min(opset, 17),
                )  # fmt: skip
            except Exception as exc:
                raise ExportError(
                    f"The KV-cache ONNX export failed with both exporters: {reason}; legacy: {type(exc).__name__}: {exc}"
                ) from exc
    (folder / META_FILE).write_text(json.dumps(decoder_meta(hf_model, how), indent=2))
    return how


class DecoderSession:
    """``decoder.onnx`` on ONNX Runtime (the session options every modelpress graph is served with)."""

    def __init__(self, folder: str | Path, threads: int | None = None, *, optimization: str = "all") -> None:
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.session = ort_session(self.folder / DECODER_FILE, threads, optimization=optimization)
        self.cache_heads = int(self.meta["layers"]) * int(self.meta["kv_heads"])
        self.head_dim = int(self.meta["head_dim"])

    def empty(self, batch: int) -> np.ndarray:
        """A cache of no positions."""
        return np.zeros((batch, self.cache_heads, 0, self.head_dim), dtype=np.float32)

    def run(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past_k: np.ndarray, past_v: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits [B, V], new_k, new_v [B, heads, S, D]) of one forward over ``ids`` [B, S]."""
        feed = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "past_k": past_k, "past_v": past_v}
        logits, new_k, new_v = self.session.run(list(OUTPUT_NAMES), feed)
        return logits, new_k, new_v


@contextlib.contextmanager
def _reference_threads(hf_model: Any) -> Iterator[None]:
    """One torch thread for a small model while the reference runs (see :data:`ONE_THREAD_PARAMS`), restored after."""
    import torch

    old = torch.get_num_threads()
    small = sum(p.numel() for p in hf_model.parameters()) < ONE_THREAD_PARAMS
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(old)


def reference_greedy(hf_model: Any, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """The torch model's greedy tokens and each step's last-position logits, by a plain loop without a cache."""
    import torch

    ids = list(prompt)
    tokens, logits = [], []
    with torch.no_grad(), _reference_threads(hf_model):
        for _ in range(new_tokens):
            x = torch.tensor([ids], dtype=torch.long)
            row = hf_model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1].float().numpy()
            logits.append(row)
            tokens.append(int(row.argmax()))
            ids.append(tokens[-1])
    return tokens, logits


def generate_batch(
    dec: DecoderSession, prompts: Sequence[Sequence[int]], new_tokens: int
) -> tuple[list[list[int]], list[list[np.ndarray]]]:
    """Greedy tokens and logits per step of ``prompts`` left-padded in one batch: one prefill, then decode steps
    with the past growing (the cache the graph returned, fed back)."""
    b, size = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((b, size), dtype=np.int64)
    positions = np.zeros((b, size), dtype=np.int64)
    mask = np.zeros((b, size), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, size - len(p) :] = p
        positions[i, size - len(p) :] = np.arange(len(p))
        mask[i, size - len(p) :] = 1
    k, v = dec.empty(b), dec.empty(b)
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[np.ndarray]] = [[] for _ in prompts]
    step_ids, step_pos = ids, positions
    for _ in range(new_tokens):
        out, new_k, new_v = dec.run(step_ids, step_pos, mask, k, v)
        k, v = np.concatenate([k, new_k], 2), np.concatenate([v, new_v], 2)
        for i in range(b):
            logits[i].append(out[i])
            tokens[i].append(int(out[i].argmax()))
        step_ids = np.asarray([[t[-1]] for t in tokens], dtype=np.int64)
        step_pos = step_pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], 1)
    return tokens, logits


def _compare(name: str, ref_tokens: list[int], ref_logits: list[np.ndarray], got_tokens: list[int], got_logits: list[np.ndarray],
             rtol: float) -> tuple[float, float]:  # fmt: skip
    """(max-abs-diff, tolerance) over the steps both took; raises :class:`ParityError` on a token or logit mismatch."""
    worst, tol = 0.0, 0.0
    for step, (r, g) in enumerate(zip(ref_logits, got_logits, strict=True)):
        step_tol = rtol * max(1.0, float(np.abs(r).max()))
        diff = float(np.abs(g.astype(np.float64) - r).max())
        worst, tol = max(worst, diff), max(tol, step_tol)
        if diff > step_tol:
            raise ParityError(
                f"The KV-cache decoder differs from its source ({name}, step {step}): "
                f"logits max-abs-diff {diff:.3g} > tolerance {step_tol:.3g}.",
                max_abs_diff=diff,
                tolerance=step_tol,
                hint="Try the other exporter (dynamo=False), or export without the KV cache (kv_cache=False); nothing was written.",
            )
        if ref_tokens[step] != got_tokens[step]:
            margin = float(r[ref_tokens[step]] - r[got_tokens[step]])
            if margin <= step_tol:  # a tie within the tolerance: either token is the argmax; later steps differ by design
                return worst, tol
            raise ParityError(
                f"The KV-cache decoder generates other tokens than its source ({name}): step {step} gives "
                f"{got_tokens[step]} instead of {ref_tokens[step]} (logit margin {margin:.3g}).",
                max_abs_diff=diff,
                tolerance=step_tol,
                hint="Report the model; nothing was written.",
            )
    return worst, tol


Greedy = Callable[[Sequence[int], int], tuple[list[int], list[np.ndarray]]]


def check_decoder(
    hf_model: Any,
    dec: DecoderSession,
    prompts: Sequence[Sequence[int]],
    *,
    new_tokens: int = PARITY_NEW_TOKENS,
    rtol: float = PARITY_RTOL,
    greedy: Greedy | None = None,
) -> dict[str, Any]:
    """Greedy tokens of ``dec`` equal the torch model's for each prompt alone and for all in one
    left-padded batch, logits within ``rtol``; raises :class:`ParityError` otherwise.

    ``greedy(prompt, new_tokens) -> (tokens, logits per step)``: another reference than ``hf_model``'s
    :func:`reference_greedy` (the OpenVINO decoder a compressed export comes from, :mod:`.onnx_nbits`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("The KV-cache parity check needs non-empty prompts.", hint="Example: prompts=[[1, 403, 407]]")
    refs = [greedy(p, new_tokens) if greedy else reference_greedy(hf_model, p, new_tokens) for p in prompts]
    worst, tol = 0.0, 0.0
    runs = [([i], f"prompt {i} alone") for i in range(len(prompts))]
    if len(prompts) > 1:
        runs.append((list(range(len(prompts))), f"{len(prompts)} prompts in one left-padded batch"))
    for rows, name in runs:
        got_tokens, got_logits = generate_batch(dec, [prompts[i] for i in rows], new_tokens)
        for j, i in enumerate(rows):
            d, t = _compare(name, refs[i][0], refs[i][1], got_tokens[j], got_logits[j], rtol)
            worst, tol = max(worst, d), max(tol, t)
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "tokens_equal": True,
        "logits_max_abs_diff": worst,
        "logits_tolerance": tol,
        "reference_tokens": refs[0][0],
    }


def write_checked(hf_model: Any, folder: str | Path, prompts: Sequence[Sequence[int]], *, dynamo: bool = True,
                  opset: int = DEFAULT_OPSET) -> dict[str, Any]:  # fmt: skip
    """Export the decoder into ``folder`` and check it on generated tokens (one thread); the check's
    report with the exporter used. Raises :class:`ParityError` on a mismatch (``folder`` is the
    caller's temporary folder: nothing is renamed into place)."""
    how = export_decoder(hf_model, folder, dynamo=dynamo, opset=opset)
    report = check_decoder(hf_model, DecoderSession(folder, threads=1), prompts)
    meta = read_meta(folder)
    meta["parity"] = {k: v for k, v in report.items() if k != "reference_tokens"}
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2))
    return {"exporter": how, **report}


def unpadded_rows(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row of each batch alone, without its padding: what a padding position outputs is no
    contract (the KV graph lets a padding query see itself, PyTorch masks it), the real ones are."""
    out = []
    for batch in batches:
        for row in range(len(batch["input_ids"])):
            keep = batch["attention_mask"][row].astype(bool)
            out.append({k: v[row : row + 1][:, keep] for k, v in batch.items()})
    return out


class _DropAdvice(logging.Filter):
    """Drops ONNX Runtime's quantize_dynamic advice to pre-process first (logged on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


@contextlib.contextmanager
def _quiet_quantizers() -> Iterator[None]:
    """ONNX Runtime's quantizers log on the root logger, and importing ``matmul_nbits_quantizer`` calls
    ``logging.basicConfig(level=INFO)`` (a handler and the INFO level for the whole process): undo both."""
    root = logging.getLogger()
    handlers, level, advice = list(root.handlers), root.level, _DropAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


def quantize_decoder(source: str | Path, folder: str | Path, quantize: str) -> Path:
    """``source``'s ``decoder.onnx`` with quantized weights, written into ``folder``.

    ``int8``, ``int4``: weight-only ``MatMulNBits`` (ONNX Runtime's ``MatMulNBitsQuantizer``, see
    :data:`NBITS`; activations stay float). ``int8-dynamic``: ONNX Runtime's ``quantize_dynamic``
    (int8 weights per channel and activations quantized per tensor at run time: integer matmuls;
    on stories260k 3 of 8 greedy continuations identical, prefix share 0.49).
    """
    if quantize not in QUANTIZE or quantize is None:
        raise ConfigError(f"Unknown quantize '{quantize}' for the KV-cache decoder.", hint="Use quantize='int8', 'int4' or 'int8-dynamic'.")
    onnx = require("onnx", "onnx")
    require("onnxruntime", "onnx")
    source, folder = Path(source), Path(folder)
    meta = read_meta(source)
    src, dst = source / DECODER_FILE, folder / DECODER_FILE
    external = src.stat().st_size > EXTERNAL_DATA_BYTES or any(p.name != DECODER_FILE for p in source.glob(DECODER_FILE + "*"))
    with warnings.catch_warnings(), _quiet_quantizers():
        # the quantizers' advice (pre-processing, per-channel) is about their own heuristics; the result is measured by greedy agreement
        warnings.simplefilter("ignore")
        if quantize == "int8-dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]

            quantize_dynamic(
                src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"], use_external_data_format=external
            )
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # type: ignore[import-untyped]

            logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)  # one INFO line per layer otherwise

            bits, block, symmetric, level = NBITS[quantize]
            q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=level)
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=external)
    (folder / META_FILE).write_text(json.dumps({**meta, "quantize": quantize}, indent=2))
    return dst


__all__ = [
    "DECODER_FILE",
    "META_FILE",
    "PARITY_PROMPTS",
    "QUANTIZE",
    "DecoderSession",
    "check_decoder",
    "export_decoder",
    "quantize_decoder",
    "read_meta",
    "supported",
    "unpadded_rows",
    "write_checked",
]
