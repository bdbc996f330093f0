"""minilm-sst2: all-MiniLM-L6-v2 fine-tuned as a BertForSequenceClassification on SST-2.

The recipe (:class:`Sst2TrainConfig`) fits a budget of about 6 minutes (measured: 362 CPU-s on
one thread, loading and scoring included; 0.883 dev accuracy): one epoch over a seeded random
subset of 24,000 SST-2 train phrases, texts cut to 64 tokens, batches of similar
length (little padding), AdamW with linear warm-up and decay, word embeddings frozen (they
hold half the weights; freezing them saves their gradient and optimizer update). Scored on
sst2-dev (872 sentences). The folder is a plain Hugging Face folder (safetensors, tokenizer,
``id2label`` negative/positive) with a ``modelpress.json`` manifest beside it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modelpress.artifacts import Artifact, Manifest
from modelpress.progress import ProgressFactory, no_progress
from modelpress.zoo import training_threads

NAME = "minilm-sst2"
TASK = "text-classification"
EVAL_DATASET = "sst2-dev"
LABELS = ["negative", "positive"]  # SST-2's label 0 and 1
BUCKET_BATCHES = 32  # batches sorted by length together: less padding, still well shuffled


class Sst2TrainConfig(BaseModel):
    """How minilm-sst2 is fine-tuned. ``train_size`` and ``max_steps`` are the budget. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    train_size: int | None = Field(24_000, ge=1)  # a seeded random subset of the 67,349 phrases (None: all)
    max_steps: int | None = Field(None, ge=1)  # stop (and end the schedule) after this many steps
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_length: int = Field(64, ge=8)
    freeze_embeddings: bool = True  # word embeddings only; positions, token types and their LayerNorm train
    eval_limit: int | None = Field(None, ge=1)  # score on the first N dev sentences only (tests)
    seed: int = 0
    threads: int | None = Field(None, ge=1)  # torch threads (default: zoo.training_threads); not part of the recipe


def recipe_of(config: Sst2TrainConfig) -> dict[str, Any]:
    """The recipe as stored in the manifest (threads left out: they change the speed, not the model)."""
    return config.model_copy(update={"threads": None}).model_dump(mode="json")


def default_recipe() -> dict[str, Any]:
    return recipe_of(Sst2TrainConfig())


def base_model_path() -> Path:
    from modelpress.sources import short_name_path

    path = short_name_path("minilm")
    if path is None:  # pragma: no cover - "minilm" is always a short name
        raise RuntimeError("the short name 'minilm' is not registered")
    return path


