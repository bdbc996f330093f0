"""Torch modules that give a Hugging Face model a plain positional signature.

The same wrapper is what the PyTorch runner calls and what the exporters trace, so the
exported graph has exactly the inputs and outputs the task expects.
"""

from __future__ import annotations

import torch


class EncoderOutput(torch.nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) -> one named output of the model."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return getattr(self.model(**kwargs), self.output)


class CausalLMLogits(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, without a KV cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class ImageLogits(torch.nn.Module):
    """(pixel_values) -> logits of a Hugging Face image classifier."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits
