"""The torch engine split over N processes: ``create_engine(folder, "torch", tensor_parallel=2)``.

The step loop (``_core.BatchingEngine``) runs here, in the caller's process, exactly as for the
torch engine; each prefill and decode is sent to the worker processes
(:class:`modelpress.runtimes.tensor_parallel.WorkerGroup`), whose ranks run the torch engine's own
forward pass (:func:`.torch_engine.forward`) on their share of the layers and keep their share of
the KV cache (their key/value heads). Rank 0's logits come back; sampling, stops and streaming
stay in the step loop.

The step loop rearranges its batch's cache itself (a sequence joins: rows left-padded and
stacked; one ends: its row dropped, padding trimmed) with tensor operations on the ``KV`` it is
given. So this engine hands it one stand-in layer of *tags* (int64, ``[B, 1, T, 1]``): every cache
position gets a number of its own when it is computed, and the loop's padding is 0. Whatever the
loop does to the stand-in, it does to the tags; when the tags of a decode step differ from the
ones the last step returned, the workers gather their real cache into that layout
(:meth:`_DecoderShard.relayout`), so the cache never crosses a process boundary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from modelpress.errors import ModelpressRuntimeError, UnsupportedModelError
from modelpress.generation._core import KV, BatchingEngine
from modelpress.generation._load import resolve
from modelpress.generation.base import Engine
from modelpress.generation.torch_engine import DTYPES, batching_settings, forward
from modelpress.runtimes.base import default_threads
from modelpress.runtimes.tensor_parallel import Rank, WorkerGroup, check_degree, check_device, shard_model
from modelpress.runtimes.torch import hf_load_kwargs


def create_tensor_parallel(source: Any, *, tensor_parallel: Any = 1, **options: Any) -> Engine:
    """``create_engine(source, "torch", tensor_parallel=N)``: the torch engine split over N processes; N == 1 is the
    plain torch engine (``device`` is then refused: it runs on the CPU)."""
    size = check_degree(tensor_parallel)
    if size == 1:
        from modelpress.generation.torch_engine import TorchEngine

        check_device(options.pop("device", "cpu"), 1)
        return TorchEngine(source, **options)
    return TensorParallelEngine(source, tensor_parallel=size, **options)


class TensorParallelEngine(BatchingEngine):
    """The torch engine with its weights and KV cache split over ``tensor_parallel`` worker processes."""

    name = "torch"

    def __init__(
        self,
        source: Any,
        *,
        tensor_parallel: int = 2,
        dtype: str = "float32",
        threads: int | None = None,
        device: str = "cpu",
        **options: Any,
    ) -> None:
        from transformers import AutoConfig

        if dtype not in DTYPES:
            raise UnsupportedModelError(f"Unknown dtype '{dtype}' for the torch engine.", hint=f"Use one of {sorted(DTYPES)}.")
        src = resolve(source)
        if src.folder is None:
            raise UnsupportedModelError(
                f"tensor_parallel loads the model in every worker process from its folder; '{src.name}' exists only in memory.",
                hint="Save it first (model.save_pretrained(DIR)), then create_engine(DIR, 'torch', tensor_parallel=2).",
            )
        config = AutoConfig.from_pretrained(str(src.folder), trust_remote_code=False)
        self.tensor_parallel = check_degree(tensor_parallel, config)
        self.device = check_device(device, self.tensor_parallel)
        self.dtype = dtype
        self.config = config
        self.vocab_size = int(getattr(config, "vocab_size", 0) or 0)
        super().__init__(**batching_settings(src, config), **options)
        self._spec = (str(src.folder), dtype)
        self._threads = threads or default_threads()
        self._group: WorkerGroup | None = None
        self._next_tag = 1  # 0 is the step loop's padding
        self._last: torch.Tensor | None = None  # the tags the last decode step returned
        self._start_workers()

    def _start_workers(self) -> None:
        self._group = WorkerGroup(
            self.tensor_parallel, decoder_program, self._spec, threads=self._threads, device=self.device, name=self.model_name
        )
        self._next_tag, self._last = 1, None

    # --- lifecycle: the workers live from creation to stop(); start() after stop() starts new ones
    def start(self) -> None:
        if self._group is None:
            self._start_workers()
        super().start()

    def stop(self, drain: bool = True) -> None:
        super().stop(drain)
        if self._group is not None:
            self._group.close()
            self._group = None

    def close(self) -> None:
        self.stop(drain=False)

    def workers(self) -> list[int]:
        """The pids of the worker processes still running."""
        return self._group.alive() if self._group is not None else []

    # --- the backend
    def _call(self, method: str, *args: Any) -> Any:
        if self._group is None:
            raise ModelpressRuntimeError(f"The tensor-parallel engine of '{self.model_name}' is stopped.", hint="Call engine.start().")
        return self._group.call(method, *args)

    def _tags(self, *shape: int) -> torch.Tensor:
        n = int(np.prod(shape))
        tags = torch.arange(self._next_tag, self._next_tag + n, dtype=torch.long).reshape(shape)
        self._next_tag += n
        return tags

    def _prefill_rows(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        tags = self._tags(*ids.shape)
        # No sequence running: nothing the workers hold is wanted any more (a finished batch, or a failed step).
        reset = not self._running
        logits = self._call("prefill", ids.numpy(), positions.numpy(), mask.numpy(), tags.numpy(), reset)
        stand_in = tags[:, None, :, None]
        return torch.from_numpy(logits), [(stand_in, stand_in)]

    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, KV]:
        x = torch.tensor([ids], dtype=torch.long)
        logits, kv = self._prefill_rows(x, torch.arange(len(ids)).unsqueeze(0), torch.ones_like(x))
        return logits[0], kv

    def _prefill_padded(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        return self._prefill_rows(ids, positions, mask)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KV, mask: torch.Tensor) -> tuple[torch.Tensor, KV]:
        stand_in = kv[0][0]
        # The step loop never changes a KV tensor in place: the same object is the same layout.
        layout = None if stand_in is self._last else stand_in[:, 0, :, 0].numpy()
        new = self._tags(len(tokens))
        logits = self._call("decode", tokens.numpy(), positions.numpy(), mask.numpy(), layout, new.numpy())
        stand_in = torch.cat([stand_in, new.view(-1, 1, 1, 1)], 2)
        self._last = stand_in
        return torch.from_numpy(logits), [(stand_in, stand_in)]


# --- in the workers --------------------------------------------------------------------------------------------
def decoder_program(spec: Any, rank: Rank) -> tuple[Any, Any]:
    """Load the causal LM from its folder, keep this rank's shard; answer ``prefill`` and ``decode``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, dtype = spec
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], **hf_load_kwargs(folder)).eval()
    shard_model(model, rank)
    model.to(rank.device)
    return _DecoderShard(model, rank), None


