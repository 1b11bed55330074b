"""`python -m gateway_project.healthcheck`: the container HEALTHCHECK for either role.

Exits 0 if the web server (port 8000) or the consumer (CONSUMER_METRICS_PORT) answers /healthz.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    ports = [os.environ.get("PORT", "8000"), os.environ.get("CONSUMER_METRICS_PORT", "9108")]
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return 0
        except OSError:
            continue
    return 1


if __name__ == "__main__":
    sys.exit(main())
