"""The model server: KServe v2, OpenAI-compatible and SageMaker endpoints over dynamically batched runners.

    from modelpress.serving import BatchConfig, ModelConfig, ModelServer, ServerConfig
    ModelServer(ServerConfig(models=[ModelConfig(source="minilm", batching=BatchConfig(max_batch_size=32))])).run()

Only the settings are imported eagerly; the server (FastAPI, uvicorn, prometheus-client: the
``serve`` extra) is in :mod:`modelpress.serving.app` and loads when ``ModelServer`` or ``serve``
is first used. Rollouts, their API and the dashboard come from :mod:`modelpress.rollout`, which
plugs into the server (``modelpress.rollout.RolloutServer``).
"""

from typing import Any

from modelpress.serving.config import BatchConfig, ModelConfig, ServerConfig, load_config


def __getattr__(name: str) -> Any:
    if name in ("ModelServer", "serve"):
        from modelpress.serving import app

        return getattr(app, name)
    raise AttributeError(f"module 'modelpress.serving' has no attribute '{name}'")


__all__ = ["BatchConfig", "ModelConfig", "ModelServer", "ServerConfig", "load_config", "serve"]
