"""Kafka connection options: TLS with a private CA and a client certificate, SASL PLAIN and SCRAM."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from django.test import override_settings

from events.ingest.kafka import kafka_options
from tests.certificates import self_signed
from tests.test_settings import PRODUCTION, manage


def _certificate(directory: Path) -> tuple[Path, Path]:
    cert_path, key_path = directory / "client.pem", directory / "client.key"
    self_signed(cert_path, key_path, common_name="events-gateway test", ca=True)
    return cert_path, key_path


def test_plaintext_has_no_tls_and_no_sasl() -> None:
    with override_settings(KAFKA_SECURITY_PROTOCOL="PLAINTEXT", KAFKA_BOOTSTRAP_SERVERS=["k:9092"]):
        assert kafka_options() == {"bootstrap_servers": ["k:9092"], "security_protocol": "PLAINTEXT"}


def test_tls_takes_a_private_ca_and_a_client_certificate(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    with override_settings(
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME="gateway",
        KAFKA_SASL_PASSWORD="s3cret",
        KAFKA_SSL_CAFILE=str(cert),
        KAFKA_SSL_CERTFILE=str(cert),
        KAFKA_SSL_KEYFILE=str(key),
    ):
        options = kafka_options()
    context: ssl.SSLContext = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert any("events-gateway test" in str(ca.get("subject")) for ca in context.get_ca_certs())
    assert (options["sasl_mechanism"], options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "SCRAM-SHA-512",
        "gateway",
        "s3cret",
    )


def test_a_missing_client_key_fails_at_start_not_at_first_use(tmp_path: Path) -> None:
    with (
        override_settings(KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CERTFILE=str(tmp_path / "missing.pem")),
        pytest.raises(FileNotFoundError),
    ):
        kafka_options()


def test_an_unknown_sasl_mechanism_is_refused_at_start() -> None:
    result = manage("check", **PRODUCTION, KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="GSSAPI")
    assert result.returncode != 0
    assert "KAFKA_SASL_MECHANISM='GSSAPI' is not supported" in result.stderr
