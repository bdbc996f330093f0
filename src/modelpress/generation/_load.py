"""Where an engine's model comes from: a Hugging Face folder, or an Artifact of one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact
from modelpress.errors import ModelNotFoundError, UnsupportedModelError


@dataclass
class ModelSource:
    name: str
    folder: Path | None  # a Hugging Face folder (config.json + weights)
    tokenizer: Path
    module: Any = None  # an in-memory transformers model (an Artifact of format "torch")


def resolve(source: Any) -> ModelSource:
    """A model folder path or an :class:`Artifact` (format ``hf``, or ``torch`` holding a transformers model)."""
    if isinstance(source, Artifact):
        tok = source.manifest.task_config.get("tokenizer") or (str(source.path) if source.path else None)
        if source.format == "hf" and source.path is not None:
            return ModelSource(source.name, source.path, Path(tok or source.path))
        if source.format == "torch" and hasattr(source.module, "config") and tok:
            return ModelSource(source.name, None, Path(tok), module=source.module)
        if source.format == "openvino" and source.path is not None and (source.path / "decoder.xml").is_file():
            # a KV-cache decoder written by LLM quantization: the openvino engine runs it as it is
            return ModelSource(source.name, source.path, Path(tok or source.path))
        raise UnsupportedModelError(
            f"The generation engines run a Hugging Face causal LM; artifact '{source.name}' has format '{source.format}'.",
            hint="Serve the model's Hugging Face folder (config.json + model.safetensors + tokenizer), "
            "e.g. create_engine('../shared/data/models/stories260k').",
        )
    if isinstance(source, str | os.PathLike):
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"'{folder}' is not a Hugging Face model folder (no config.json).",
                hint="Example: create_engine('../shared/data/models/stories260k')",
            )
        return ModelSource(folder.resolve().name, folder, folder)
    raise UnsupportedModelError(
        f"create_engine takes a model folder or an Artifact (got {type(source).__name__}).",
        hint="Example: create_engine('../shared/data/models/stories260k', engine='torch')",
    )


def load_tokenizer(where: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(where.parent if where.is_file() else where), trust_remote_code=False)


def stop_ids_of(config: Any, generation_config: Any = None) -> list[int]:
    """The ids that end a sequence: every EOS id of the generation config and the model config, and BOS.

    BOS too: a base LM trained on concatenated documents starts a new one with it (stories260k ends
    its stories with id 1 and rarely emits id 2).
    """
    ids: list[int] = []
    for cfg in (generation_config, config):
        for attr in ("eos_token_id", "bos_token_id"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            ids += [int(v) for v in (value if isinstance(value, list | tuple) else [value]) if v is not None]
    return list(dict.fromkeys(ids))
