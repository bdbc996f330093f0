"""Importing this module registers every technique handler (one module per backend)."""

from . import ort_handlers, ov_handlers, torch_handlers  # noqa: F401
