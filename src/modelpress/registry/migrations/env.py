"""Alembic environment for the registry: always online, on the connection the caller passes.

Run through :func:`modelpress.registry.engine.upgrade` (which ``Registry`` calls on open); to
write a new revision during development::

    from alembic import command
    from modelpress.registry.engine import alembic_config, create_engine, make_url
    engine = create_engine(make_url("sqlite:////tmp/dev.db", None))
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
        command.revision(alembic_config(conn), "what changed", autogenerate=True)
"""

from __future__ import annotations

from alembic import context

from modelpress.registry.db import Base

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("Run the registry migrations through modelpress.registry.engine.upgrade(engine), with a connection.")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
