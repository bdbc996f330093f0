"""The model registry: versions, lineage, metrics and stages of every model variant.

- :class:`modelpress.registry.api.Registry`: the Python API (register, get, promote, ...).
- :mod:`modelpress.cli.registry`: the ``modelpress registry`` commands (a Typer sub-app).
- :mod:`modelpress.registry.db`: the tables; :mod:`.engine`: connecting and migrating;
  :mod:`.store`: the content-addressed artifact files; :mod:`.names`: names and references.

This package module imports only the light pieces, so that mounting the CLI does not load
SQLAlchemy; import the registry itself from ``modelpress.registry.api``.
"""

from modelpress.registry.names import STAGES, Ref, parse_ref, validate_name, validate_stage
from modelpress.registry.records import CheckReport, ModelVersion

__all__ = ["STAGES", "CheckReport", "ModelVersion", "Ref", "parse_ref", "validate_name", "validate_stage"]
