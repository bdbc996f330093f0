"""The model server: KServe v2, OpenAI-compatible and SageMaker endpoints over dynamically batched runners.

    from modelpress.serving import BatchConfig, ModelConfig, ServerConfig
    from modelpress.serving.app import ModelServer
    ModelServer(ServerConfig(models=[ModelConfig(source="minilm", batching=BatchConfig(max_batch_size=32))])).run()

Only the settings are imported here; the server (FastAPI, uvicorn, prometheus-client: the
``serve`` extra) is in :mod:`modelpress.serving.app`.
"""

from modelpress.serving.config import BatchConfig, ModelConfig, ServerConfig, load_config

__all__ = ["BatchConfig", "ModelConfig", "ServerConfig", "load_config"]
