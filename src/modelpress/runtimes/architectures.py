"""Model architectures stored as data: a name plus a JSON config, rebuilt from code.

A folder in the on-disk ``torch`` format holds ``model.safetensors`` (the weights) and
``architecture.json`` (``{"architecture": "mnist-cnn", "config": {...}}``). Loading builds the
module from the registered builder with that config and loads the weights into it, so nothing
pickled is ever run. The config spells out every layer's width (channels per conv layer, units
per hidden layer): a structurally pruned model is saved with its new shapes through
:func:`describe_module`, which reads them back from the module's layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modelpress.errors import ConfigError, UnsupportedModelError

ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"

# name -> (builder(config) -> module, describe(module) -> config)
ARCHITECTURES: dict[str, tuple[Callable[[dict[str, Any]], Any], Callable[[Any], dict[str, Any]]]] = {}


def register_architecture(name: str, describe: Callable[[Any], dict[str, Any]]):
    """Register ``builder(config) -> torch.nn.Module`` under ``name``; ``describe(module)`` gives its config back."""

    def deco(builder: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        ARCHITECTURES[name] = (builder, describe)
        return builder

    return deco


def build_module(architecture: str, config: dict[str, Any]) -> Any:
    """A freshly initialised module of ``architecture`` with ``config`` (weights not loaded)."""
    if architecture not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"Unknown architecture '{architecture}'.",
            hint=f"Known architectures: {', '.join(sorted(ARCHITECTURES))}. "
            f'Example {ARCHITECTURE_FILE}: {{"architecture": "mnist-cnn", "config": {{"conv_channels": [32, 64]}}}}',
        )
    return ARCHITECTURES[architecture][0](dict(config))


def describe_module(module: Any) -> dict[str, Any]:
    """``{"architecture": NAME, "config": {...}}`` for a module built here, with its current layer widths."""
    name = getattr(module, "architecture_name", None)
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"A {type(module).__name__} is not a registered architecture, so it cannot be saved as data.",
            hint=f"Build it with modelpress.runtimes.architectures.build_module (known: {', '.join(sorted(ARCHITECTURES))}).",
        )
    return {"architecture": name, "config": ARCHITECTURES[name][1](module)}


# -- mnist-cnn ------------------------------------------------------------------------------
MNIST_CNN_DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "image_size": [28, 28],
    "conv_channels": [32, 64],  # one 3x3 conv (+ batch norm, ReLU, 2x2 max-pool) per entry
    "hidden": [128],  # fully connected layers between the flattened features and the logits
    "num_classes": 10,
    "batch_norm": True,
}


def _positive_ints(value: Any, key: str, example: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(f"mnist-cnn config '{key}' must be a list of positive integers, got {value!r}.", hint=f"Example: {example}")
    return value


def check_mnist_cnn_config(config: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(MNIST_CNN_DEFAULTS))
    if unknown:
        raise ConfigError(f"Unknown mnist-cnn config keys: {', '.join(unknown)}.", hint=f"Known keys: {', '.join(MNIST_CNN_DEFAULTS)}.")
    cfg = {**MNIST_CNN_DEFAULTS, **config}
    convs = _positive_ints(cfg["conv_channels"], "conv_channels", '"conv_channels": [32, 64]')
    if not convs:
        raise ConfigError("mnist-cnn needs at least one conv layer.", hint='Example: "conv_channels": [32, 64]')
    _positive_ints(cfg["hidden"], "hidden", '"hidden": [128]')
    size = _positive_ints(cfg["image_size"], "image_size", '"image_size": [28, 28]')
    if len(size) != 2 or min(size) >> len(convs) == 0:
        raise ConfigError(
            f"image_size {size} cannot be halved {len(convs)} times (one 2x2 pool per conv layer).",
            hint='Example: "image_size": [28, 28] with "conv_channels": [32, 64]',
        )
    for key in ("in_channels", "num_classes"):
        _positive_ints([cfg[key]], key, f'"{key}": {MNIST_CNN_DEFAULTS[key]}')
    if not isinstance(cfg["batch_norm"], bool):
        raise ConfigError(f"mnist-cnn config 'batch_norm' must be true or false, got {cfg['batch_norm']!r}.")
    return cfg


def _describe_mnist_cnn(module: Any) -> dict[str, Any]:
    convs = [m for m in module.features if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in module.classifier if isinstance(m, torch.nn.Linear)]
    return {
        "in_channels": convs[0].in_channels,
        "image_size": list(module.image_size),
        "conv_channels": [c.out_channels for c in convs],
        "hidden": [lin.out_features for lin in linears[:-1]],
        "num_classes": linears[-1].out_features,
        "batch_norm": any(isinstance(m, torch.nn.BatchNorm2d) for m in module.features),
    }


class MnistCNN(nn.Module):
    """A small CNN: [conv3x3 -> BN -> ReLU -> maxpool2] per conv layer, then an MLP -> logits.

    Input: normalised ``pixel_values`` [batch, in_channels, H, W]; output: logits [batch, classes].
    Plain Conv/BN/ReLU/Linear layers, so it exports, quantizes (static int8) and prunes cleanly.
    """

    architecture_name = "mnist-cnn"

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        cfg = check_mnist_cnn_config(dict(config or {}))
        self.image_size = tuple(cfg["image_size"])
        layers: list[nn.Module] = []
        c_in = cfg["in_channels"]
        for c_out in cfg["conv_channels"]:
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not cfg["batch_norm"]))
            if cfg["batch_norm"]:
                layers.append(nn.BatchNorm2d(c_out))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        h, w = (s >> len(cfg["conv_channels"]) for s in cfg["image_size"])
        dims = [c_in * h * w, *cfg["hidden"], cfg["num_classes"]]
        head: list[nn.Module] = [nn.Flatten()]
        for i in range(len(dims) - 1):
            head.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                head.append(nn.ReLU())
        self.classifier = nn.Sequential(*head)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixel_values))


register_architecture("mnist-cnn", _describe_mnist_cnn)(MnistCNN)
