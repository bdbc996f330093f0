"""Importing this module registers every technique handler (one module per backend)."""

from . import ort_handlers, ov_handlers, torch_handlers  # noqa: F401
from . import distill, structured  # noqa: F401  (distillation and structured pruning, runtime torch)
from . import llm_prune, prune  # noqa: F401  (unstructured, N:M, SparseGPT and Wanda pruning)
