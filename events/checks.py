"""Deployment checks (`manage.py check --deploy`) for settings that are valid but unsafe in production."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Tags, Warning, register


@register(Tags.security, deploy=True)
def bearer_audience(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    bearer = settings.JWT_SECRET or settings.JWT_PUBLIC_KEY or settings.JWT_JWKS_URL
    if bearer and not settings.JWT_AUDIENCE:
        return [
            Warning(
                "Bearer tokens are accepted without an audience check: a token the identity provider issued for "
                "any other service is accepted too.",
                hint="Set JWT_AUDIENCE to the audience your identity provider puts in tokens for this gateway.",
                id="events.W001",
            )
        ]
    return []


@register(Tags.security, deploy=True)
def demo_off(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if settings.DEMO_ENABLED:
        return [
            Warning(
                "The demo page is on: any user can publish test events to everyone following a process "
                "instance they may follow.",
                hint="Unset DEMO_ENABLED in production.",
                id="events.W002",
            )
        ]
    return []
