"""LLM generation speed on CPU: decode tokens/s at batch 1 and continuous batching.

Model: a TinyLlama-shaped Llama (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate
5632, vocab 32000: about 1.1B parameters) with random weights (decode cost does not depend on
the values), built once and cached under ``$MODELPRESS_BENCH_CACHE`` (default
``~/.cache/modelpress-bench``)/llm. ``--quick``: a tiny Llama of the same shape family, for a
smoke run of the script.

1. decode tokens/s at batch 1 (a 16-token prompt, ``--tokens`` new tokens, greedy, the median of
   ``--rounds`` interleaved rounds) for: the torch reference engine in fp32 and bf16 (eager),
   OpenVINO (weights int8 and int4), and, when ``llama_cpp`` and ``gguf`` import here
   (``pip install 'modelpress[llamacpp]'``), our llamacpp engine (``ours-llamacpp-Q8_0/Q4_0``: our
   step loop and sampler over llama.cpp) beside the peer, llama-cpp-python's own generate loop
   (``llamacpp-Q8_0/Q4_0``), on the same GGUF file (converted once by
   ``modelpress.generation.gguf_convert``), else a printed reason.
   Each is also shown as a fraction of the memory-read roofline: weight bytes read per token x
   tokens/s against the read bandwidth measured here (sums over a 1 GB array, numpy and torch on every thread);
2. continuous batching on each fast int4 engine (ours-llamacpp Q4_0, OpenVINO int4): 8 concurrent streams against the same 8
   requests one after another (aggregate tokens/s, target >= 4x), and time to first token
   p50/p99 under that load;
3. served batch-1 decode: ``modelpress serve`` with the fastest int8 engine (llamacpp Q8_0, else openvino int8) streaming
   ``/v1/completions`` against the same engine in this process, in interleaved rounds (target:
   within 5%). ``--no-serve`` skips it.

    python benchmarks/llm_bench.py             # the 1.1B config (first run builds it: minutes)
    python benchmarks/llm_bench.py --quick     # tiny sizes: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _loadgen import free_port
from _procs import Procs, load1, load_section, main_guard

CACHE = Path(os.environ.get("MODELPRESS_BENCH_CACHE", Path.home() / ".cache/modelpress-bench")) / "llm"
THREADS = int(os.environ.get("BENCH_THREADS", str(os.cpu_count() or 2)))
FULL = {
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
QUICK = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 704,
    "vocab_size": 4096,
    "max_position_embeddings": 512,
}
PROMPT_TOKENS = 16
STREAMS = 8
BATCH_TARGET = 4.0  # the target: 8 concurrent streams >= 4x the same 8 one after another
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
# bytes read per weight: GGUF Q8_0 = 32 int8 + one fp16 scale per 32; Q4_0 = 32 nibbles + one fp16 scale;
# NNCF int8_sym per channel ~1 (one scale per output row); int4_sym group 128 = 0.5 + fp16 scale / 128
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 2 / 128, "Q8_0": 34 / 32, "Q4_0": 18 / 32}
# the head (and embeddings) are kept in int8 by NNCF's int4 mode and in Q6_K/Q8_0-like types by nobody here: count them at int8
HEAD_BYTES = {"int4": 1.0, "Q4_0": 18 / 32}


# -- the machine ----------------------------------------------------------------------------------
def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in have]


def read_bandwidth_gbs(size_bytes: int) -> float:
    """Read bandwidth in GB/s: the best of 5 sums over an array of ``size_bytes`` (float32), by numpy
    (one thread) and by torch on ``THREADS`` threads (the engines read weights on every core; a
    one-thread sum underestimates what two cores can read, which put engines above 100% of it)."""
    import torch

    a = np.ones(size_bytes // 4, dtype=np.float32)
    t = torch.from_numpy(a)
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    best = float("inf")
    try:
        for fn in (a.sum, t.sum):
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    return a.nbytes / best / 1e9


# -- the model ------------------------------------------------------------------------------------
def build_model(shape: dict[str, int], name: str) -> Path:
    """A random Llama of ``shape`` as a Hugging Face folder (bf16 safetensors + a tokenizer), built once."""
    folder = CACHE / name
    if (folder / "config.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    print(f"building {name} (random weights) in {folder} ...", flush=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    # a word-level tokenizer over the vocabulary: "<unk>", "<s>", "</s>", then "t3", "t4", ...
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, shape["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


def weight_counts(shape: dict[str, int]) -> tuple[int, int]:
    """(weights of the decoder layers, weights of the LM head): what one decode step reads."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return layers * per_layer, h * shape["vocab_size"]


