"""The explicit-KV decoder graph's names, without importing torch (recipes and the export
package import this; the graph itself is :mod:`modelpress.export.kv_decoder`)."""

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")  # decoders whose attention KVDecoder spells out
INPUT_NAMES = ("input_ids", "position_ids", "attention_mask", "past_k", "past_v")
OUTPUT_NAMES = ("logits", "new_k", "new_v")
