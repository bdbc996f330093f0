"""Tensor parallelism on 127.0.0.1 (2 gloo ranks): the split encoder (the bundled MiniLM on real STS-B
sentences) and decoder (stories260k: logits, and greedy tokens through continuous batching) equal
the one-process model; bad input is refused before any process starts; no worker outlives close(),
and a dead rank gives an error, not a hang."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest
import torch

import modelpress as mp
from modelpress.errors import BackendUnavailableError, ConfigError, ModelpressRuntimeError
from modelpress.generation import SamplingParams
from modelpress.generation.tensor_parallel import TensorParallelEngine, create_tensor_parallel
from modelpress.generation.torch_engine import TorchEngine

# The row-parallel layers sum the ranks' partial products in another order than one matmul does, so
# float32 rounding differs: measured 3.2e-6 on MiniLM's hidden states and 7.6e-6 on stories260k's
# logits (whose largest is 16), hence a bound of 1e-5 relative to the output's largest magnitude (at least 1).
TOLERANCE = 1e-5
RANKS = 2
REQUEST_TIMEOUT_S = 120.0  # one greedy request on a loaded 2-core machine
PROMPTS = ["Once upon a time", "The cat sat", "Lily and Ben went to the park to play with a big red ball", "Tom had a dog"]


def _close_enough(one: np.ndarray, split: np.ndarray) -> float:
    diff = float(np.abs(one - split).max())
    assert diff <= TOLERANCE * max(1.0, float(np.abs(one).max())), diff
    return diff


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not any(_running(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.needs_data
def test_encoder_equals_one_process_and_a_dead_rank_errors_and_close_leaves_no_process(data_dir, minilm_path):
    from transformers import AutoTokenizer

    rows = [line.split("\t") for line in (data_dir / "stsb/sts-dev.csv").read_text(encoding="utf-8").splitlines()[:12]]
    sentences = [r[5] for r in rows] + [r[6] for r in rows]
    tok = AutoTokenizer.from_pretrained(str(minilm_path))
    batch = {k: np.asarray(v) for k, v in tok(sentences, padding=True, return_tensors="np").items()}
    art = mp.load("minilm")
    one = mp.create_runner(art, "torch", threads=2).run(batch)
    runner = mp.create_runner(art, "torch", tensor_parallel=RANKS, threads=2)
    try:
        split = runner.run(batch)
        group = runner._group
        pids = group.alive()
        assert len(pids) == RANKS and group.threads == 1  # the runner's 2 threads shared between the ranks
        assert set(split) == set(one) == {"last_hidden_state"}
        _close_enough(one["last_hidden_state"], split["last_hidden_state"])
        os.kill(pids[1], signal.SIGKILL)  # a rank dies: the next call fails fast and ends the group
        with pytest.raises(ModelpressRuntimeError, match="rank 1 exited"):
            runner.run(batch)
        with pytest.raises(ModelpressRuntimeError, match="are gone"):
            runner.run(batch)
    finally:
        runner.close()
    assert _gone(pids)


@pytest.mark.slow
@pytest.mark.needs_data
def test_decoder_logits_and_greedy_tokens_equal_the_torch_engine(stories260k):
    greedy = [SamplingParams(max_tokens=6 + 6 * i, temperature=0, stop_token_ids=()) for i in range(len(PROMPTS))]
    ref = TorchEngine(stories260k, threads=1, max_batch_size=2)
    engine = create_tensor_parallel(stories260k, tensor_parallel=RANKS, threads=2, max_batch_size=2)
    assert isinstance(engine, TensorParallelEngine)
    pids = engine.workers()
    try:
        assert len(pids) == RANKS
        with torch.inference_mode():  # as the step loop runs
            ids = ref.encode(PROMPTS[2])
            _close_enough(ref._prefill(ids)[0].numpy(), engine._prefill(ids)[0].numpy())

        def generate(e):
            e.start()
            handles = [e.submit(e.encode(p), g) for p, g in zip(PROMPTS, greedy, strict=True)]
            return [h.result(REQUEST_TIMEOUT_S).token_ids for h in handles]

        expected = generate(ref)
        ref.stop()
        # 4 requests, 2 at a time, of different lengths: sequences join a running batch and leave it, so the
        # workers rearrange their cache shards to the step loop's layout several times
        assert generate(engine) == expected
        assert max(len(step) for step in engine.stats().step_log) == 2
    finally:
        engine.stop(drain=False)
    assert engine.workers() == []
    assert _gone(pids)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"tensor_parallel": 0}, ConfigError, "integer >= 1"),
        ({"tensor_parallel": "2"}, ConfigError, "integer >= 1"),
        ({"tensor_parallel": True}, ConfigError, "integer >= 1"),
        ({"tensor_parallel": 5}, ConfigError, "does not divide the model's 12 attention heads"),
        ({"tensor_parallel": 24}, ConfigError, "is more than the model's 12 attention heads"),
        ({"tensor_parallel": 2, "compile": True}, ConfigError, "does not take compile"),
        ({"tensor_parallel": 2, "device": "tpu"}, ConfigError, "device must be"),
        ({"device": "cuda"}, ConfigError, "one-process torch runner runs on the CPU"),
    ],
)
def test_bad_runner_options_are_refused_before_any_process_starts(options, error, match):
    before = _children()
    with pytest.raises(error, match=match):
        mp.create_runner(mp.load("minilm"), "torch", **options).load()
    assert _children() <= before


@pytest.mark.skipif(torch.cuda.device_count() >= RANKS, reason="this machine has a GPU per rank")
def test_cuda_ranks_need_a_gpu_each():
    with pytest.raises(BackendUnavailableError, match="one GPU per rank"):
        mp.create_runner(mp.load("minilm"), "torch", tensor_parallel=RANKS, device="cuda").load()


@pytest.mark.needs_data
@pytest.mark.parametrize(
    ("size", "match"),
    [
        (3, "does not divide the model's 8 attention heads"),
        (16, "is more than the model's 8 attention heads"),
        (-1, "integer >= 1"),
        (2.0, "integer >= 1"),
    ],
)
def test_bad_engine_degree_is_refused_before_any_process_starts(stories260k, size, match):
    before = _children()
    with pytest.raises(ConfigError, match=match):
        create_tensor_parallel(stories260k, tensor_parallel=size)
    assert _children() <= before


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--tensor-parallel", "2", "--runtime", "onnxruntime"], "torch runtime and the torch engine, not 'onnxruntime'"),
        (["--tensor-parallel", "2", "--engine", "openvino"], "not 'openvino'"),
        (["--tensor-parallel", "0"], "greater than or equal to 1"),
    ],
)
def test_serve_tensor_parallel_bad_flags_fail_before_anything_loads(args, match):
    from typer.testing import CliRunner

    from modelpress.cli.main import app

    result = CliRunner().invoke(app, ["serve", "minilm", *args])
    assert result.exit_code == 2
    text = " ".join((result.output + getattr(result, "stderr", "")).split()).replace("│", "")
    assert match in " ".join(text.split())


def test_serve_tensor_parallel_reaches_the_runner_options():
    """`modelpress serve DIR --tensor-parallel N` puts tensor_parallel into the models' runtime options,
    which serving passes to create_runner / create_engine (their tests above)."""
    from modelpress.serving.config import ServerConfig

    cfg = ServerConfig.from_models(["minilm"], runtime_options={"tensor_parallel": 2})
    assert cfg.models[0].runtime_options == {"tensor_parallel": 2}