def bytes_per_token(shape: dict[str, int], kind: str) -> float:
    body, head = weight_counts(shape)
    return body * BYTES_PER_WEIGHT[kind] + head * HEAD_BYTES.get(kind, BYTES_PER_WEIGHT[kind])


# -- engines --------------------------------------------------------------------------------------
class EngineRow:
    """One engine under test, timed by generating ``tokens`` greedy tokens after a fixed prompt."""

    def __init__(self, label: str, kind: str, engine: Any) -> None:
        self.label, self.kind, self.engine = label, kind, engine
        self.rates: list[float] = []

    def decode_rate(self, prompt: list[int], tokens: int) -> float:
        from modelpress.generation import SamplingParams

        r = self.engine.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0, stop_token_ids=()))
        decode_s = r.seconds - (r.seconds_to_first_token or 0.0)
        return (r.completion_tokens - 1) / decode_s

    def close(self) -> None:
        self.engine.stop(drain=False)


class RawLlamaCpp:
    """The peer: llama-cpp-python's own ``Llama.generate`` loop (its sampler, one sequence) over the
    same GGUF file as our llamacpp engine, driven with token ids."""

    name = "llama-cpp-python"

    def __init__(self, gguf_path: Path, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(gguf_path), n_ctx=512, n_threads=threads, n_batch=64, verbose=False)

    def generate(self, prompt: list[int], params: Any) -> Any:
        from modelpress.generation import GenerationResult

        self.llm.reset()
        t0 = time.perf_counter()
        first = None
        out: list[int] = []
        for tok in self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            out.append(int(tok))
            if first is None:
                first = time.perf_counter() - t0
            if len(out) >= params.max_tokens:
                break
        return GenerationResult(out, "", "length", len(prompt), len(out), first, time.perf_counter() - t0)

    def stop(self, drain: bool = False) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None


