"""Tensor parallelism: one model split over N processes of this machine (``torch.distributed``:
gloo on CPU, NCCL on GPU, on 127.0.0.1 only).

Megatron-style: in every transformer block the layers that open a pair (Q/K/V, the MLP's
gate/up or BERT's intermediate layer) are split by output column, so each rank computes its own
share of the heads and hidden units with no communication; the layers that close it (the
attention output and the MLP's down projection) are split by input row, and one ``all_reduce``
after each sums the ranks' partial products. Two ``all_reduce`` per block; embeddings, norms and
the LM head stay whole on every rank. Which layers: the model's own Hugging Face plan
(``config.base_model_tp_plan``, e.g. Llama's) where transformers has one, else :data:`PLANS`.

The weights are split here with an ``all_reduce`` after the row-parallel layers, not with
``torch.distributed.tensor.parallel.parallelize_module`` (DTensor): both give the same numbers
(max difference 1.2e-5 on stories260k's logits, the same summation order), but DTensor's
dispatch doubled the time of a stories260k decode step on 2 gloo ranks (37 vs 18 ms under
load), and it is 6x slower again under ``inference_mode``, which the generation step loop uses.

Process layout: all N ranks are worker processes (``spawn``) and the runner or engine in the
caller's process is a client of them: it sends each rank the same call over a pipe and gets rank
0's result back. Not rank 0 in the caller, because a server process holds several models and
versions at once, while a default process group, ``torch.set_num_threads`` and a rank blocked in a
collective are all process-wide; the caller keeps no shard and its own threads stay free.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from modelpress import errors
from modelpress.errors import BackendUnavailableError, ConfigError, ModelpressRuntimeError, UnsupportedModelError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # the process group's store and gloo's sockets: loopback only
LOAD_TIMEOUT_S = 900.0  # starting the workers and loading their shards (a big model reads GBs)
COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank waits this long for the others in one collective
ERROR_GRACE_S = 10.0  # after one rank fails a call, how long the others may take to answer before the group is ended
JOIN_S = 5.0  # close(): how long a worker may take to exit after being asked, then it is terminated (then killed)

# Plans for models whose transformers config has none: module path (``*``: one path segment) -> style.
BERT_PLAN = {
    "encoder.layer.*.attention.self.query": "colwise",
    "encoder.layer.*.attention.self.key": "colwise",
    "encoder.layer.*.attention.self.value": "colwise",
    "encoder.layer.*.attention.output.dense": "rowwise",
    "encoder.layer.*.intermediate.dense": "colwise",
    "encoder.layer.*.output.dense": "rowwise",
}
PLANS = {"bert": BERT_PLAN, "roberta": BERT_PLAN, "xlm-roberta": BERT_PLAN, "camembert": BERT_PLAN, "electra": BERT_PLAN}
STYLES = ("colwise", "rowwise")


@dataclass(frozen=True)
class Rank:
    """Where a worker stands in its group."""

    rank: int
    size: int
    device: str  # "cpu" or "cuda:<rank>"


def check_degree(size: Any, config: Any = None) -> int:
    """``size`` as the number of ranks: an integer >= 1 that divides the model's heads, key/value
    heads and MLP width (``config``: a transformers config; None checks the number only)."""
    example = "Example: create_runner(art, 'torch', tensor_parallel=2), modelpress serve --tensor-parallel 2"
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"tensor_parallel must be an integer >= 1 (the number of processes), got {size!r}.", hint=example)
    if config is None or size == 1:
        return size
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        raise UnsupportedModelError(
            f"tensor_parallel needs a transformer with attention heads; this {getattr(config, 'model_type', '?')} config has none.",
            hint="Serve it in one process (tensor_parallel=1).",
        )
    sizes = {
        "attention heads": heads,
        "key/value heads": getattr(config, "num_key_value_heads", None) or heads,
        "MLP width (intermediate_size)": getattr(config, "intermediate_size", None) or heads,
    }
    for what, n in sizes.items():
        if n % size:
            valid = [d for d in range(2, heads + 1) if all(v % d == 0 for v in sizes.values())]
            why = f"is more than the model's {n} {what}" if size > n else f"does not divide the model's {n} {what}"
            raise ConfigError(
                f"tensor_parallel={size} {why}: every rank needs an equal share of them.",
                hint=f"Valid values for this model: {', '.join(map(str, [1, *valid]))}. {example}",
            )
    return size


def check_device(device: Any, size: int) -> str:
    if device not in ("cpu", "cuda"):
        raise ConfigError(
            f"device must be 'cpu' (gloo) or 'cuda' (NCCL), got {device!r}.", hint="Example: tensor_parallel=2, device='cuda'"
        )
    if device == "cuda" and torch.cuda.device_count() < size:
        raise BackendUnavailableError(
            f"tensor_parallel={size} on 'cuda' needs one GPU per rank; this machine has {torch.cuda.device_count()}.",
            hint=f"Use device='cpu', or tensor_parallel <= {max(1, torch.cuda.device_count())}.",
        )
    return device


# --- splitting a model (in the workers) ------------------------------------------------------------------------
class RowParallelLinear(torch.nn.Module):
    """The second layer of a pair: this rank's columns of the weight, then the ranks' partial products summed
    (``all_reduce``), then the bias once."""

    def __init__(self, linear: torch.nn.Linear, rank: Rank) -> None:
        super().__init__()
        n = linear.in_features // rank.size
        self.in_features, self.out_features = n, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach()[:, rank.rank * n : (rank.rank + 1) * n].contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = torch.nn.functional.linear(x, self.weight)
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


def _split_columns(linear: torch.nn.Linear, rank: Rank) -> None:
    """The first layer of a pair, in place: this rank's rows of the weight (its heads / hidden units) and of the bias."""
    n = linear.out_features // rank.size
    part = slice(rank.rank * n, (rank.rank + 1) * n)
    linear.weight = torch.nn.Parameter(linear.weight.detach()[part].contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.detach()[part].contiguous(), requires_grad=False)
    linear.out_features = n


