#!/bin/sh
# The modelpress image's entrypoint: `modelpress ARGS...`, except that no arguments, or `serve` alone (what SageMaker
# runs: `docker run IMAGE serve`), serve the model folder $MODEL_DIR on $PORT (8080: SageMaker's and KServe's port)
# on every interface (SageMaker's SAGEMAKER_BIND_TO_PORT wins when set). A server reachable from other machines needs
# a key: set MODELPRESS_API_KEY.
set -eu
if [ "$#" -eq 0 ] || { [ "$#" -eq 1 ] && [ "$1" = "serve" ]; }; then
    set -- serve "${MODEL_DIR:-/opt/ml/model}" --host 0.0.0.0 --port "${SAGEMAKER_BIND_TO_PORT:-${PORT:-8080}}"
fi
exec modelpress "$@"
