"""Structured pruning: remove whole channels, FFN neurons and attention heads, so layers really shrink.

* CNNs (``channels``): Torch-Pruning's dependency graph removes output channels of every conv
  and hidden linear layer together with everything that depends on them (batch norms, the next
  layer's inputs, the flattened features of the classifier); the final classifier layer keeps
  its outputs. Importance: weight magnitude (L2 of each channel's group) or mean activation on
  calibration inputs.
* Transformers (``ffn``, ``heads``), encoders (BERT-like) and decoders (Llama-like): the same
  number of FFN neurons is removed in every layer, so ``intermediate_size`` stays one valid
  number in the config; decoders lose whole key/value groups (with their query heads), and the
  config carries the new ``num_attention_heads``, ``num_key_value_heads`` and an explicit
  ``head_dim``. Importance: ``activation`` (mean |activation| on calibration inputs times the
  norm of the output weights, the structured form of Wanda) or ``magnitude`` (weight norms).
  The slicing is done here, not with Torch-Pruning: the kept widths must be uniform across
  layers and written back into the Hugging Face config, which a dependency graph does not know.
  BERT-like attention heads cannot be removed: transformers 5 dropped ``pruned_heads`` and
  derives a BERT head's size from ``hidden_size / num_attention_heads``, so a config cannot say
  "6 heads of 32"; the step says so instead of saving a model that would not load.

The pruned model is saved through the normal paths (a Hugging Face folder with its new shapes;
a torch-format folder with ``model.safetensors`` and, for zoo architectures, the new channel
counts in the manifest's ``task_config["architecture"]``, from which ``modelpress.load`` rebuilds
it) and then, with ``finetune``, trained to recover (:mod:`.objectives`: cross-entropy plus distillation from the unpruned model, or the
unpruned model's embeddings). Fine-tuned weights are cached like distilled students.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact
from modelpress.errors import OptimizationError
from modelpress.optimize.configs.prune import RecoveryTraining, StructuredPrune, Target  # noqa: F401  (their home is configs)
from modelpress.optimize.handlers import (
    StepContext,
    apply_technique,
    calibration_batches,
    copy_model_files,
    register_handler,
    write_variant,
)

STRUCTURED_VERSION = 1  # part of the cache key
TORCH_WEIGHTS = "model.safetensors"  # the weights file of a format-"torch" folder (sources.TORCH_WEIGHTS)


def _keep_count(n: int, ratio: float, round_to: int | None) -> int:
    keep = n - round(n * ratio)
    if round_to:
        keep = round(keep / round_to) * round_to
    return max(round_to or 1, min(n, keep))


# -- CNNs with Torch-Pruning ---------------------------------------------------------------------
def prune_cnn(module: Any, example: Any, ratio: float, *, round_to: int | None = None) -> dict[str, Any]:
    """Prune ``ratio`` of the channels of ``module`` in place; returns widths before/after and the kept indices.

    Importance is Torch-Pruning's group magnitude (L2 over every weight a channel touches: its
    filter, its batch-norm scale, the next layer's input slice). Its activation importance
    skips the group feeding a classifier that keeps its outputs, so it is not used here.
    """
    import torch
    import torch_pruning as tp

    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise OptimizationError(
            "Channel pruning needs a CNN (Conv2d layers); this model has none.", hint="Use targets: [ffn] for transformers."
        )
    ignored = [linears[-1]] if linears else [convs[-1]]  # the classifier keeps every output
    names = {m: n for n, m in module.named_modules()}
    before = {names[m]: (m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features) for m in convs + linears}
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.BasePruner(module, example, importance=imp, pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
    pruned: dict[str, list[int]] = {}
    was_training = module.training
    module.eval()
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            target = dep.target.module
            if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels) and target in names:
                pruned.setdefault(names[target], []).extend(int(i) for i in idxs)
        group.prune()
    module.train(was_training)
    after = {names[m]: (m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features) for m in convs + linears}
    kept = {n: sorted(set(range(before[n])) - set(pruned.get(n, []))) for n in before}
    return {"widths_before": before, "widths_after": after, "kept": kept}


# -- transformers ------------------------------------------------------------------------------
def _ffn(layer: Any) -> tuple[list[Any], Any, list[tuple[Any, str]], tuple[Any, str]]:
    """(input projections, output projection, their (parent, attribute) slots) of a layer's FFN."""
    inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    if inter is not None and hasattr(inter, "dense") and out is not None and hasattr(out, "dense"):
        return [inter.dense], out.dense, [(inter, "dense")], (out, "dense")
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return [mlp.gate_proj, mlp.up_proj], mlp.down_proj, [(mlp, "gate_proj"), (mlp, "up_proj")], (mlp, "down_proj")
    raise OptimizationError(
        f"The FFN of a {type(layer).__name__} is not one modelpress knows how to prune.",
        hint="Supported: BERT-like encoders (intermediate.dense / output.dense) and Llama-like decoders (mlp.gate/up/down_proj).",
    )


