"""The step of engines that run the explicit-KV decoder graph (:mod:`modelpress.export.kv_decoder`):
OpenVINO and ONNX Runtime. The backend gives one inference, :meth:`ExplicitKVEngine._run`; the
prefill and the decode step over a block-grown cache buffer are the same for both.

Decode steps keep the cache in a buffer whose length grows in blocks of ``KV_BLOCK`` positions
(the unused ones masked): the graph sees a new input shape once per block instead of at every
token (a new shape costs a compiling runtime milliseconds), and a step writes only its new
position instead of copying the whole cache.
"""

from __future__ import annotations

import numpy as np
import torch

from modelpress.generation._core import KV, BatchingEngine

KV_BLOCK = 64  # decode-cache positions added at a time (one new input shape per block)


class ExplicitKVEngine(BatchingEngine):
    """A :class:`BatchingEngine` over ``(ids, positions, mask, past_k, past_v) -> (logits, new_k, new_v)``;
    subclasses set ``cache_heads`` (layers x KV heads) and ``head_dim`` and implement ``_run``."""

    cache_heads: int
    head_dim: int
    _buffer: tuple[torch.Tensor, torch.Tensor] | None = None  # the decode cache (see KV_BLOCK)
    _buffer_len = 0

    def _run(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[torch.Tensor, KV]:
        """One inference: the last position's logits [B, vocab] and the new positions' K/V (arrays the caller may keep)."""
        raise NotImplementedError

    def _empty(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.cache_heads, 0, self.head_dim), dtype=np.float32)

    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, KV]:
        x = np.asarray([ids], dtype=np.int64)
        empty = self._empty(1)
        logits, kv = self._run(x, np.arange(len(ids), dtype=np.int64)[None], np.ones_like(x), empty, empty)
        return logits[0], kv

    def _prefill_padded(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        empty = self._empty(ids.shape[0])
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
