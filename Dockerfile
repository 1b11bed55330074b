# One image, two roles:
#   web (default):  daphne -b 0.0.0.0 -p 8000 --proxy-headers gateway_project.asgi:application
#   consumer:       python manage.py run_consumer
# The install step is the README's (scripts/setup): a virtualenv, then `python -m pip install -r` the
# locked requirements.txt (the runtime half of requirements-dev.txt: every package, transitive ones
# included, with its hashes; scripts/lock writes it). docker-compose.yml runs both roles.

# Both stages on the same base, so the virtualenv built in the first runs unchanged in the second.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
# --require-hashes: a file whose hash is not in the lock is refused.
RUN /opt/venv/bin/python -m pip install --require-hashes -r /tmp/requirements.txt

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="events-gateway" \
      org.opencontainers.image.description="Kafka to Server-Sent Events gateway (web: default command; consumer: python manage.py run_consumer)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    DJANGO_SETTINGS_MODULE=gateway_project.settings \
    LOG_FORMAT=json
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /app --shell /usr/sbin/nologin gateway
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
# Code stays owned by root: the gateway user can read it, not change it.
COPY manage.py ./
COPY gateway_project/ gateway_project/
COPY events/ events/
COPY subscriptions/ subscriptions/
USER 10001:10001
# 8000: web (SSE, admin, /healthz, /readyz, /metrics); 9108: the consumer's CONSUMER_METRICS_PORT.
EXPOSE 8000 9108
# Both roles finish cleanly on SIGTERM: web closes streams with a final retry, the consumer commits its batch.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "gateway_project.healthcheck"]
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "--proxy-headers", "gateway_project.asgi:application"]