def _matches(name: str, pattern: str) -> bool:
    """``*`` matches one dotted segment (fnmatch alone would let ``layer.*.output.dense`` match ``attention.output.dense``)."""
    parts, want = name.split("."), pattern.split(".")
    return len(parts) == len(want) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, want, strict=True))


def plan_of(base: Any) -> dict[str, str]:
    config = getattr(base, "config", None)
    plan = dict(getattr(config, "base_model_tp_plan", None) or PLANS.get(getattr(config, "model_type", ""), {}))
    if not plan:
        raise UnsupportedModelError(
            f"No tensor-parallel plan for a '{getattr(config, 'model_type', type(base).__name__)}' model.",
            hint=f"Supported: models whose transformers config has a base_model_tp_plan (Llama, Mistral, Qwen, ...) "
            f"and {', '.join(sorted(PLANS))}. Serve others in one process.",
        )
    odd = sorted({s for s in plan.values() if s not in STYLES})
    if odd:
        raise UnsupportedModelError(f"The model's tensor-parallel plan uses styles modelpress does not apply: {', '.join(odd)}.")
    return plan


def shard_model(model: Any, rank: Rank) -> Any:
    """Keep this rank's share of the column- and row-parallel layers of ``model`` (a transformers model, or a
    module wrapping one), in place; returns ``model``."""
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None:
        raise UnsupportedModelError("tensor_parallel splits a Hugging Face transformer; this module holds none.")
    base = hf.base_model
    plan = plan_of(base)
    chosen = [(name, mod, style) for name, mod in base.named_modules() for pattern, style in plan.items() if _matches(name, pattern)]
    if not chosen:
        raise UnsupportedModelError(f"The tensor-parallel plan matched no layer of this {type(base).__name__}.")
    for name, mod, style in chosen:
        if type(mod) is not torch.nn.Linear:
            raise UnsupportedModelError(f"Layer '{name}' is a {type(mod).__name__}, not a torch.nn.Linear: it cannot be split.")
        if style == "colwise":
            _split_columns(mod, rank)
        else:
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, RowParallelLinear(mod, rank))
    return model


# --- the workers --------------------------------------------------------------------------------------------
# A program runs in every worker: program(spec, rank) -> (handler, info); handler(method, *args) answers each
# call (rank 0's answer goes back to the caller); info (rank 0's) is returned by WorkerGroup.info.
Program = Callable[[Any, Rank], tuple[Callable[..., Any], Any]]


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n == "lo"), next((n for n in names if n.startswith("lo")), "lo"))


