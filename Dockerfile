# One image, two roles:
#   web (default):  daphne -b 0.0.0.0 -p 8000 gateway_project.asgi:application
#   consumer:       python manage.py run_consumer
# The install step is the README's: a virtualenv with the pinned requirements.txt.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/python -m pip install -r /tmp/requirements.txt

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DJANGO_SETTINGS_MODULE=gateway_project.settings \
    LOG_FORMAT=json
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /app --shell /usr/sbin/nologin gateway
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY manage.py ./
COPY gateway_project/ gateway_project/
COPY events/ events/
COPY subscriptions/ subscriptions/
USER 10001:10001
EXPOSE 8000 9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "gateway_project.healthcheck"]
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "--proxy-headers", "gateway_project.asgi:application"]
