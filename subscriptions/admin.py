"""Admin: streams and deliveries are read-only records; grants are editable."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from subscriptions.models import DeliveryAudit, Grant, RejectedRecord, Subscription


class ReadOnlyAdmin(admin.ModelAdmin):
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Subscription)
class SubscriptionAdmin(ReadOnlyAdmin):
    list_display = ("id", "user", "opened_at", "closed_at", "close_reason", "events_delivered", "instance")
    list_filter = ("close_reason", "auth_method")
    search_fields = ("=id", "=user")
    date_hierarchy = "opened_at"


@admin.register(DeliveryAudit)
class DeliveryAuditAdmin(ReadOnlyAdmin):
    list_display = ("event_id", "event", "status", "user", "process_instance", "subscription", "sent_at", "latency_ms")
    list_filter = ("status",)
    search_fields = ("=event_id", "=user", "=process_instance")
    date_hierarchy = "sent_at"
    list_select_related = ("subscription",)


@admin.register(RejectedRecord)
class RejectedRecordAdmin(ReadOnlyAdmin):
    list_display = ("received_at", "topic", "partition", "offset", "reason", "detail")
    list_filter = ("reason", "topic")
    date_hierarchy = "received_at"


@admin.register(Grant)
class GrantAdmin(admin.ModelAdmin):
    list_display = ("user", "process_instance", "source", "granted_at", "granted_by", "revoked_at")
    list_filter = ("source",)
    search_fields = ("=user", "=process_instance")