def _attention(layer: Any) -> Any:
    attn = getattr(layer, "self_attn", None)
    if attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return attn
    if hasattr(getattr(layer, "attention", None), "self"):
        raise OptimizationError(
            "Attention heads of BERT-like encoders cannot be pruned into a loadable model with transformers 5: its BERT has no "
            "pruned_heads any more and sizes each head as hidden_size / num_attention_heads, "
            "so a config cannot describe fewer heads of the same size.",
            hint="Prune the FFN (targets: [ffn]) and drop whole layers with distill (layers: 3); "
            "heads can be pruned on Llama-like decoders.",
        )
    raise OptimizationError(
        f"The attention of a {type(layer).__name__} is not one modelpress knows how to prune.", hint="Use targets: [ffn]."
    )


def _slice_linear(lin: Any, idx: Any, dim: int) -> Any:
    """A new Linear keeping output rows (dim 0) or input columns (dim 1) ``idx``."""
    import torch

    w = lin.weight.detach().index_select(dim, idx).clone()
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach().index_select(0, idx))
    return new


def _activation_norms(model: Any, layers: Any, batches: list[dict[str, np.ndarray]], heads: bool) -> dict[tuple[int, str], Any]:
    """Mean |input| of each layer's FFN output projection (and o_proj), over real tokens."""
    import torch

    sums: dict[tuple[int, str], Any] = {}
    counts: dict[tuple[int, str], float] = {}
    mask_box: dict[str, Any] = {}

    def hook(key: tuple[int, str]):
        def fn(_mod: Any, args: tuple) -> None:
            x = args[0].detach().float()
            m = mask_box.get("mask")
            if m is not None and m.shape == x.shape[:2]:
                x = x * m.unsqueeze(-1)
                n = float(m.sum())
            else:
                n = float(x.shape[0] * x.shape[1])
            if key[1] == "heads":
                x = x.pow(2)  # summed per head below into a norm
            val = x.abs().sum(dim=(0, 1))
            sums[key] = sums.get(key, 0) + val
            counts[key] = counts.get(key, 0.0) + n

        return fn

    handles = []
    for i, layer in enumerate(layers):
        handles.append(_ffn(layer)[1].register_forward_pre_hook(hook((i, "ffn"))))
        if heads:
            handles.append(_attention(layer).o_proj.register_forward_pre_hook(hook((i, "heads"))))
    try:
        with torch.no_grad():
            for b in batches:
                t = {k: torch.from_numpy(v) for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                mask_box["mask"] = t.get("attention_mask").float() if "attention_mask" in t else None
                model(**t)
    finally:
        for h in handles:
            h.remove()
    return {k: sums[k] / max(counts[k], 1.0) for k in sums}


def prune_transformer(
    model: Any,
    targets: list[str],
    ratio: float,
    *,
    head_ratio: float | None = None,
    importance: str = "activation",
    batches: list[dict[str, np.ndarray]] | None = None,
    round_to: int | None = None,
) -> dict[str, Any]:
    """Prune the FFN neurons (and decoder heads) of a Hugging Face model in place and update its config."""
    import torch

    from modelpress.optimize.distill.distill import find_layers

    _, _, layers = find_layers(model)
    cfg = model.config
    heads = "heads" in targets
    if heads:
        for layer in layers:
            _attention(layer)  # fail before anything changes
    for layer in layers:
        _ffn(layer)
    acts = _activation_norms(model, layers, batches or [], heads) if importance == "activation" else {}
    if importance == "activation" and not batches:
        raise OptimizationError(
            "Activation importance needs calibration batches.", hint="Use importance: magnitude, or a calibration dataset."
        )
    report: dict[str, Any] = {"kept": {}}
    if "ffn" in targets:
        n = int(cfg.intermediate_size)
        keep = _keep_count(n, ratio, round_to)
        kept_all = []
        for i, layer in enumerate(layers):
            ins, out, in_slots, out_slot = _ffn(layer)
            out_norm = out.weight.detach().float().norm(dim=0)
            if importance == "activation":
                score = acts[(i, "ffn")] * out_norm
            else:
                score = out_norm * torch.stack([lin.weight.detach().float().norm(dim=1) for lin in ins]).prod(0)
            idx = torch.sort(torch.topk(score, keep).indices).values
            for (parent, attr), lin in zip(in_slots, ins, strict=True):
                setattr(parent, attr, _slice_linear(lin, idx, 0))
            setattr(out_slot[0], out_slot[1], _slice_linear(out, idx, 1))
            kept_all.append(idx.tolist())
        cfg.intermediate_size = keep
        report["ffn"] = {"before": n, "after": keep}
        report["kept"]["ffn"] = kept_all
    if heads:
        h, kv = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // h)
        rep = h // kv
        keep_kv = _keep_count(kv, head_ratio if head_ratio is not None else ratio, None)
        kept_all = []
        for i, layer in enumerate(layers):
            attn = _attention(layer)
            wo = attn.o_proj.weight.detach().float().reshape(-1, h, d)  # [hidden, head, d]
            per_head_out = wo.pow(2).sum(dim=(0, 2)).sqrt()
            if importance == "activation":
                per_head = acts[(i, "heads")].reshape(h, d).sum(-1).sqrt() * per_head_out
            else:
                q = attn.q_proj.weight.detach().float().reshape(h, d, -1).pow(2).sum(dim=(1, 2)).sqrt()
                per_head = q * per_head_out
            group = per_head.reshape(kv, rep).sum(-1)
            groups = torch.sort(torch.topk(group, keep_kv).indices).values
            q_heads = (groups[:, None] * rep + torch.arange(rep)[None, :]).reshape(-1)
            q_idx = (q_heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
            kv_idx = (groups[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
            attn.q_proj = _slice_linear(attn.q_proj, q_idx, 0)
            attn.k_proj = _slice_linear(attn.k_proj, kv_idx, 0)
            attn.v_proj = _slice_linear(attn.v_proj, kv_idx, 0)
            attn.o_proj = _slice_linear(attn.o_proj, q_idx, 1)
            kept_all.append(q_heads.tolist())
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = keep_kv * rep, keep_kv, d
        report["heads"] = {"before": h, "after": keep_kv * rep, "kv_before": kv, "kv_after": keep_kv, "head_dim": d}
        report["kept"]["heads"] = kept_all
    return report


# -- the handler -------------------------------------------------------------------------------
def _targets(config: StructuredPrune, source: Artifact) -> list[str]:
    if source.format == "torch":
        targets = config.targets or ["channels"]
        if targets != ["channels"]:
            raise OptimizationError(
                f"A torch-module model prunes channels; targets {targets} are for Hugging Face transformers.",
                hint="Use targets: [channels].",
            )
        return targets
    targets = config.targets or ["ffn"]
    if "channels" in targets:
        raise OptimizationError("targets: [channels] prunes CNNs; this is a transformer.", hint="Use targets: [ffn] or [ffn, heads].")
    return targets


def _weights_bytes(module: Any) -> int:
    return int(sum(p.numel() * p.element_size() for p in module.state_dict().values()))


def prune_artifact(
    source: Artifact, config: StructuredPrune, ctx: StepContext, progress: Any = None
) -> tuple[Any, Path | None, dict[str, Any]]:
    """Prune (and fine-tune) ``source``: (the pruned module for torch sources, the HF folder, the report)."""
    import copy

    import torch

    from modelpress.locations import cache_dir
    from modelpress.optimize.distill.distill import (
        cache_key,
        copy_sentence_transformers_files,
        freeze_embeddings,
        load_hf_model,
        parameter_count,
        store_in_cache,
    )
    from modelpress.tasks import task_for

    task = task_for(source)
    targets = _targets(config, source)
    from modelpress.optimize.train.loop import training_threads

    torch.set_num_threads(training_threads(ctx))
    importance = config.importance
    if importance == "auto":
        importance = "magnitude" if source.format == "torch" else "activation"
    if source.format == "torch" and importance != "magnitude":
        raise OptimizationError(
            "CNN channels are ranked by weight magnitude (Torch-Pruning's group importance).",
            hint="Use importance: magnitude (or auto) for CNNs.",
        )
    batches: list[dict[str, np.ndarray]] = []
    calib_used = None
    if importance == "activation":
        batches, calib_used = calibration_batches(source, config.calibration, ctx.data_dir)
    if source.format == "torch":
        if source.module is None:
            raise OptimizationError(
                f"'{source.name}' is a torch-format artifact with no module attached.",
                hint="Load it with modelpress.load so its architecture is rebuilt.",
            )
        original = copy.deepcopy(source.module).eval()
        model = copy.deepcopy(source.module).eval()
        example = torch.from_numpy(task.sample_inputs(2, data_dir=ctx.data_dir)["pixel_values"])
        report = prune_cnn(model, example, config.ratio, round_to=config.round_to)
    else:
        original = load_hf_model(source, task)
        model = copy.deepcopy(original)
        report = prune_transformer(
            model, targets, config.ratio, head_ratio=config.head_ratio, importance=importance, batches=batches, round_to=config.round_to
        )
    summary: dict[str, Any] = {
        "targets": targets,
        "importance": importance,
        "parameters_before": parameter_count(original),
        "parameters_after": parameter_count(model),
        "weight_bytes_before": _weights_bytes(original),
        "weight_bytes_after": _weights_bytes(model),
        **{k: v for k, v in report.items() if k != "kept"},
    }
    if calib_used is not None:
        summary["calibration"] = calib_used
    folder = None
    if source.format == "hf":
        folder = Path(tempfile.mkdtemp(prefix="pruned-"))
        model.save_pretrained(str(folder))
        if source.path is not None:
            copy_sentence_transformers_files(source.path, folder)
        _fix_pooling_dims(folder, model)
        model = (
            task.auto_model_class().from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False).eval()
        )  # the saved shapes load
    if config.finetune is None:
        return model, folder, {**summary, "kept": report["kept"]}
    key = cache_key("structured-prune", source, config, ctx.data_dir, STRUCTURED_VERSION)
    cached = cache_dir("structured") / key
    if config.cache and (cached / "finetune-report.json").is_file():
        from safetensors.torch import load_model

        load_model(model, str(cached / "model.safetensors"))
        if folder is not None:
            model.save_pretrained(str(folder))
        return (
            model,
            folder,
            {**summary, "finetune": json.loads((cached / "finetune-report.json").read_text()), "cached": True, "kept": report["kept"]},
        )
    from modelpress.optimize.train.objectives import Objective, load_train_data

    spec = config.finetune
    if spec.freeze_embeddings and source.format == "hf":
        freeze_embeddings(model)
    data = load_train_data(task, spec, ctx.data_dir)
    objective = Objective(
        task,
        original,
        data,
        spec,
        layer_map=None if source.format == "torch" else list(range(int(model.config.num_hidden_layers))),
        wrap=None if source.format == "torch" else task.wrap_module,
    )
    result = objective.fit(
        model,
        checkpoint_dir=cache_dir("structured") / f"{key}.ckpt",
        progress=progress,
        description=f"recovery fine-tuning of {source.name}",
    )
    ft = {"data": data.sources, "train_examples": len(data), "validation": objective.validation_name, "training": result.to_json()}

    def save(tmp: Path) -> None:
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "finetune-report.json").write_text(json.dumps(ft, indent=1, default=str))

    if config.cache:
        store_in_cache(cached, save)
        shutil.rmtree(cache_dir("structured") / f"{key}.ckpt", ignore_errors=True)
    for p in model.parameters():
        p.requires_grad_(True)
    if folder is not None:
        model.save_pretrained(str(folder))
    return model, folder, {**summary, "finetune": ft, "cached": False, "kept": report["kept"]}


def _fix_pooling_dims(folder: Path, model: Any) -> None:
    """Keep a sentence-transformers pooling config's dimension in step with the model (unchanged by FFN/head pruning)."""
    pool = folder / "1_Pooling" / "config.json"
    if pool.is_file():
        data = json.loads(pool.read_text())
        if data.get("word_embedding_dimension") not in (None, model.config.hidden_size):
            data["word_embedding_dimension"] = model.config.hidden_size
            pool.write_text(json.dumps(data, indent=2))


@register_handler(StructuredPrune, "torch")
def structured_prune_handler(source: Artifact, config: StructuredPrune, ctx: StepContext) -> Artifact:
    model, folder, report = prune_artifact(source, config, ctx, ctx.progress)
    report.pop("kept", None)

    def fill(tmp: Path) -> dict[str, Any]:
        if folder is not None:
            copy_model_files(folder, tmp)
        else:
            from safetensors.torch import save_model

            save_model(model, str(tmp / TORCH_WEIGHTS))
        return {"metrics": report}

    extra = {"architecture": _architecture(model)} if source.format == "torch" else None
    try:
        art = write_variant(
            source,
            config,
            ctx,
            fmt=source.format,
            model_file=TORCH_WEIGHTS if source.format == "torch" else None,
            fill=fill,
            task_config=extra,
        )
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if source.format == "torch":
        art.module = model.eval()
    return art


def _architecture(model: Any) -> dict[str, Any] | None:
    """The manifest's ``task_config["architecture"]`` for the pruned module: its new widths (zoo
    architectures), or None for a module only its author can rebuild (then attach it by hand)."""
    from modelpress.zoo.architectures import describe_module

    if getattr(model, "architecture_name", None) is None:
        return None
    arch = describe_module(model)
    return {"name": arch["architecture"], "config": arch["config"]}


def prune_structured(model: Any, output: Any, config: StructuredPrune | dict[str, Any] | None = None, **options: Any) -> Artifact:
    """Structurally prune ``model`` into ``output``; options as :func:`~modelpress.optimize.techniques.apply_technique`."""
    cfg = config if isinstance(config, StructuredPrune) else StructuredPrune(**(config or {}))
    return apply_technique(model, cfg, output, **options)