class _DecoderShard:
    """One rank's model and its share of the running batch's KV cache, in the layout of the step loop's tags."""

    def __init__(self, model: Any, rank: Rank) -> None:
        self.model, self.config, self.rank = model, model.config, rank
        self.tags: torch.Tensor | None = None  # [B, T]: the layout of self.kv
        self.kv: KV = []
        self.pending: list[tuple[torch.Tensor, KV]] = []  # prefilled rows not yet in the batch

    def __call__(self, method: str, *args: Any) -> Any:
        if method == "prefill":
            return self.prefill(*args)
        if method == "decode":
            return self.decode(*args)
        raise ModelpressRuntimeError(f"tensor-parallel engine: unknown call '{method}'.")

    def _run(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, kv: KV) -> tuple[np.ndarray | None, KV]:
        dev = self.rank.device
        t = [torch.from_numpy(np.ascontiguousarray(a)).to(dev) for a in (ids, positions, mask)]
        logits, kv = forward(self.model, self.config, t[0], t[1], kv, t[2])
        return (logits.cpu().numpy() if self.rank.rank == 0 else None), kv

    def prefill(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, tags: np.ndarray, reset: bool) -> np.ndarray | None:
        if reset:
            self.tags, self.kv, self.pending = None, [], []
        logits, kv = self._run(ids, positions, mask, [])
        self.pending.append((torch.from_numpy(tags), kv))
        return logits

    def decode(
        self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray, layout: np.ndarray | None, new: np.ndarray
    ) -> np.ndarray | None:
        if layout is not None:
            self.relayout(torch.from_numpy(layout))
        self.pending = []
        if self.tags is None:  # an invariant of the engine, not user input
            raise ModelpressRuntimeError("tensor-parallel engine: a decode step before any prefill.")
        logits, self.kv = self._run(tokens[:, None], positions[:, None], mask, self.kv)
        self.tags = torch.cat([self.tags, torch.from_numpy(new)[:, None]], 1)
        return logits

    def relayout(self, layout: torch.Tensor) -> None:
        """Gather the cache (the batch's and the pending prefills') into ``layout``: cell ``[b, t]`` holds the
        position tagged ``layout[b, t]``; 0 is padding (zeros, as the step loop pads)."""
        sources = ([(self.tags, self.kv)] if self.tags is not None else []) + self.pending
        pool = torch.cat([tags.reshape(-1) for tags, _ in sources])
        order = torch.argsort(pool)
        ordered = pool[order]
        flat = layout.reshape(-1)
        at = torch.searchsorted(ordered, flat).clamp(max=len(ordered) - 1)
        found, padding = ordered[at] == flat, flat == 0
        if not bool((found | padding).all()):  # an invariant of the engine, not user input
            raise ModelpressRuntimeError("tensor-parallel engine: the batch names a cache position no rank holds.")
        index = torch.where(padding, len(pool), order[at]).to(self.rank.device)
        b, t = layout.shape

        def gather(parts: list[torch.Tensor]) -> torch.Tensor:
            cells = torch.cat([p.permute(0, 2, 1, 3).reshape(-1, p.shape[1], p.shape[3]) for p in parts])  # [cells, H, D]
            cells = torch.cat([cells, cells.new_zeros(1, *cells.shape[1:])])  # the padding cell
            return cells[index].reshape(b, t, *cells.shape[1:]).permute(0, 2, 1, 3).contiguous()

        layers = len(sources[0][1])
        self.kv = [
            (gather([kv[i][0] for _, kv in sources]), gather([kv[i][1] for _, kv in sources]))  # keys, values
            for i in range(layers)
        ]
        self.tags = layout.clone()


__all__ = ["TensorParallelEngine", "create_tensor_parallel"]
