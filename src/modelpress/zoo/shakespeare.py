"""``shakespeare-lm``: a small character-level Llama the project trains itself on tiny-shakespeare.

A real language model whose training we control, to measure what pruning and quantization do
to perplexity on text it has never seen. It is trained once on ``tinyshakespeare-train`` (the
first 90% of ``../shared/data/tinyshakespeare/input.txt``) and cached as a normal Hugging Face
folder (``LlamaForCausalLM`` in safetensors plus its tokenizer), so ``modelpress.load`` reads it
like any other model; its perplexity is measured on ``tinyshakespeare-test`` (the last 10%).

The tokenizer is character level, built with the ``tokenizers`` library: one token per
character of the training text, plus ``<pad>``, ``<s>`` (BOS), ``</s>`` and ``<unk>``.

Training is bounded by ``max_steps`` and by a compute budget in CPU seconds of this process
(``cpu_budget_s``, default 600: five minutes of two cores), with a wall-clock cap as a safety
net. CPU time, not wall time, because the machine is shared: on a busy machine a wall-clock
budget would buy a fraction of the training. It runs on one thread by default: measured here
with the machine loaded, a second OpenMP thread spin-waits and costs 8x the CPU time per step
(3.9 s against 0.46 s) for no gain. The learning-rate schedule (warm-up, then cosine decay)
advances with whichever bound is further along, so every run ends with a fully decayed learning
rate instead of being cut off at its peak. ``scripts/train_shakespeare.py`` makes the cached model;
the short name ``shakespeare-lm`` finds it (:func:`get_model_path`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ConfigError, ModelNotFoundError
from modelpress.progress import ProgressFactory, no_progress

MODEL_NAME = "shakespeare-lm"
FORMAT_VERSION = 1  # bump when the recipe below changes meaning, so an old cache is not reused
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
TRAIN_DATASET = "tinyshakespeare-train"
TEST_DATASET = "tinyshakespeare-test"
TRAINING_FILE = "training.json"
HELDOUT_TOKENS = 16_384  # held-out characters scored at the end of training (a quick check, not the metric)


@dataclass(frozen=True)
class ShakespeareConfig:
    """The model's shape and how it is trained (the defaults make the cached ``shakespeare-lm``)."""

    hidden_size: int = 192
    layers: int = 5
    heads: int = 6
    intermediate_size: int = 512
    context: int = 128  # training windows, and the model's maximum positions
    batch_size: int = 16
    max_steps: int = 4000
    cpu_budget_s: float = 600.0  # CPU seconds of this process spent in the training loop
    max_wall_s: float = 3 * 3600.0  # a safety net on a very busy machine
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.04  # fraction of the run spent warming up
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} must divide by heads {self.heads}.", hint="Example: hidden_size=192, heads=6"
            )
        for name in ("hidden_size", "layers", "heads", "intermediate_size", "context", "batch_size", "max_steps", "threads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(
                    f"{name} must be a positive integer, got {getattr(self, name)!r}.",
                    hint=f"Example: {name}={getattr(ShakespeareConfig, name)}",
                )
        if self.cpu_budget_s <= 0 or self.max_wall_s <= 0 or self.lr <= 0:
            raise ConfigError(
                "cpu_budget_s, max_wall_s and lr must be positive.", hint="Example: ShakespeareConfig(cpu_budget_s=600, lr=2e-3)"
            )
        if not 0.0 <= self.warmup < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("warmup must be in [0, 1) and min_lr_ratio in [0, 1].", hint="Example: warmup=0.04, min_lr_ratio=0.1")

    def recipe(self) -> dict[str, Any]:
        """The settings that change what is trained (threads and the wall-clock safety net do not)."""
        return {k: v for k, v in asdict(self).items() if k not in ("threads", "max_wall_s")}

    def key(self) -> str:
        """A short id of the recipe and the format version (names the cache folder of a non-default recipe)."""
        return hashlib.sha256(json.dumps([FORMAT_VERSION, self.recipe()], sort_keys=True).encode()).hexdigest()[:10]