def llamacpp_ggufs(folder: Path, kinds: list[str]) -> tuple[dict[str, Path], str | None]:
    """The model as GGUF files of ``kinds`` (converted once by :mod:`modelpress.generation.gguf_convert`
    into ``CACHE/gguf``: the file our llamacpp engine and the raw peer both run), or why not."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        wheels = sorted((CACHE.parent / "wheels").glob("llama_cpp_python-*.whl"))
        hint = f"pip install {wheels[-1]} gguf" if wheels else "pip install 'modelpress[llamacpp]'"
        return {}, f"llama.cpp skipped: {exc.name} is not importable here ({hint})"
    from modelpress.generation.gguf_convert import cached_gguf

    out = {}
    for kind in kinds:
        t0 = time.perf_counter()
        out[kind] = cached_gguf(folder, kind.lower(), CACHE / "gguf")
        if time.perf_counter() - t0 > 5:
            print(f"converted to GGUF {kind} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out, None


# -- measurements ---------------------------------------------------------------------------------
def decode_table(rows: list[EngineRow], shape: dict[str, int], bw: float, tokens: int, rounds: int) -> None:
    prompt = [1, *range(3, 3 + PROMPT_TOKENS - 1)]
    for row in rows:  # warm-up: first calls allocate, compile kernels
        row.decode_rate(prompt, 4)
    with load_section("decode at batch 1"):
        for r in range(rounds):
            for row in rows:
                row.rates.append(row.decode_rate(prompt, tokens))
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{row.label} {row.rates[-1]:.1f}" for row in rows), flush=True)
    print(f"\n{'engine':<26} {'tok/s':>8} {'GB/token':>9} {'roofline tok/s':>15} {'of roofline':>12}")
    for row in rows:
        rate = statistics.median(row.rates)
        gb = bytes_per_token(shape, row.kind) / 1e9
        print(f"{row.label:<26} {rate:8.1f} {gb:9.3f} {bw / gb:15.1f} {rate * gb / bw:11.0%}")


def batching(engine: Any, tokens: int, rounds: int) -> None:
    """8 streams at once against the same 8 requests one after another, in ``rounds`` interleaved
    rounds (sequential, then concurrent, per round); the ratio of each round and their median."""
    from modelpress.generation import SamplingParams

    prompts = [[1, *range(3 + 17 * i, 3 + 17 * i + PROMPT_TOKENS - 1)] for i in range(STREAMS)]
    params = SamplingParams(max_tokens=tokens, temperature=0, stop_token_ids=())
    engine.generate(prompts[0], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    seq_rates, conc_rates, ttft = [], [], []
    with load_section("continuous batching"):
        for _ in range(rounds):
            t0 = time.perf_counter()
            for p in prompts:
                engine.generate(p, params)
            seq_rates.append(STREAMS * tokens / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            handles = [engine.submit(p, params) for p in prompts]
            results = [h.result() for h in handles]
            conc_rates.append(STREAMS * tokens / (time.perf_counter() - t0))
            ttft.extend(r.seconds_to_first_token or 0.0 for r in results)
    ratios = [c / s for c, s in zip(conc_rates, seq_rates, strict=True)]
    ratio = statistics.median(ratios)
    shared = max((len(s) for s in engine.stats().step_log), default=0)
    print(f"\n{STREAMS} streams x {tokens} tokens on {engine.name} ({getattr(engine, 'quantize', '')}), {rounds} interleaved rounds:")
    print(f"  one after another  {statistics.median(seq_rates):8.1f} tok/s  (rounds: {', '.join(f'{r:.1f}' for r in seq_rates)})")
    print(f"  concurrent         {statistics.median(conc_rates):8.1f} tok/s  (rounds: {', '.join(f'{r:.1f}' for r in conc_rates)})")
    print(
        f"  ratio (median)     {ratio:8.2f}x  (rounds: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"target >= {BATCH_TARGET:g}x: {'met' if ratio >= BATCH_TARGET else 'NOT met'}); up to {shared} sequences per decode step"
    )
    print(f"  time to first token under that load: p50 {np.percentile(ttft, 50) * 1e3:.0f} ms, p99 {np.percentile(ttft, 99) * 1e3:.0f} ms")


def served_rate(port: int, tokens: int) -> float:
    """Tokens/s of one streamed completion of ``tokens`` tokens (``ignore_eos``), end to end: from
    sending the request to ``data: [DONE]`` (chunk arrival times are not used: the network may
    deliver several together)."""
    import httpx

    prompt = " ".join(f"t{i}" for i in range(3, 3 + PROMPT_TOKENS - 1))
    body = {"model": "llm", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                break
    return tokens / (time.perf_counter() - t0)


def inprocess_rate(engine: Any, prompt: list[int], tokens: int) -> float:
    """Tokens/s of one request in this process, end to end (submit to finish), as :func:`served_rate`."""
    from modelpress.generation import SamplingParams

    t0 = time.perf_counter()
    engine.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0, stop_token_ids=()))
    return tokens / (time.perf_counter() - t0)


def served(folder: Path, row: EngineRow, tokens: int, rounds: int) -> None:
    """``modelpress serve`` with the same engine as ``row`` against ``row`` in this process, interleaved."""
    import httpx

    with Procs() as procs:
        port = free_port()
        cfg = CACHE / "serve-llm.json"
        engine = row.engine.name
        options: dict[str, Any] = {"quantize": row.kind.lower()}
        if engine == "llamacpp":
            options["cache_dir"] = str(CACHE / "gguf")  # the GGUF the in-process engine runs
        model = {"source": str(folder), "name": "llm", "engine": engine, "threads": THREADS, "runtime_options": options}
        cfg.write_text(json.dumps({"models": [model], "access_log": False, "log_level": "warning"}))
        serve = "from modelpress.cli import main; main()"  # the `modelpress` command of this environment
        proc = procs.popen([sys.executable, "-c", serve, "serve", "--config", str(cfg), "--port", str(port), "--log-level", "warning"])
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            print(f"served check skipped: the server did not become ready (exit code {proc.poll()})")
            return
        prompt = [1, *range(3, 3 + PROMPT_TOKENS - 1)]
        served_rate(port, 4)  # warm-up
        inproc, remote = [], []
        with load_section("served batch-1 decode"):
            for _ in range(rounds):
                inproc.append(inprocess_rate(row.engine, prompt, tokens))
                remote.append(served_rate(port, tokens))
        a, b = statistics.median(inproc), statistics.median(remote)
        print(
            f"\nserved batch-1 generation ({row.label}, {tokens} tokens end to end): in process {a:.1f} tok/s, "
            f"served (streamed /v1/completions) {b:.1f} tok/s = {b / a:.0%} (target >= 95%)"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny model: a smoke run of the script")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per timed request (default 64, --quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 1)")
    ap.add_argument("--only", default="", help="comma-separated labels to time (e.g. openvino-int8,openvino-int4)")
    ap.add_argument("--no-serve", action="store_true", help="skip the served batch-1 decode check")
    args = ap.parse_args()
    shape = QUICK if args.quick else FULL
    tokens = args.tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"CPU flags: {' '.join(cpu_flags()) or 'none of ' + ', '.join(CPU_FLAGS)}; {os.cpu_count()} CPUs, {THREADS} threads")
    print(f"1-min load average {load1():.2f}", flush=True)
    bw = read_bandwidth_gbs((64 if args.quick else 1024) << 20)
    print(f"memory read bandwidth (best of a numpy and a {THREADS}-thread torch sum): {bw:.1f} GB/s", flush=True)
    folder = build_model(shape, "llama-quick" if args.quick else "tinyllama-1.1b-random")
    body, head = weight_counts(shape)
    print(f"model: {folder} ({(body + head) / 1e9:.2f}B weights read per token)")

    from modelpress.generation import create_engine

    wanted = set(filter(None, args.only.split(",")))
    specs = [
        ("torch-fp32", "fp32", lambda: create_engine(folder, "torch", dtype="float32", threads=THREADS)),
        ("torch-bf16", "bf16", lambda: create_engine(folder, "torch", dtype="bfloat16", threads=THREADS)),
        ("openvino-int8", "int8", lambda: create_engine(folder, "openvino", quantize="int8", threads=THREADS)),
        ("openvino-int4", "int4", lambda: create_engine(folder, "openvino", quantize="int4", threads=THREADS)),
    ]
    rows = []
    for label, kind, make in specs:
        if wanted and label not in wanted:
            continue
        t0 = time.perf_counter()
        eng = make()
        eng.start()
        print(f"loaded {label} in {time.perf_counter() - t0:.1f} s", flush=True)
        rows.append(EngineRow(label, kind, eng))
    kinds = [k for k in ("Q8_0", "Q4_0") if not wanted or {f"llamacpp-{k}", f"ours-llamacpp-{k}"} & wanted]
    ggufs, why = llamacpp_ggufs(folder, kinds)
    if why:
        print(why)
    for kind, path in ggufs.items():
        # ours: our engine (our step loop, continuous batching, our sampler) over llama.cpp; the peer:
        # llama-cpp-python's own generate loop; the same GGUF file, timed interleaved
        if not wanted or f"ours-llamacpp-{kind}" in wanted:
            t0 = time.perf_counter()
            eng = create_engine(folder, "llamacpp", quantize=kind.lower(), gguf_path=path, threads=THREADS)
            eng.start()
            print(f"loaded ours-llamacpp-{kind} in {time.perf_counter() - t0:.1f} s", flush=True)
            rows.append(EngineRow(f"ours-llamacpp-{kind}", kind, eng))
        if not wanted or f"llamacpp-{kind}" in wanted:
            rows.append(EngineRow(f"llamacpp-{kind}", kind, RawLlamaCpp(path, THREADS)))
    try:
        decode_table(rows, shape, bw, tokens, rounds)
        # continuous batching on each fast engine (int8 too: at batch 8 the int8 kernels' compute matters, not only the bytes read)
        for label in ("ours-llamacpp-Q4_0", "openvino-int4", "ours-llamacpp-Q8_0", "openvino-int8"):
            fast = next((r.engine for r in rows if r.label == label), None)
            if fast is not None:
                batching(fast, tokens, rounds)
        # served batch-1 decode on the fastest int8 engine there is
        int8 = next((r for label in ("ours-llamacpp-Q8_0", "openvino-int8") for r in rows if r.label == label), None)
        if int8 is not None and not args.no_serve:
            served(folder, int8, tokens, rounds)
    finally:
        for row in rows:
            row.close()
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
