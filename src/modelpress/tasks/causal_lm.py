"""Causal language models: next-token logits; perplexity on a corpus.

Perplexity is exp(mean negative log-likelihood per predicted token). Each document (or the
whole stream, for ``mode="stream"`` corpora such as WikiText-2) is tokenized with BOS first and
scored with a sliding window of ``context`` tokens moved by ``stride`` tokens; every token after
the first is predicted exactly once, with up to ``context - stride`` tokens of earlier text
as its left context (the method of the Hugging Face perplexity guide). Defaults: ``context`` =
the model's maximum positions (capped at 1024), ``stride`` = context / 2.

Fidelity (``agreement_metric``): ``top1_agreement``, the share of positions at which a variant's
most likely next token is the original's (greedy decoding follows the original exactly as long as
they agree). Offline it is counted over the positions of a corpus, in the server over the next
token after each request (``postprocess``'s ``next_token_id``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Signature, TensorSpec
from modelpress.datasets.base import TextCorpus
from modelpress.errors import ConfigError
from modelpress.tasks.base import Progress, Task, _noop, register_task, same_key_rows
from modelpress.tasks.text import TextEncoder, check_texts, real_sentences, text_encoder

MAX_DEFAULT_CONTEXT = 1024


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row of ``logits`` [T, V] (float64 for a stable sum)."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    return x[np.arange(len(targets)), targets] - lse


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for a sliding window over ``n_tokens`` tokens.

    Position ``p`` means token ``p`` is predicted from tokens before it; position 0 (BOS) is
    never scored, every other position exactly once.
    """
    if context < 2 or stride < 1:
        raise ConfigError(f"context must be >= 2 and stride >= 1 (got {context}, {stride}).", hint="Example: context=512, stride=256")
    out = []
    prev_end = 1
    begin = 0
    while prev_end < n_tokens:
        begin = min(begin, prev_end - 1)  # the first scored token needs one token of context
        end = min(begin + context, n_tokens)
        out.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return out


