# The modelpress server image: `modelpress serve` on port 8080 (KServe v2, OpenAI, SageMaker /ping + /invocations).
#
#   docker build -t modelpress:cpu .                                  # CPU (default)
#   docker build -t modelpress:cuda --build-arg VARIANT=cuda .        # CUDA: torch's CUDA wheels (they bring the CUDA
#                                                                     # libraries); run with --gpus all
#   docker run -p 8080:8080 -e MODELPRESS_API_KEY=... -v "$PWD/model:/opt/ml/model:ro" modelpress:cpu
#   docker run -p 8080:8080 -e MODELPRESS_API_KEY=... -v ~/.modelpress:/registry \
#       modelpress:cpu serve minilm@production --registry /registry/registry.db --host 0.0.0.0 --port 8080
#
# docs/deploy.md: SageMaker, Hugging Face Inference Endpoints, KServe. tests/test_dockerfile.py lints this file.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/modelpress
ENV PATH=/opt/modelpress/bin:$PATH
# torch first, from PyTorch's index for the variant, so that nothing else pulls another build of it
RUN case "$VARIANT" in \
        cpu) index=https://download.pytorch.org/whl/cpu ;; \
        cuda) index=https://download.pytorch.org/whl/cu128 ;; \
        *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "$index" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
RUN pip install -c constraints.txt ".[serve,openvino]"

FROM ${PYTHON_IMAGE}
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="modelpress" \
      org.opencontainers.image.description="modelpress serve: KServe v2, OpenAI and SageMaker routes on port 8080" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.modelpress.variant="${VARIANT}"
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin modelpress \
    && mkdir -p /opt/ml/model /registry \
    && chown modelpress:modelpress /registry
COPY --from=build /opt/modelpress /opt/modelpress
COPY docker/entrypoint.sh /usr/local/bin/modelpress-entrypoint
COPY docker/healthcheck.py /usr/local/bin/modelpress-healthcheck
ENV PATH=/opt/modelpress/bin:$PATH \
    MODELPRESS_HOME=/home/modelpress/.modelpress \
    MODEL_DIR=/opt/ml/model \
    PORT=8080 \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/modelpress
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["python", "/usr/local/bin/modelpress-healthcheck"]
ENTRYPOINT ["/usr/local/bin/modelpress-entrypoint"]
CMD ["serve"]
