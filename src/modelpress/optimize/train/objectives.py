"""What a student (a distilled or pruned model) is trained on, and the loss that teaches it.

One :class:`TrainingSpec` (the loop's :class:`~.training.TrainConfig` plus the data and the
loss) is shared by ``distill`` and by the recovery fine-tuning of ``structured-prune``. The
teacher is always the model the step started from; the losses per task:

* ``embedding``: the pooled sentence embedding of the student against the teacher's on
  unlabeled text (``loss``: ``cosine`` = 1 - cos; ``mse``; ``similarity`` = the MSE between the
  in-batch cosine-similarity matrices of student and teacher, plus 1 - cos), plus
  ``hidden_weight`` x the MSE between matched hidden states (student layer i against the teacher
  layer it was taken from);
* ``text-classification`` and ``image-classification``: ``alpha`` x soft-label KL at
  ``temperature`` (scaled by T^2, as Hinton et al.) + (1 - alpha) x cross-entropy on the labels;
* ``causal-lm``: ``alpha`` x logit KL per token at ``temperature`` + (1 - alpha) x the
  next-token cross-entropy.

Every evaluation uses the task's own metric on examples held out from the training data
(``validation_samples``): Spearman on held-out STS-B train pairs, accuracy on held-out labeled
examples, perplexity on held-out text; never the split the gate scores on. Batches are a pure
function of the step (a seeded, length-bucketed order per epoch), so a resumed run is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.datasets import ImageDataset, LabeledTextDataset, PairDataset, TextCorpus, load_dataset
from modelpress.errors import DatasetError, OptimizationError
from modelpress.optimize.configs.training import TrainingSpec, check_budget, short_label  # noqa: F401  (their home is configs)
from modelpress.progress import ProgressFactory, no_progress

# The data each task trains on by default: training splits, never the split it is scored on.
TRAIN_DEFAULTS: dict[str, list[str]] = {
    "embedding": ["stsb-train", "sst2-train"],
    "text-classification": ["sst2-train"],
    "image-classification": ["mnist-train5k"],
    "causal-lm": ["tinyshakespeare"],
}
# What a user's file is read as, per task: an embedding student learns from plain text (one per line).
FILE_KINDS: dict[str, type] = {
    "embedding": TextCorpus,
    "text-classification": LabeledTextDataset,
    "image-classification": ImageDataset,
    "causal-lm": TextCorpus,
}
# Scored splits: training on them would make the gate's figure meaningless.
EVAL_SPLITS = ("stsb-dev", "sst2-dev", "trec-test", "mnist-test", "wikitext2-test", "tinystories")
MIN_WORDS = 4  # shorter SST-2 phrases ("the movie") carry little for a sentence embedding
BUCKET_BATCHES = 50  # batches per length bucket: sorted by length inside, shuffled across


# -- data ----------------------------------------------------------------------------------
@dataclass
class TrainData:
    """Training examples and the held-out set the evaluations score."""

    texts: list[str] = field(default_factory=list)
    labels: np.ndarray | None = None  # text or image labels (model label ids)
    images: np.ndarray | None = None
    validation: Any = None  # a dataset of the task's kind, or texts (embedding without pairs)
    sources: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.texts)


def _corpus_lines(ds: TextCorpus) -> list[str]:
    return [ln.strip() for doc in ds.documents for ln in doc.split("\n") if len(ln.strip()) > 20 and not ln.strip().startswith("=")]


def _check_names(names: list[str]) -> None:
    bad = [n for n in names if n in EVAL_SPLITS]
    if bad:
        raise DatasetError(
            f"{', '.join(bad)} {'is a split' if len(bad) == 1 else 'are splits'} the gate scores on; "
            "training on it would make that score meaningless.",
            hint="Train on a training split, e.g. data: [stsb-train, sst2-train] (embedding), [sst2-train] (text-classification), "
            "[mnist-train5k] (image-classification), [tinyshakespeare] (causal-lm).",
        )


def _held_count(wanted: int, n: int) -> int:
    """Examples held out for evaluation: as asked, but never more than a fifth of the data."""
    return min(wanted, n // 5)


def load_train_data(task: Any, spec: TrainingSpec, data_dir: Path | None) -> TrainData:
    """The examples of ``spec.data`` for ``task``, with ``spec.validation_samples`` held out."""
    names = list(spec.data or TRAIN_DEFAULTS.get(task.name, []))
    if not names:
        raise DatasetError(f"No training data for task '{task.name}'.", hint="Pass data: [NAME or FILE].")
    _check_names(names)
    rng = np.random.default_rng(spec.seed)
    out = TrainData()
    loaded = [load_dataset(n, FILE_KINDS[task.name] if Path(n).exists() else None, data_dir_=data_dir) for n in names]
    if task.name == "embedding":
        return _embedding_data(loaded, spec, rng, out)
    if task.name == "causal-lm":
        for ds in loaded:
            texts = (
                ds.documents
                if isinstance(ds, TextCorpus)
                else ds.texts()
                if isinstance(ds, PairDataset)
                else list(getattr(ds, "texts", []))
            )
            out.texts.append("\n".join(texts))
            out.sources[ds.name] = len(texts)
        return out
    if task.name == "image-classification":
        images = [ds for ds in loaded if isinstance(ds, ImageDataset)]
        if len(images) != len(loaded):
            raise DatasetError("An image classifier trains on image datasets only.", hint="Example: data: [mnist-train5k]")
        x = np.concatenate([ds.images for ds in images])
        y = np.concatenate([np.asarray(ds.labels, dtype=np.int64) for ds in images])
        perm = rng.permutation(len(y))
        n_val = _held_count(spec.validation_samples, len(y))
        held, rest = perm[:n_val], perm[n_val:]
        rest = rest[: spec.samples] if spec.samples else rest
        out.images, out.labels = x[np.sort(rest)], y[np.sort(rest)]
        out.validation = (
            ImageDataset("held-out " + "+".join(names), x[np.sort(held)], y[np.sort(held)], images[0].label_names) if len(held) else None
        )
        out.sources = {ds.name: len(ds) for ds in images}
        return out
    # text-classification: labeled texts; unlabeled texts train on soft labels only (label -1)
    from modelpress.tasks.text_classification import map_labels

    texts, labels = [], []
    held: LabeledTextDataset | None = None
    for ds in loaded:
        if isinstance(ds, LabeledTextDataset):
            gold = map_labels(task.labels or [str(i) for i in range(len(ds.label_names))], ds)
            perm = rng.permutation(len(ds))
            if held is None and spec.validation_samples:
                n_val = _held_count(spec.validation_samples, len(ds))
                h = np.sort(perm[:n_val])
                held = LabeledTextDataset("held-out " + ds.name, [ds.texts[i] for i in h], [int(ds.labels[i]) for i in h], ds.label_names)
                perm = perm[n_val:]
            texts += [ds.texts[i] for i in perm]
            labels += [int(gold[i]) for i in perm]
        else:
            more = ds.texts() if isinstance(ds, PairDataset) else _corpus_lines(ds)
            texts += more
            labels += [-1] * len(more)
        out.sources[ds.name] = len(ds)
    keep = rng.permutation(len(texts))[: spec.samples] if spec.samples else np.arange(len(texts))
    out.texts = [texts[i] for i in keep]
    out.labels = np.asarray([labels[i] for i in keep], dtype=np.int64)
    out.validation = held
    return out


def _embedding_data(loaded: list[Any], spec: TrainingSpec, rng: np.random.Generator, out: TrainData) -> TrainData:
    held: PairDataset | None = None
    texts: list[str] = []
    for ds in loaded:
        if isinstance(ds, PairDataset):
            if held is None and spec.validation_samples:
                h = np.sort(rng.permutation(len(ds))[: _held_count(spec.validation_samples, len(ds))])
                held = PairDataset(
                    "held-out " + ds.name, [ds.sentences1[i] for i in h], [ds.sentences2[i] for i in h], [ds.scores[i] for i in h]
                )
            more = ds.texts()
        elif isinstance(ds, LabeledTextDataset):
            more = [t for t in ds.texts if len(t.split()) >= MIN_WORDS]
        elif isinstance(ds, TextCorpus):
            more = _corpus_lines(ds)
        else:
            raise DatasetError(
                f"'{ds.name}' holds images; a sentence-embedding student learns from text.", hint="Example: data: [stsb-train, sst2-train]"
            )
        texts += more
        out.sources[ds.name] = len(more)
    unique = list(dict.fromkeys(t for t in texts if t.strip()))
    if held is not None:
        banned = set(held.texts())
        unique = [t for t in unique if t not in banned]
    order = rng.permutation(len(unique))
    if held is None and spec.validation_samples:  # no scored pairs: hold out texts, score agreement with the teacher
        n_val = _held_count(spec.validation_samples, len(unique))
        out.validation = [unique[i] for i in order[:n_val]]
        order = order[n_val:]
    else:
        out.validation = held
    order = order[: spec.samples] if spec.samples else order
    out.texts = [unique[i] for i in order]
    return out


# -- batches by step -----------------------------------------------------------------------
class StepBatches:
    """Example indices for each step: a seeded, length-bucketed order per epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int] | None = None) -> None:
        if n == 0:
            raise DatasetError("The training data is empty.", hint="Check data: and samples:, e.g. data: [stsb-train].")
        self.n, self.bs, self.seed, self.lengths = n, batch_size, seed, lengths
        self.per_epoch = math.ceil(n / batch_size)
        self._epoch, self._order = -1, []

    def _build(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.n)
        if self.lengths is None:
            return [perm[i : i + self.bs] for i in range(0, self.n, self.bs)]
        batches = []
        span = self.bs * BUCKET_BATCHES
        for c in range(0, self.n, span):
            chunk = sorted(perm[c : c + span].tolist(), key=lambda i: self.lengths[i])
            batches += [np.asarray(chunk[j : j + self.bs]) for j in range(0, len(chunk), self.bs)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __call__(self, step: int) -> np.ndarray:
        epoch = step // self.per_epoch
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._build(epoch)
        return self._order[step % self.per_epoch]


# -- models ----------------------------------------------------------------------------------
def torch_pool(hidden: Any, mask: Any, mode: str) -> Any:
    """The embedding task's pooling (``tasks.embedding.pool``) on torch tensors, differentiable."""
    import torch

    m = mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(1).values
    if mode == "lasttoken":
        last = mask.sum(1).long() - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    raise OptimizationError(f"Unknown pooling '{mode}'.")


class ModuleRunner:
    """A runner over an in-memory module (task-wrapped), so the task's own metric code scores it."""

    def __init__(self, module: Any, input_names: list[str], output_names: list[str]) -> None:
        self.module, self.input_names, self.output_names = module, input_names, output_names

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(batch[n]) for n in self.input_names if n in batch]
        with torch.no_grad():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: t.float().numpy() for n, t in zip(self.output_names, out, strict=False)}


