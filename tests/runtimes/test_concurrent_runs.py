"""One runner called from several threads at once answers each batch as it does alone.

The server runs one loaded runner from ``instances`` worker threads (one per core by default), so every runtime it
serves with must be safe to call concurrently: torch modules under inference mode, ONNX Runtime sessions (``run`` is
thread-safe), OpenVINO (one infer request per thread), the fast tokenizer's ``encode``. Each test starts its threads
together on a barrier and runs batches of different sizes and lengths in a shuffled order, so calls overlap with
calls on other shapes; a mixed-up buffer, a shared infer request or a batch answered with another batch's rows would
give outputs of another batch (differences of the outputs' own scale), far beyond the tolerance.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import modelpress as mp

THREADS = 4  # more callers than this machine's cores: calls overlap and the OS switches between them mid-call
ROUNDS = 3  # each batch runs this many times per thread
BARRIER_S = 60
# The same runner on the same batch: equal to the last bit on every backend checked here, except where a backend splits
# a reduction by how busy its thread pool is; 1e-5 of the output scale allows that and is ~1e4 times smaller than the
# difference between two batches' outputs.
CONCURRENT_RTOL = 1e-5
SENTENCES = [
    "a",
    "a short sentence",
    "a somewhat longer sentence with a few more words in it",
    "two dogs run across the field while a man throws a ball for them to catch",
    "the cat sleeps",
    "A man is playing a guitar on a stage in front of a small crowd of people at night.",
]


def _hammer(call, items: list) -> list:
    """``call(item)`` for every item, ROUNDS times in each of THREADS threads started together; per item, every result."""
    barrier = threading.Barrier(THREADS, timeout=BARRIER_S)

    def worker(seed: int) -> list[tuple[int, object]]:
        order = [i for _ in range(ROUNDS) for i in range(len(items))]
        random.Random(seed).shuffle(order)
        barrier.wait()
        return [(i, call(items[i])) for i in order]

    with ThreadPoolExecutor(THREADS) as pool:
        done = [f.result() for f in [pool.submit(worker, seed) for seed in range(THREADS)]]
    got: list[list] = [[] for _ in items]
    for results in done:
        for i, out in results:
            got[i].append(out)
    assert all(len(g) == THREADS * ROUNDS for g in got)
    return got


def _assert_same(ref: dict[str, np.ndarray], outs: list[dict[str, np.ndarray]]) -> None:
    for out in outs:
        assert set(out) == set(ref)
        for name, want in ref.items():
            assert out[name].shape == want.shape
            assert np.abs(out[name] - want).max() <= CONCURRENT_RTOL * max(1.0, float(np.abs(want).max())), name


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_a_text_runner_called_from_several_threads_answers_as_alone(runtime, tiny_encoder):
    art = mp.load(tiny_encoder)
    task = mp.task_for(art)
    batches = [task.preprocess(SENTENCES[:n]) for n in (1, 2, 3, 6)] + [task.preprocess([s]) for s in SENTENCES[2:5]]
    runner = mp.create_runner(art, runtime, threads=1).load()
    refs = [runner.run(b) for b in batches]
    for ref, outs in zip(refs, _hammer(runner.run, batches), strict=True):
        _assert_same(ref, outs)
    # the batches differ from each other by far more than the tolerance: a mixed-up answer would fail above
    a, b = refs[0], refs[4]
    assert np.abs(a["last_hidden_state"][0, 0] - b["last_hidden_state"][0, 0]).max() > 1e3 * CONCURRENT_RTOL


def test_a_runner_not_loaded_yet_loads_once_when_threads_call_it_at_once(tiny_encoder):
    art = mp.load(tiny_encoder)
    batch = mp.task_for(art).preprocess(SENTENCES[:2])
    runner = mp.create_runner(art, "torch", threads=1)
    loads = []
    original = runner._load

    def counted() -> None:
        loads.append(threading.get_ident())
        original()

    runner._load = counted  # type: ignore[method-assign]
    outs = _hammer(runner.run, [batch])[0]
    assert len(loads) == 1
    _assert_same(outs[0], outs[1:])


@pytest.mark.slow
def test_a_compiled_torch_runner_called_from_several_threads_answers_as_alone(tiny_cnn):
    art = mp.load(tiny_cnn, task="image-classification")
    rng = np.random.default_rng(0)
    batches = [{"pixel_values": rng.standard_normal((n, 1, 28, 28), dtype=np.float32)} for n in (1, 3, 5)]
    eager = mp.create_runner(art, "torch", threads=1).load()
    refs = [eager.run(b) for b in batches]
    runner = mp.create_runner(art, "torch", threads=1, compile=True).load()
    outs = _hammer(runner.run, batches)  # the first calls trace and compile while other threads call too
    for ref, got in zip(refs, outs, strict=True):
        for out in got:
            assert np.abs(out["logits"] - ref["logits"]).max() <= 1e-3 * max(1.0, float(np.abs(ref["logits"]).max()))


def test_the_fast_tokenizer_encodes_from_several_threads_as_alone(tiny_encoder):
    encoder = mp.task_for(mp.load(tiny_encoder)).encoder
    texts = [[s] for s in SENTENCES] + [SENTENCES]
    refs = [encoder.encode(t) for t in texts]
    for ref, outs in zip(refs, _hammer(encoder.encode, texts), strict=True):
        assert all(out == ref for out in outs)


def test_a_freezing_patch_in_one_thread_leaves_the_other_threads_alone():
    """The compiled runner sets inductor's freezing flag around each call (config.patch); calls from two threads at once
    are safe because the patch holds for its own thread only (else the runner runs compiled calls one at a time)."""
    import torch._inductor.config as inductor_config

    from modelpress.runtimes.torch import _COMPILED_CALLS, _config_patch_is_per_thread

    before = inductor_config.freezing
    inside, read, left = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def patcher() -> None:
        with inductor_config.patch(freezing=not before):
            seen["patcher"] = inductor_config.freezing
            inside.set()
            assert read.wait(BARRIER_S)
        left.set()

    def reader() -> None:
        assert inside.wait(BARRIER_S)
        seen["reader"] = inductor_config.freezing
        read.set()

    threads = [threading.Thread(target=f) for f in (patcher, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BARRIER_S)
    assert left.is_set() and seen["patcher"] == (not before)
    per_thread = seen["reader"] == before
    assert _config_patch_is_per_thread() == per_thread
    with _COMPILED_CALLS.held():  # and the runner's guard follows what it found
        assert _COMPILED_CALLS._per_thread == per_thread
