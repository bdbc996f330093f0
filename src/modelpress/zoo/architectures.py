"""The registered architectures of the on-disk torch format now live in :mod:`modelpress.runtimes.architectures`
(the torch runner rebuilds modules from them); this name stays for the code that imports it from here."""

from modelpress.runtimes.architectures import (
    ARCHITECTURE_FILE,
    ARCHITECTURES,
    MNIST_CNN_DEFAULTS,
    WEIGHTS_FILE,
    MnistCNN,
    build_module,
    check_mnist_cnn_config,
    describe_module,
    register_architecture,
)

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_FILE",
    "MNIST_CNN_DEFAULTS",
    "WEIGHTS_FILE",
    "MnistCNN",
    "build_module",
    "check_mnist_cnn_config",
    "describe_module",
    "register_architecture",
]