def hf_forward(task_name: str, model: Any, batch: dict[str, Any], *, hidden: bool = False) -> Any:
    """The raw outputs a loss needs: hidden states (embedding) or logits."""
    if task_name == "image-classification":
        if "pixel_values" in batch and not hasattr(model, "config"):
            return model(batch["pixel_values"])
        return model(pixel_values=batch["pixel_values"]).logits
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if task_name == "causal-lm":
        kwargs.pop("token_type_ids", None)
        return model(**kwargs, use_cache=False).logits
    if task_name == "embedding":
        return model(**kwargs, output_hidden_states=hidden)
    return model(**kwargs).logits


class Objective:
    """The loss for a step and the evaluation metric, for one student against one teacher."""

    def __init__(
        self, task: Any, teacher: Any, data: TrainData, spec: TrainingSpec, *, layer_map: list[int] | None = None, wrap: Any = None
    ) -> None:
        import torch

        self.task, self.teacher, self.data, self.spec = task, teacher, data, spec
        self.layer_map = layer_map
        self.wrap = wrap  # student module -> task-wrapped module (for the task's metric code)
        self.higher_is_better = task.name != "causal-lm"
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        if task.name != "causal-lm" and len(data) == 0:
            raise DatasetError("There is no training example left.", hint="Give more data (training.data) or fewer validation_samples.")
        self.tok = getattr(task, "tokenizer", None)
        self.max_length = (
            min(spec.max_length, int(getattr(task, "max_length", spec.max_length) or spec.max_length))
            if self.tok is not None
            else spec.max_length
        )
        if task.name == "causal-lm":
            self._chunks = self._chunk_corpus()
            self.order = StepBatches(len(self._chunks), spec.batch_size, spec.seed)
        elif task.name == "image-classification":
            self._x = torch.from_numpy(task.preprocess(data.images)["pixel_values"])
            self.order = StepBatches(len(data), spec.batch_size, spec.seed)
        else:
            lengths = [len(ids) for ids in self.tok(data.texts, truncation=True, max_length=self.max_length)["input_ids"]]
            self.order = StepBatches(len(data), spec.batch_size, spec.seed, lengths)

    # -- batches ---------------------------------------------------------------------------
    def _tokens(self, texts: list[str]) -> dict[str, Any]:
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _chunk_corpus(self) -> list[Any]:
        import torch

        n = self.max_length
        held_chunks = max(1, self.spec.validation_samples // 10) if self.spec.validation_samples else 0
        need = ((self.spec.samples or 10**9) + held_chunks) * n  # tokenize only what training can use
        ids: list[int] = []
        for text in self.data.texts:
            lines = text.split("\n")
            for i in range(0, len(lines), 500):
                ids += self.tok("\n".join(lines[i : i + 500]), add_special_tokens=False, verbose=False)["input_ids"]
                if len(ids) >= need:
                    break
            if len(ids) >= need:
                break
        chunks = [torch.tensor(ids[i : i + n]) for i in range(0, len(ids) - n + 1, n)]
        if not chunks:
            raise DatasetError(
                f"The training text has {len(ids)} tokens, fewer than one chunk of max_length {n}.",
                hint="Use more text or a smaller max_length.",
            )
        held = min(len(chunks) // 10, held_chunks)
        self._held = chunks[len(chunks) - held :] if held else []
        return chunks[: len(chunks) - held] if held else chunks

    def batch(self, step: int) -> dict[str, Any]:
        import torch

        idx = self.order(step)
        if self.task.name == "causal-lm":
            ids = torch.stack([self._chunks[i] for i in idx])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.task.name == "image-classification":
            return {"pixel_values": self._x[torch.from_numpy(idx)], "labels": torch.from_numpy(self.data.labels[idx])}
        out = self._tokens([self.data.texts[i] for i in idx])
        if self.data.labels is not None:
            out["labels"] = torch.from_numpy(self.data.labels[idx])
        return out

    # -- the loss --------------------------------------------------------------------------
    def loss(self, model: Any, step: int) -> Any:
        import torch
        import torch.nn.functional as F

        batch = self.batch(step)
        spec, name = self.spec, self.task.name
        if name == "embedding":
            hidden = spec.hidden_weight > 0 and self.layer_map is not None
            s = hf_forward(name, model, batch, hidden=hidden)
            with torch.no_grad():
                t = hf_forward(name, self.teacher, batch, hidden=hidden)
            mask = batch["attention_mask"]
            mode = self.task.config.get("pooling", "mean")
            se, te = torch_pool(s.last_hidden_state, mask, mode), torch_pool(t.last_hidden_state, mask, mode)
            if spec.loss == "cosine":
                loss = (1 - F.cosine_similarity(se, te, dim=-1)).mean()
            elif spec.loss == "mse":
                loss = F.mse_loss(se, te)
            else:  # the in-batch cosine-similarity matrix: what a similarity benchmark ranks
                sn, tn = F.normalize(se, dim=-1), F.normalize(te, dim=-1)
                loss = F.mse_loss(sn @ sn.T, tn @ tn.T) + (1 - (sn * tn).sum(-1)).mean()
            if hidden:
                m = mask.unsqueeze(-1).to(se.dtype)
                terms = [
                    (((s.hidden_states[i + 1] - t.hidden_states[j + 1]) ** 2) * m).sum() / (m.sum() * se.shape[-1])
                    for i, j in enumerate(self.layer_map)
                ]
                loss = loss + spec.hidden_weight * torch.stack(terms).mean()
            return loss
        labels = batch.pop("labels", None)
        s = hf_forward(name, model, batch)
        with torch.no_grad():
            t = hf_forward(name, self.teacher, batch)
        T = spec.temperature
        if name == "causal-lm":
            s, t = s[:, :-1].reshape(-1, s.shape[-1]), t[:, :-1].reshape(-1, t.shape[-1])
            labels = batch["input_ids"][:, 1:].reshape(-1)
        kd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T
        if labels is None or spec.alpha >= 1.0:
            return kd
        known = labels >= 0
        if not bool(known.any()):
            return kd
        ce = F.cross_entropy(s[known], labels[known])
        return spec.alpha * kd + (1 - spec.alpha) * ce

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, model: Any) -> float:
        """The task metric on the held-out examples (perplexity for causal-lm, lower is better)."""
        import torch

        name, val = self.task.name, self.data.validation
        if name == "causal-lm":
            nll, n = 0.0, 0
            for i in range(0, len(self._held), self.spec.batch_size):
                ids = torch.stack(self._held[i : i + self.spec.batch_size])
                logits = hf_forward(name, model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
                nll += float(
                    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
                )
                n += ids[:, 1:].numel()
            return math.exp(nll / max(n, 1))
        runner = self.runner(model)
        if name == "embedding" and isinstance(val, list):  # agreement with the teacher on held-out texts
            from modelpress.tasks.embedding import agreement_metrics

            teacher = self.runner(self.teacher)
            return agreement_metrics(self.task.embed(runner, val), self.task.embed(teacher, val))["mean_cosine"]
        return float(self.task.evaluate(runner, val)[self.task.primary_metric])

    def runner(self, model: Any) -> ModuleRunner:
        sig = self.task.signature()
        wrapped = self.wrap(model) if self.wrap is not None else model
        return ModuleRunner(wrapped, sig.input_names, sig.output_names)

    @property
    def validation_name(self) -> str | None:
        if self.task.name == "causal-lm":
            return f"held-out text ({len(self._held)} chunks of {self.max_length} tokens, perplexity)" if self._held else None
        val = self.data.validation
        if isinstance(val, list):
            return f"held-out texts ({len(val)}, mean cosine to the teacher)"
        return getattr(val, "name", None)

    @property
    def can_evaluate(self) -> bool:
        if self.task.name == "causal-lm":
            return bool(self._held)
        return self.data.validation is not None and len(self.data.validation) > 0

    def fit(self, model: Any, *, checkpoint_dir: Path, progress: ProgressFactory | None, description: str) -> Any:
        """Train ``model`` in place on this objective (held-out evaluation and early stopping where
        the data has a held-out part); checkpoints in ``checkpoint_dir``. The loop's ``TrainResult``."""
        from modelpress.optimize.train.loop import train

        return train(
            model,
            self.loss,
            self.spec,
            evaluate=self.evaluate if self.can_evaluate else None,
            higher_is_better=self.higher_is_better,
            checkpoint_dir=checkpoint_dir,
            progress=progress or no_progress,
            description=description,
        )
