"""Importing this module registers every technique handler (one module per backend)."""

import modelpress.optimize.quantize.onnxruntime  # noqa: F401
import modelpress.optimize.quantize.openvino  # noqa: F401
import modelpress.optimize.quantize.torch  # noqa: F401
import modelpress.optimize.distill.distill  # noqa: F401  (distillation, runtime torch)
import modelpress.optimize.prune.structured  # noqa: F401  (structured pruning, runtime torch)
import modelpress.optimize.prune.llm  # noqa: F401  (SparseGPT and Wanda pruning)
import modelpress.optimize.prune.magnitude  # noqa: F401  (unstructured and N:M pruning)