def _error_reply(exc: BaseException) -> tuple[str, str, str, str | None]:
    if isinstance(exc, errors.ModelpressError):
        return ("error", type(exc).__name__, exc.message, exc.hint)
    return ("error", "ModelpressRuntimeError", f"{type(exc).__name__}: {exc}", None)


def _worker_main() -> None:
    """One rank (``python -c``, see :class:`WorkerGroup`): connect to the caller, join the group, load the shard,
    then answer calls until told to stop or the caller is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole terminal group: the caller ends the workers
    from multiprocessing.connection import answer_challenge

    rank, port = int(os.environ.pop(RANK_ENV)), int(os.environ.pop(PORT_ENV))
    authkey = bytes.fromhex(os.environ.pop(AUTHKEY_ENV))
    conn = Connection(socket.create_connection((HOST, port)).detach())
    answer_challenge(conn, authkey)
    conn.send(rank)
    size, store_port, program, spec, threads, device = conn.recv()
    loopback = _loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)  # gloo's pairs on loopback, never the host's interface
    os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(store_port), RANK=str(rank), WORLD_SIZE=str(size))
    import torch.distributed as dist

    try:
        torch.set_num_threads(threads)
        backend = "gloo"
        where = "cpu"
        if device == "cuda":
            torch.cuda.set_device(rank)
            backend, where = "nccl", f"cuda:{rank}"
        store = dist.TCPStore(HOST, store_port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
        handler, info = program(spec, Rank(rank, size, where))
        conn.send(("ok", info if rank == 0 else None))
    except BaseException as exc:  # noqa: BLE001  (any failure to start is reported to the caller, which ends the group)
        with contextlib.suppress(OSError):
            conn.send(_error_reply(exc))
        return
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the caller is gone
                break
            if message is None:
                break
            method, args = message
            try:
                with torch.no_grad():  # not inference_mode: the workers own their tensors, and no_grad is enough
                    out = handler(method, *args)
                conn.send(("ok", out if rank == 0 else None))
            except Exception as exc:  # noqa: BLE001  (a failed call is answered, as its error class; the rank keeps serving)
                conn.send(_error_reply(exc))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


RANK_ENV, PORT_ENV, AUTHKEY_ENV = "MODELPRESS_TP_RANK", "MODELPRESS_TP_PORT", "MODELPRESS_TP_AUTHKEY"
WORKER_CODE = "from modelpress.runtimes.tensor_parallel import _worker_main; _worker_main()"


def _shutdown(procs: list[subprocess.Popen[bytes]], conns: list[Connection]) -> None:
    """Ask every worker to exit, then terminate and kill what is left; reap them all."""
    for conn in conns:
        with contextlib.suppress(OSError, ValueError):
            conn.send(None)
    deadline = time.monotonic() + JOIN_S
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(2.0)
        if p.poll() is None:
            p.kill()
            p.wait()
    for conn in conns:
        conn.close()


class WorkerGroup:
    """N worker processes running ``program`` on one model, called as one: ``call(method, *args)`` sends every rank the
    call and returns rank 0's answer. ``close()`` (or garbage collection, or interpreter exit) ends them all.

    The workers are ``python -c`` processes, not ``multiprocessing`` ones, so a caller's script needs no
    ``if __name__ == "__main__"`` guard (spawn re-runs the main module); each connects back to a socket of this
    process on 127.0.0.1 and proves it holds this group's random key (``multiprocessing.connection``'s challenge).
    """

    def __init__(self, size: int, program: Program, spec: Any, *, threads: int, device: str = "cpu", name: str = "model") -> None:
        from multiprocessing.connection import deliver_challenge

        import torch.distributed as dist

        self.size, self.device, self.name = size, device, name
        self.threads = max(1, threads // size)  # the caller's threads shared between the ranks
        self._lock = threading.Lock()
        self.procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self._conns)
        self.broken: str | None = None
        # The process group's rendezvous store lives in this process, on a port the OS picks (no free-port race).
        self._store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
        authkey = secrets.token_bytes(32)
        try:
            with socket.create_server((HOST, 0)) as server:
                server.settimeout(0.5)
                env = {**os.environ, PORT_ENV: str(server.getsockname()[1]), AUTHKEY_ENV: authkey.hex()}
                for rank in range(size):
                    self.procs.append(subprocess.Popen([sys.executable, "-c", WORKER_CODE], env={**env, RANK_ENV: str(rank)}))
                conns: dict[int, Connection] = {}
                deadline = time.monotonic() + LOAD_TIMEOUT_S
                while len(conns) < size:
                    dead = [p.returncode for p in self.procs if p.poll() is not None]
                    if dead or time.monotonic() > deadline:
                        raise ModelpressRuntimeError(
                            f"A tensor-parallel worker of '{name}' {'exited (code ' + str(dead[0]) + ')' if dead else 'did not start'} "
                            "before it connected.",
                            hint="Run it again with --log-level debug; check that python can import modelpress in a fresh process.",
                        )
                    try:
                        sock, _ = server.accept()
                    except TimeoutError:
                        continue
                    conn = Connection(sock.detach())
                    deliver_challenge(conn, authkey)
                    conns[conn.recv()] = conn
            self._conns.extend(conns[r] for r in range(size))
            for conn in self._conns:
                conn.send((size, self._store.port, program, spec, self.threads, device))
            self.info = self._gather(LOAD_TIMEOUT_S, "start")
        except BaseException:
            self._break("its start failed")
            raise

    def call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self.broken is not None:
                raise ModelpressRuntimeError(
                    f"The tensor-parallel workers of '{self.name}' are gone ({self.broken}).",
                    hint="Load the model again (a new runner or engine).",
                )
            data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)  # once for every rank
            for r, conn in enumerate(self._conns):
                try:
                    conn.send_bytes(data)
                except OSError as exc:  # that rank is gone
                    code = self.procs[r].wait(JOIN_S) if self.procs[r].poll() is None else self.procs[r].returncode
                    self._break(f"rank {r} exited (code {code})")
                    raise ModelpressRuntimeError(f"tensor-parallel rank {r} exited (code {code}) before '{method}'.") from exc
            return self._gather(None, method)

    def _gather(self, timeout: float | None, what: str) -> Any:
        """Every rank's answer to one call: rank 0's value, or the error raised as its class. A rank that exits
        closes its connection, which ``wait`` reports as ready and ``recv`` as EOF; that ends the group (the others
        may be stuck in a collective), and its exit is the error reported."""
        replies: dict[int, tuple[Any, ...]] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        failed: tuple[Any, ...] | None = None
        while len(replies) < self.size and self.broken is None:
            if failed is not None and deadline is None:
                deadline = time.monotonic() + ERROR_GRACE_S  # the others may be stuck in a collective the failed rank left
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            pending = [r for r in range(self.size) if r not in replies]
            ready = wait([self._conns[r] for r in pending], left)
            if not ready:
                failed = failed or (
                    "error",
                    "ModelpressRuntimeError",
                    f"{len(pending)} tensor-parallel rank(s) did not answer '{what}'",
                    None,
                )
                self._break(failed[2])
                break
            for r in pending:
                if self._conns[r] not in ready:
                    continue
                try:
                    replies[r] = self._conns[r].recv()
                except (EOFError, OSError):
                    code = self.procs[r].wait(JOIN_S) if self.procs[r].poll() is None else self.procs[r].returncode
                    failed = ("error", "ModelpressRuntimeError", f"tensor-parallel rank {r} exited (code {code}) during '{what}'", None)
                    self._break(failed[2])
                    break
                if failed is None and replies[r][0] == "error":
                    failed = replies[r]
        if failed is not None:
            if what == "start" or len(replies) < self.size:
                self._break(failed[2])  # the ranks are out of step: end them
            cls = getattr(errors, failed[1], None)
            if not (isinstance(cls, type) and issubclass(cls, errors.ModelpressError)):
                cls = ModelpressRuntimeError
            raise cls(failed[2], hint=failed[3])
        if len(replies) < self.size:
            raise ModelpressRuntimeError(f"The tensor-parallel workers of '{self.name}' are gone ({self.broken}).")
        return replies[0][1]

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            if why != "closed":
                log.warning("tensor-parallel workers of %s ended: %s", self.name, why)
        self._finalizer()

    def alive(self) -> list[int]:
        """The pids of the workers still running."""
        return [p.pid for p in self.procs if p.poll() is None]

    def close(self) -> None:
        with self._lock:
            self._break("closed")


__all__ = ["Rank", "RowParallelLinear", "WorkerGroup", "check_degree", "check_device", "plan_of", "shard_model"]