# -- tokenizer ------------------------------------------------------------------------------
def build_tokenizer(text: str) -> Any:
    """A character-level ``PreTrainedTokenizerFast``: one id per distinct character of ``text``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(set(text))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character its own piece; Oniguruma's (?m) lets '.' match newlines too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def encode_chars(text: str, tokenizer: Any) -> np.ndarray:
    """``text`` as token ids (the tokenizer's own vocabulary, looked up directly: fast on a 1 MB text)."""
    vocab = tokenizer.get_vocab()
    unk = vocab["<unk>"]
    table = {c: vocab.get(c, unk) for c in set(text)}
    return np.fromiter((table[c] for c in text), dtype=np.int64, count=len(text))


def model_config(cfg: ShakespeareConfig, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        architectures=["LlamaForCausalLM"],
    )


def lr_at(progress: float, cfg: ShakespeareConfig) -> float:
    """Warm-up, then cosine decay to ``min_lr_ratio * lr``; ``progress`` runs from 0 to 1."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.warmup > 0 and p < cfg.warmup:
        return cfg.lr * p / cfg.warmup
    t = (p - cfg.warmup) / (1.0 - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))


# -- training -------------------------------------------------------------------------------
def train(
    output: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    config: ShakespeareConfig | None = None,
    progress: ProgressFactory = no_progress,
    overwrite: bool = False,
    evaluate: bool = True,
) -> Any:
    """Train the model on ``tinyshakespeare-train`` and write it to ``output``; returns the artifact.

    The folder is an HF folder with a manifest (:func:`write_model`), written beside ``output``
    and renamed when complete. ``training.json`` in it records the settings, the steps and tokens
    seen, the time taken, and a quick held-out loss.
    """
    import torch

    from modelpress.datasets import load_dataset

    cfg = config or ShakespeareConfig()
    target = Path(output)
    if target.exists() and not overwrite:
        raise ConfigError(f"'{target}' already exists.", hint="Choose another folder, or pass overwrite=True to train again.")
    target = target.resolve()
    train_text = load_dataset(TRAIN_DATASET, data_dir_=data_dir).documents[0]
    test_text = load_dataset(TEST_DATASET, data_dir_=data_dir).documents[0]
    tokenizer = build_tokenizer(train_text)
    ids = torch.from_numpy(encode_chars(train_text, tokenizer))

    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    model = LlamaForCausalLM(model_config(cfg, tokenizer)).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    advance = progress(
        f"training {MODEL_NAME} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, at most {cfg.cpu_budget_s:.0f} CPU s)",
        cfg.max_steps,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    step, loss_ema, stopped_by = 0, None, "max_steps"
    try:
        while step < cfg.max_steps:
            done = max(step / cfg.max_steps, (time.process_time() - c0) / cfg.cpu_budget_s)
            if done >= 1.0:
                stopped_by = "max_steps" if step >= cfg.max_steps else "cpu_budget"
                break
            if time.perf_counter() - t0 > cfg.max_wall_s:
                stopped_by = "max_wall_s"
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(done, cfg)
            starts = torch.randint(0, len(ids) - cfg.context - 1, (cfg.batch_size,), generator=gen)
            window = torch.stack([ids[s : s + cfg.context + 1] for s in starts.tolist()])
            logits = model(input_ids=window[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = float(loss.detach())
            loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
            step += 1
            advance(1)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        model.eval()
        heldout = _heldout_loss(model, torch.from_numpy(encode_chars(test_text[:HELDOUT_TOKENS], tokenizer)), cfg.context)
    finally:
        torch.set_num_threads(previous_threads)

    report = {
        "model": MODEL_NAME,
        "format_version": FORMAT_VERSION,
        "config": cfg.recipe(),
        "key": cfg.key(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "tokens_seen": step * cfg.batch_size * cfg.context,
        "stopped_by": stopped_by,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "train_loss_ema": loss_ema,
        "heldout_loss": heldout,
        "heldout_tokens": min(HELDOUT_TOKENS, len(test_text)),
        "train_dataset": TRAIN_DATASET,
        "test_dataset": TEST_DATASET,
    }
    return write_model(target, model, tokenizer, cfg, report, data_dir=data_dir, evaluate=evaluate, progress=progress, overwrite=overwrite)


def write_model(
    target: str | os.PathLike,
    model: Any,
    tokenizer: Any,
    cfg: ShakespeareConfig,
    report: dict[str, Any],
    *,
    data_dir: str | os.PathLike | None = None,
    evaluate: bool = True,
    progress: ProgressFactory = no_progress,
    overwrite: bool = False,
) -> Any:
    """Write a trained model as a zoo artifact: an HF folder (safetensors, tokenizer) with its manifest.

    The manifest's step holds the recipe (what :func:`cached` compares) and the metrics hold the
    training report and, with ``evaluate``, the perplexity on ``tinyshakespeare-test`` measured on
    the files as saved.
    """
    from modelpress.artifacts import Artifact, Manifest
    from modelpress.tasks import get_task_class

    cls = get_task_class("causal-lm")
    task_config = cls.config_from_hf(Path(target), model.config)
    manifest = Manifest(
        name=MODEL_NAME,
        task="causal-lm",
        format="hf",
        signature=cls(task_config, None).signature(model.config),
        task_config=task_config,
        step={
            "zoo": MODEL_NAME,
            "recipe_version": FORMAT_VERSION,
            "recipe": cfg.recipe(),
            "train_seconds": report["seconds"],
            "train_cpu_seconds": report["cpu_seconds"],
            "steps": report["steps"],
        },
    )

    def fill(tmp: Path) -> dict[str, Any]:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / TRAINING_FILE).write_text(json.dumps(report, indent=2))
        metrics: dict[str, Any] = {"training": report}
        if evaluate:
            metrics.update(evaluate_artifact(Artifact(manifest.model_copy(deep=True), tmp), data_dir=data_dir, progress=progress))
        return {"metrics": metrics}

    return Artifact.write(target, manifest, fill, overwrite=overwrite)


def evaluate_artifact(
    art: Any, *, data_dir: str | os.PathLike | None = None, progress: ProgressFactory = no_progress, threads: int = 1
) -> dict[str, Any]:
    """Perplexity on ``tinyshakespeare-test`` (the held-out last 10%) through the PyTorch runner."""
    from modelpress.datasets import load_dataset
    from modelpress.runtimes import create_runner
    from modelpress.tasks import task_for

    ds = load_dataset(TEST_DATASET, data_dir_=data_dir)
    task = task_for(art)
    runner = create_runner(art, "torch", threads=threads)
    scores = task.evaluate(runner, ds, progress=progress(f"evaluating {MODEL_NAME} on {TEST_DATASET}", task.eval_size(ds)))
    return {
        "perplexity": {"value": scores["perplexity"], "dataset": ds.name, "runtime": "torch", "kind": "quality", "tokens": scores["tokens"]}
    }


def _heldout_loss(model: Any, ids: Any, context: int) -> float | None:
    """Mean next-character loss on non-overlapping windows of held-out text."""
    import torch

    n = (len(ids) - 1) // context
    if n < 1:
        return None
    x = ids[: n * context + 1]
    inputs = x[:-1].reshape(n, context)
    targets = x[1:].reshape(n, context)
    with torch.inference_mode():
        logits = model(input_ids=inputs).logits
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))


# -- the cached model -----------------------------------------------------------------------
def default_recipe() -> dict[str, Any]:
    """The recipe the cached ``shakespeare-lm`` is made with (as ``modelpress.zoo`` builders expose it)."""
    return ShakespeareConfig().recipe()


def cached_path(config: ShakespeareConfig | None = None) -> Path:
    """Where the model trained with ``config`` is cached: ``zoo/shakespeare-lm`` for the default recipe."""
    from modelpress.locations import cache_dir

    cfg = config or ShakespeareConfig()
    return cache_dir("zoo") / (MODEL_NAME if cfg.recipe() == default_recipe() else f"{MODEL_NAME}-{cfg.key()}")


def cached(config: ShakespeareConfig | None = None) -> Any | None:
    """The cached artifact made with ``config``'s recipe, intact; else None."""
    from modelpress.artifacts import Artifact
    from modelpress.errors import ArtifactError

    cfg = config or ShakespeareConfig()
    path = cached_path(cfg)
    if not path.is_dir():
        return None
    try:
        art = Artifact.open(path)
    except ArtifactError:
        return None
    step = art.manifest.step or {}
    if step.get("zoo") != MODEL_NAME or step.get("recipe_version") != FORMAT_VERSION or step.get("recipe") != cfg.recipe() or art.verify():
        return None
    return art


def is_cached(config: ShakespeareConfig | None = None) -> bool:
    return cached(config) is not None


def ensure_trained(
    *,
    data_dir: str | os.PathLike | None = None,
    config: ShakespeareConfig | None = None,
    progress: ProgressFactory = no_progress,
    retrain: bool = False,
    evaluate: bool = True,
) -> Path:
    """The cached model's folder, training it first (once) when it is not cached yet."""
    if not retrain and (art := cached(config)) is not None:
        return Path(art.path)
    return Path(train(cached_path(config), data_dir=data_dir, config=config, progress=progress, overwrite=True, evaluate=evaluate).path)


def build_shakespeare(
    target: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    progress: ProgressFactory = no_progress,
    overwrite: bool = False,
) -> Any:
    """Train with the default recipe into ``target`` (the builder signature ``modelpress.zoo`` uses)."""
    return train(target, data_dir=data_dir, progress=progress, overwrite=overwrite)


def get_model_path() -> Path:
    """The cached ``shakespeare-lm`` folder (what the short name resolves to)."""
    art = cached()
    if art is None:
        raise ModelNotFoundError(
            f"The model '{MODEL_NAME}' has not been trained on this machine yet (looked in {cached_path()}).",
            hint="Train it once (600 CPU seconds: about 10 minutes on one idle core): python scripts/train_shakespeare.py",
        )
    return Path(art.path)


def training_report(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """What ``training.json`` of a trained folder (default: the cached model) says."""
    folder = Path(path) if path is not None else get_model_path()
    file = folder / TRAINING_FILE
    if not file.is_file():
        raise ModelNotFoundError(f"'{folder}' holds no {TRAINING_FILE}, so it was not made by modelpress.zoo.shakespeare.")
    return json.loads(file.read_text())
