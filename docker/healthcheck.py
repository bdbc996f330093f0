"""The image's HEALTHCHECK: exit 0 when the server in this container answers ready (GET /v2/health/ready on $PORT).

Standard library only (the slim image has no curl); sends $MODELPRESS_API_KEY when set, for servers started with --protect-health.
"""

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4  # below the HEALTHCHECK's --timeout=5s


def main() -> int:
    # the entrypoint serves on SAGEMAKER_BIND_TO_PORT when SageMaker sets it, else on $PORT
    port = os.environ.get("SAGEMAKER_BIND_TO_PORT") or os.environ.get("PORT", "8080")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/health/ready")
    key = os.environ.get("MODELPRESS_API_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
