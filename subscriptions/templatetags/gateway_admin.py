"""Template filters of the gateway's admin pages."""

from __future__ import annotations

from datetime import datetime

from django import template

from subscriptions.trace import moment as _moment

register = template.Library()


@register.filter
def moment(value: datetime | None) -> str:
    """A timestamp to the millisecond, in TIME_ZONE (UTC), as every admin page shows them."""
    return _moment(value)