@register_task
class CausalLMTask(Task):
    name = "causal-lm"
    dataset_kind = TextCorpus
    default_dataset = "tinystories"
    primary_metric = "perplexity"
    higher_is_better = False
    agreement_metric = "top1_agreement"
    agreement_metrics = ("top1_agreement",)

    @classmethod
    def auto_model_class(cls):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @classmethod
    def config_from_hf(cls, folder: Path, hf_config: Any) -> dict[str, Any]:
        eos = getattr(hf_config, "eos_token_id", None)
        return {
            "vocab_size": getattr(hf_config, "vocab_size", None),
            "max_positions": getattr(hf_config, "max_position_embeddings", None),
            "bos_token_id": getattr(hf_config, "bos_token_id", None),
            "eos_token_ids": eos if isinstance(eos, list) else [eos] if eos is not None else [],
        }

    @property
    def context(self) -> int:
        if self.config.get("context"):
            return int(self.config["context"])
        return int(min(self.config.get("max_positions") or MAX_DEFAULT_CONTEXT, MAX_DEFAULT_CONTEXT))

    @property
    def stride(self) -> int:
        return int(self.config.get("stride") or max(1, self.context // 2))

    def signature(self, hf_config: Any = None) -> Signature:
        vocab = getattr(hf_config, "vocab_size", None) or self.config.get("vocab_size") or "vocab"
        return Signature(
            inputs=[TensorSpec(name=n, dtype="int64", shape=["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
            outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", "sequence", vocab])],
        )

    def wrap_module(self, hf_model: Any):
        from modelpress.tasks._wrappers import CausalLMLogits

        return CausalLMLogits(hf_model)

    def _ensure_pad(self) -> None:
        tok = self.tokenizer
        if tok is not None and tok.pad_token_id is None:
            # No pad token (common for decoders): pad with EOS; padded positions are masked out.
            tok.pad_token = tok.eos_token or tok.unk_token

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text)["input_ids"])
        bos = self.config.get("bos_token_id")
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    @property
    def encoder(self) -> TextEncoder:
        """Texts to model inputs, cut to ``context`` tokens (padded with EOS when the tokenizer has no pad token)."""
        self._ensure_pad()
        return text_encoder(self, self.context, ["input_ids", "attention_mask"])

    def preprocess(self, inputs: Sequence[Any], seq_len: int | None = None) -> dict[str, np.ndarray]:
        return self.encoder(check_texts(inputs), seq_len)

    def postprocess(self, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """The next token after each input (greedy), with its log-probability."""
        logits = outputs["logits"]
        last = batch["attention_mask"].sum(1).astype(np.int64) - 1
        rows = logits[np.arange(logits.shape[0]), last]
        ids = rows.argmax(-1)
        logp = _log_softmax_at(rows, ids)
        return [
            {"next_token_id": int(i), "next_token": self.tokenizer.decode([int(i)]) if self.tokenizer else None, "logprob": float(lp)}
            for i, lp in zip(ids, logp, strict=True)
        ]

    def sample_raw(self, n: int, data_dir: Path | None = None) -> list[str]:
        if data_dir is not None and (data_dir / "tinystories/sample.txt").is_file():
            from modelpress.datasets.local import read_text

            docs = read_text(data_dir / "tinystories/sample.txt", "tinystories", separator="<|endoftext|>").documents
            return [docs[i % len(docs)] for i in range(n)]
        return real_sentences(n, None)

    def sample_inputs(self, batch_size: int, seq_len: int | None = None, data_dir: Path | None = None) -> dict[str, np.ndarray]:
        return self.preprocess(self.sample_raw(batch_size, data_dir), seq_len=seq_len)

    def token_streams(self, dataset: TextCorpus) -> list[list[int]]:
        if dataset.mode == "stream":
            ids = self.encode("\n\n".join(dataset.documents))
            streams = [ids]
        else:
            streams = [self.encode(d) for d in dataset.documents]
        cap = self.config.get("max_eval_tokens")
        if cap:
            out, left = [], int(cap)
            for s in streams:
                if left <= 1:
                    break
                out.append(s[:left])
                left -= len(out[-1])
            streams = out
        return streams

    def eval_size(self, dataset: TextCorpus) -> int:
        return sum(max(0, len(s) - 1) for s in self.token_streams(dataset))

    def evaluate(self, runner: Any, dataset: TextCorpus, *, batch_size: int = 8, progress: Progress = _noop) -> dict[str, float]:
        self.check_dataset(dataset)
        context, stride = self.context, self.stride
        nll, count = 0.0, 0
        for ids in self.token_streams(dataset):
            arr = np.asarray(ids, dtype=np.int64)
            wins = windows(len(arr), context, stride)
            # Windows of equal length run together; the last one is usually shorter.
            for start in range(0, len(wins), batch_size):
                group = wins[start : start + batch_size]
                by_len: dict[int, list[tuple[int, int, int]]] = {}
                for w in group:
                    by_len.setdefault(w[1] - w[0], []).append(w)
                for ws in by_len.values():
                    x = np.stack([arr[b:e] for b, e, _ in ws])
                    logits = runner.run({"input_ids": x, "attention_mask": np.ones_like(x)})["logits"]
                    for row, (b, e, first) in zip(logits, ws, strict=True):
                        pos = np.arange(first, e)  # absolute positions scored in this window
                        lp = _log_softmax_at(row[pos - b - 1], arr[pos])
                        nll -= float(lp.sum())
                        count += len(pos)
                        progress(len(pos))
        return {
            "perplexity": math.exp(nll / max(count, 1)),
            "nll_per_token": nll / max(count, 1),
            "tokens": float(count),
            "context": float(context),
            "stride": float(stride),
        }

    def agreement(
        self, runner: Any, reference: Any, dataset: TextCorpus, *, batch_size: int = 8, max_tokens: int = 4096
    ) -> dict[str, float]:
        """Top-1 next-token agreement over the first ``max_tokens`` scored positions."""
        same = total = 0
        for ids in self.token_streams(dataset):
            for b, e, _ in windows(len(ids), self.context, self.context):
                x = np.asarray([ids[b:e]], dtype=np.int64)
                batch = {"input_ids": x, "attention_mask": np.ones_like(x)}
                a = runner.run(batch)["logits"][0].argmax(-1)
                r = reference.run(batch)["logits"][0].argmax(-1)
                same += int((a == r).sum())
                total += len(a)
                if total >= max_tokens:
                    return {"top1_agreement": same / total}
        return {"top1_agreement": same / max(total, 1)}

    @classmethod
    def agreement_rows(cls, original: Sequence[Any], variant: Sequence[Any]) -> np.ndarray:
        """1.0 where both results (``postprocess`` dicts) predict the same next token, else 0.0."""
        cls.check_rows(original, variant)
        return same_key_rows(cls.name, "next_token_id", '{"next_token_id": 42, "next_token": " the", "logprob": -0.3}', original, variant)