def _batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches: shuffled, then sorted by length within buckets of ``BUCKET_BATCHES`` batches."""
    order = rng.permutation(len(lengths))
    bucket = batch_size * BUCKET_BATCHES
    out: list[np.ndarray] = []
    for start in range(0, len(order), bucket):
        chunk = order[start : start + bucket]
        chunk = chunk[np.argsort([lengths[i] for i in chunk], kind="stable")]
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def train_sst2(
    config: Sst2TrainConfig | None = None, *, data_dir: str | os.PathLike | None = None, progress: ProgressFactory = no_progress
) -> tuple[Any, Any, dict[str, Any]]:
    """Fine-tune MiniLM on SST-2 train; returns (model in eval mode, tokenizer, what training did)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    from modelpress.datasets import load_dataset

    cfg = config or Sst2TrainConfig()
    train = load_dataset("sst2-train", data_dir_=data_dir)
    rng = np.random.default_rng(cfg.seed)
    chosen = rng.permutation(len(train))[: cfg.train_size] if cfg.train_size else rng.permutation(len(train))
    base = base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=False)
    enc = tokenizer([train.texts[i] for i in chosen], truncation=True, max_length=cfg.max_length)
    ids = enc["input_ids"]
    labels = np.asarray([train.labels[i] for i in chosen], dtype=np.int64)

    threads = torch.get_num_threads()
    used = training_threads(cfg.threads)
    torch.set_num_threads(used)
    verbosity = hf_logging.get_verbosity()
    try:
        torch.manual_seed(cfg.seed)
        hf_logging.set_verbosity_error()  # the classifier head is new by design: no "newly initialized" report
        hf_logging.disable_progress_bar()
        model = BertForSequenceClassification.from_pretrained(
            str(base), num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}, use_safetensors=True
        )
        if cfg.freeze_embeddings:
            model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        plan = [b for _ in range(cfg.epochs) for b in _batches([len(x) for x in ids], cfg.batch_size, rng)]
        plan = plan[: cfg.max_steps] if cfg.max_steps else plan
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]  # biases and LayerNorm
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        sched = get_linear_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * len(plan)), len(plan))
        pad = tokenizer.pad_token_id
        advance = progress(f"fine-tuning {NAME} ({len(plan)} steps of {cfg.batch_size})", len(plan))
        model.train()
        t0 = time.perf_counter()
        losses: list[float] = []
        tokens = 0
        for batch in plan:
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask = (input_ids != pad).long()
            tokens += int(mask.sum())
            out = model(input_ids=input_ids, attention_mask=mask, labels=torch.from_numpy(labels[batch]))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(out.loss.item())
            advance(1)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
    model.eval()
    tail = losses[-50:] or [float("nan")]
    info = {
        "train_seconds": round(seconds, 2),
        "steps": len(plan),
        "train_examples": int(sum(len(b) for b in plan)),
        "train_tokens": tokens,
        "threads": used,
        "final_loss": round(float(np.mean(tail)), 4),  # mean of the last 50 steps
    }
    return model, tokenizer, info


def evaluate_folder(
    folder: Path, *, data_dir: str | os.PathLike | None = None, progress: ProgressFactory = no_progress, limit: int | None = None
) -> tuple[Artifact, dict[str, Any]]:
    """Load a saved SST-2 classifier folder as modelpress does and score it on sst2-dev (PyTorch runner)."""
    from modelpress.datasets import load_dataset
    from modelpress.runtimes import create_runner
    from modelpress.sources import load
    from modelpress.tasks import task_for

    art = load(folder, TASK, name=NAME)
    ds = load_dataset(EVAL_DATASET, data_dir_=data_dir, limit=limit)
    runner = create_runner(art, "torch")
    runner.load()
    scores = task_for(art).evaluate(runner, ds, progress=progress(f"evaluating {NAME} on {EVAL_DATASET}", len(ds)))
    art.manifest.signature = runner.signature
    metrics = {
        "accuracy": {"value": scores["accuracy"], "dataset": ds.name, "runtime": "torch", "kind": "quality"},
        "eval_examples": len(ds),
    }
    return art, metrics


def build_sst2(
    target: str | os.PathLike,
    *,
    config: Sst2TrainConfig | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: ProgressFactory = no_progress,
    overwrite: bool = False,
) -> Artifact:
    """Fine-tune minilm-sst2 and write it to ``target`` (a Hugging Face folder plus manifest), with its dev accuracy."""
    from modelpress.zoo import ZOO

    cfg = config or Sst2TrainConfig()
    model, tokenizer, info = train_sst2(cfg, data_dir=data_dir, progress=progress)
    step = {
        "zoo": NAME,
        "recipe_version": ZOO[NAME].recipe_version,
        "recipe": recipe_of(cfg),
        "base_model": "all-MiniLM-L6-v2",
        **info,
    }

    def fill(tmp: Path) -> dict[str, Any]:
        model.save_pretrained(str(tmp))  # safetensors
        tokenizer.save_pretrained(str(tmp))
        saved, metrics = evaluate_folder(tmp, data_dir=data_dir, progress=progress, limit=cfg.eval_limit)
        return {"metrics": metrics, "signature": saved.manifest.signature, "task_config": saved.manifest.task_config}

    manifest = Manifest(name=NAME, task=TASK, format="hf", step=step)
    return Artifact.write(Path(target), manifest, fill, overwrite=overwrite)
