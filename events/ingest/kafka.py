"""Kafka connection options shared by the consumer and producers, from settings."""

from __future__ import annotations

import ssl
from typing import Any

from django.conf import settings


def kafka_options() -> dict[str, Any]:
    """Connection options shared by the consumer and producers, from settings: TLS with an optional CA and
    client certificate, SASL PLAIN or SCRAM-SHA-256/512."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.KAFKA_BOOTSTRAP_SERVERS,
        "security_protocol": settings.KAFKA_SECURITY_PROTOCOL,
    }
    if settings.KAFKA_SECURITY_PROTOCOL in {"SSL", "SASL_SSL"}:
        context = ssl.create_default_context(cafile=settings.KAFKA_SSL_CAFILE or None)
        if settings.KAFKA_SSL_CERTFILE:  # a client certificate (mutual TLS)
            context.load_cert_chain(settings.KAFKA_SSL_CERTFILE, settings.KAFKA_SSL_KEYFILE or None)
        options["ssl_context"] = context
    if settings.KAFKA_SECURITY_PROTOCOL.startswith("SASL"):
        options.update(
            sasl_mechanism=settings.KAFKA_SASL_MECHANISM or "PLAIN",
            sasl_plain_username=settings.KAFKA_SASL_USERNAME,
            sasl_plain_password=settings.KAFKA_SASL_PASSWORD,
        )
    return options
