"""Reads used on the stream's way in."""

from __future__ import annotations

from collections.abc import Sequence

from subscriptions.models import Grant


def grants_missing(*, user: str, process_instances: Sequence[str]) -> list[str]:
    """The requested process instances `user` holds no active grant for, in request order."""
    if not process_instances:
        return []
    granted = set(
        Grant.objects.filter(user=user, process_instance__in=process_instances, revoked_at__isnull=True).values_list(
            "process_instance", flat=True
        )
    )
    return [p for p in process_instances if p not in granted]
