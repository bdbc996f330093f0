"""Hugging Face ``datasets`` by name, for machines that reach the hub.

Spec: ``hf:NAME[/CONFIG]:SPLIT`` with the columns named as for user files, e.g.
``hf:glue/sst2:validation`` (columns ``sentence``, ``label``).
"""

from __future__ import annotations

from modelpress.datasets.base import Dataset, LabeledTextDataset, PairDataset, TextCorpus
from modelpress.datasets.files import ALIASES, _labels
from modelpress.errors import DatasetError, require


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    body = spec[3:]
    if ":" not in body:
        raise DatasetError(f"'{spec}' names no split.", hint="Write hf:NAME[/CONFIG]:SPLIT, e.g. hf:glue/sst2:validation")
    name, split = body.rsplit(":", 1)
    config = None
    if name.count("/") >= 1 and name.split("/")[0] in ("glue", "super_glue"):
        name, config = name.split("/", 1)
    elif "/" in name and name.count("/") == 2:
        owner, ds, config = name.split("/")
        name = f"{owner}/{ds}"
    return name, config, split


def read_hub(spec: str, kind: type, columns: dict[str, str] | None = None) -> Dataset:
    columns = columns or {}
    hf = require("datasets", "hub")
    name, config, split = parse_hub_spec(spec)
    try:
        ds = hf.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub raises many types; report them as one
        raise DatasetError(f"Could not load '{spec}' from the Hugging Face hub: {exc}") from exc

    def col(want: str) -> list:
        for c in [columns[want]] if want in columns else ALIASES.get(want, [want]):
            if c in ds.column_names:
                return list(ds[c])
        raise DatasetError(f"'{spec}' has no column '{want}' (it has {ds.column_names}).", hint=f"Map one with --columns {want}=COLUMN")

    if kind is PairDataset:
        return PairDataset(spec, col("sentence1"), col("sentence2"), [float(v) for v in col("score")])
    if kind is LabeledTextDataset:
        labels, names = _labels(col("label"))
        feature = ds.features.get(columns.get("label", "label"))
        if feature is not None and getattr(feature, "names", None):
            names = list(feature.names)
        return LabeledTextDataset(spec, [str(t) for t in col("text")], labels, names)
    if kind is TextCorpus:
        return TextCorpus(spec, ["\n".join(col("text"))], "stream")
    raise DatasetError(f"Hub datasets of kind {kind.__name__} are not supported yet.")
