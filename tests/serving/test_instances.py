"""Model instances (how many the machine gets by default, two serving at once as one would) and the server process's
OpenMP settings."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from modelpress.serving.config import CORES_PER_INSTANCE, BatchConfig, ModelConfig, ServerConfig, default_instances, machine_cores

from .conftest import client_for, make_server

# Two instances batch the same rows with other companions than one instance does, so a row is padded to another length;
# the padded positions are masked out, but the GEMMs then sum in another order: MiniLM's embeddings differ by ~1e-6.
SAME_EMBEDDING_ATOL = 1e-4
BARRIER_TIMEOUT_S = 20  # both instances must be inside a batch at the same time within this


def test_default_instances_follow_the_cores():
    assert [default_instances(c) for c in (1, 2, CORES_PER_INSTANCE, 2 * CORES_PER_INSTANCE, 64)] == [
        1,
        max(1, 2 // CORES_PER_INSTANCE),
        1,
        2,
        64 // CORES_PER_INSTANCE,
    ]
    assert [default_instances(c) for c in (1, 2, 16, 1000)] == [1, 2, 16, 64]  # one per core, at most MAX_INSTANCES
    assert BatchConfig().instances == default_instances(machine_cores())
    assert ServerConfig.from_models(["minilm"], instances=None).models[0].batching.instances == default_instances()
    assert ServerConfig.from_models(["minilm"], instances=3).models[0].batching.instances == 3
    assert ServerConfig.model_validate({"models": [{"source": "minilm", "batching": {"instances": 2}}]}).models[0].batching.instances == 2


@pytest.mark.anyio
async def test_two_instances_run_batches_at_once_and_answer_as_one_instance():
    from modelpress.tasks.text import real_sentences

    texts = real_sentences(24, None)
    server = make_server()
    async with client_for(server) as c:
        for name, instances in (("one", 1), ("two", 2)):
            batching = BatchConfig(max_batch_size=4, max_queue_delay_ms=5, instances=instances)
            await server.repository.load(ModelConfig(source="minilm", name=name, threads=1, batching=batching))
        two = server.repository.get("two")
        barrier = threading.Barrier(2, timeout=BARRIER_TIMEOUT_S)
        threads: set[str] = set()
        calls = [0]
        lock = threading.Lock()
        inner = two.batcher.work

        def work(rows: list) -> list:  # the first two batches wait for each other: both instances must be running
            with lock:
                calls[0] += 1
                first_two = calls[0] <= 2
                threads.add(threading.current_thread().name)
            if first_two:
                barrier.wait()
            return inner(rows)

        two.batcher.work = work

        async def embed(model: str, text: str) -> np.ndarray:
            r = await c.post("/v1/embeddings", json={"model": model, "input": text})
            assert r.status_code == 200, r.text
            return np.asarray(r.json()["data"][0]["embedding"], dtype=np.float32)

        got = {m: await asyncio.gather(*(embed(m, t) for t in texts)) for m in ("two", "one")}
    assert not barrier.broken, "two batches never ran at the same time"
    assert len(threads) == 2
    np.testing.assert_allclose(np.stack(got["two"]), np.stack(got["one"]), atol=SAME_EMBEDDING_ATOL)


PROBE = (
    "import os, sys\n"
    "if sys.argv[1] == 'torch-first': import torch\n"
    "from modelpress.serving.app import prepare_process\n"
    "prepare_process()\n"
    "print(os.environ.get('OMP_WAIT_POLICY'))\n"
)


@pytest.mark.parametrize(
    ("env", "order", "expected"),
    [
        ({}, "server-first", "PASSIVE"),  # what `modelpress serve` does before any model loads
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "server-first", "ACTIVE"),  # the user's setting wins
        ({}, "torch-first", "None"),  # too late once torch (libgomp) is loaded: left alone, not half-applied
    ],
)
def test_the_server_process_lets_openmp_threads_sleep_unless_told_otherwise(env, order, expected):
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE, order], env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_runtimes_that_run_one_call_at_a_time_get_one_instance_with_every_core():
    from modelpress.runtimes import RUNTIMES
    from modelpress.serving.config import SERIAL_RUNTIMES

    assert sorted(SERIAL_RUNTIMES) == sorted(name for name, cls in RUNTIMES.items() if not cls.parallel_calls)
    for runtime in SERIAL_RUNTIMES:
        assert ModelConfig(source="minilm", runtime=runtime).batching.instances == 1
    assert ModelConfig(source="minilm", runtime_options={"tensor_parallel": 2}).batching.instances == 1
    assert ModelConfig(source="minilm", runtime="openvino", batching={"instances": 3}).batching.instances == 3  # set: kept
    for runtime in ("torch", "onnxruntime", None):
        assert ModelConfig(source="minilm", runtime=runtime).batching.instances == default_instances()


def test_an_openvino_artifact_served_without_a_runtime_gets_one_instance(tiny_encoder, tmp_path, monkeypatch):
    """The runtime comes from the artifact's manifest, which the config's check cannot see: the loaded version still gets
    one instance with every core, unless the config sets instances."""
    import modelpress as mp
    from modelpress.runtimes import default_threads
    from modelpress.serving import config as config_mod
    from modelpress.serving.repository import build_version

    monkeypatch.setattr(config_mod, "default_instances", lambda cores=None: 4)  # a 4-core machine's default
    ov = mp.export(tiny_encoder, "openvino", tmp_path / "ov")
    server = ServerConfig()
    loaded = build_version(ModelConfig(source=str(ov.path), warmup=False), server)
    try:
        assert loaded.config.batching.instances == 1
        assert loaded.batcher.config.instances == 1
        assert loaded.handler.runner.threads == default_threads()
    finally:
        loaded.handler.runner.close()
    kept = build_version(ModelConfig(source=str(ov.path), warmup=False, batching={"instances": 3}), server)
    try:
        assert kept.batcher.config.instances == 3  # set by the config: kept
    finally:
        kept.handler.runner.close()
