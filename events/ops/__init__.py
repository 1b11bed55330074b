"""Operating either process: Prometheus metrics and the health checks behind /healthz and /readyz."""
