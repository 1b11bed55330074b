"""What admins audit: open and closed streams, each delivery, grants, and rejected records."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db import models
from django.db.models import Q
from django.utils import timezone

from events.core.records import CloseReason, DeliveryStatus


class Subscription(models.Model):
    """One opened SSE stream."""

    CloseReason = CloseReason

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False, verbose_name="stream id")
    user = models.CharField(max_length=150)
    process_instances = models.JSONField(default=list, blank=True)
    auth_method = models.CharField(max_length=16)
    opened_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)
    close_reason = models.CharField(max_length=16, choices=CloseReason.choices, blank=True)
    resumed_from = models.CharField(max_length=40, blank=True)
    last_event_id = models.CharField(max_length=40, blank=True)
    events_delivered = models.PositiveIntegerField(default=0)
    client_address = models.CharField(max_length=64, blank=True)
    user_agent = models.CharField(max_length=512, blank=True)
    instance = models.CharField(max_length=128, help_text="web process (host:pid) that served the stream")

    class Meta:
        verbose_name = "stream"
        verbose_name_plural = "streams"
        indexes = [
            # The changelist's order (-opened_at, -pk); a user's streams; streams of one serving instance
            # (and the loose index scan that lists instances for the filter); the open streams, newest first.
            models.Index(fields=["-opened_at"], name="sub_opened"),
            models.Index(fields=["user", "-opened_at"], name="sub_user_opened"),
            models.Index(fields=["instance", "-opened_at"], name="sub_instance_opened"),
            models.Index(fields=["-opened_at"], name="sub_open", condition=Q(closed_at__isnull=True)),
        ]

    def __str__(self) -> str:
        return f"stream {self.id} of {self.user}"


class DeliveryAudit(models.Model):
    """The outcome of one event on one stream."""

    Status = DeliveryStatus

    # No index of its own: audit_sub_sent starts with it. No database constraint either: audit batches
    # are written by several consumer processes in whatever order they arrive (events/ingest/audit_sink.py).
    subscription = models.ForeignKey(
        Subscription,
        on_delete=models.CASCADE,
        related_name="deliveries",
        db_index=False,
        db_constraint=False,
        verbose_name="stream",
    )
    event_id = models.CharField(max_length=40, verbose_name="event id")
    event = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices)
    user = models.CharField(max_length=150, blank=True, help_text="the user the event was addressed to, if any")
    process_instance = models.CharField(max_length=128, blank=True)
    kafka_topic = models.CharField(max_length=255, blank=True, verbose_name="Kafka topic")
    kafka_partition = models.IntegerField(null=True, verbose_name="Kafka partition")
    kafka_offset = models.BigIntegerField(null=True, verbose_name="Kafka offset")
    sent_at = models.DateTimeField()
    latency_ms = models.FloatField(
        null=True, verbose_name="latency (ms)", help_text="Kafka record timestamp to bytes written"
    )

    class Meta:
        verbose_name = "delivery audit"
        verbose_name_plural = "delivery audits"
        # Every index costs each audit insert, so only what the admin reads: the changelist order
        # (-sent_at, -pk), an event's deliveries, a process instance's, a stream's (and, through the
        # streams of a user, that user's; it also serves the foreign key), and the status filter.
        indexes = [
            models.Index(fields=["-sent_at", "-id"], name="audit_sent"),
            models.Index(fields=["event_id"], name="audit_event"),
            models.Index(fields=["process_instance", "-sent_at"], name="audit_pi_sent"),
            models.Index(fields=["subscription", "-sent_at"], name="audit_sub_sent"),
            models.Index(fields=["status", "-sent_at"], name="audit_status_sent"),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} {self.status}"


class BroadcastDelivery(models.Model):
    """A broadcast written to every open stream of one web process: one row instead of one per stream.

    The streams it reached are the ones open on that process at `sent_at` (selectors.broadcast_recipients);
    a stream that lost it has its own `dropped` DeliveryAudit row.
    """

    event_id = models.CharField(max_length=40, verbose_name="event id")
    event = models.CharField(max_length=64)
    instance = models.CharField(max_length=128, help_text="web process (host:pid)")
    streams = models.PositiveIntegerField(help_text="streams it was written to")
    sent_at = models.DateTimeField()
    latency_ms = models.FloatField(
        null=True, verbose_name="latency (ms)", help_text="Kafka record timestamp to the first write"
    )
    kafka_topic = models.CharField(max_length=255, blank=True, verbose_name="Kafka topic")
    kafka_partition = models.IntegerField(null=True, verbose_name="Kafka partition")
    kafka_offset = models.BigIntegerField(null=True, verbose_name="Kafka offset")

    class Meta:
        verbose_name = "broadcast delivery"
        verbose_name_plural = "broadcast deliveries"
        indexes = [
            models.Index(fields=["-sent_at", "-id"], name="broadcast_sent"),
            models.Index(fields=["event_id"], name="broadcast_event"),
        ]

    def __str__(self) -> str:
        return f"broadcast {self.event_id} on {self.instance}"


class Grant(models.Model):
    """A user may follow a process instance while the grant is active (not revoked).

    Rows are never deleted and a grant given again is a new row, so the rows are the access history.
    `granted_at` / `revoked_at` are the times the record carries (a Kafka record's timestamp, or the
    admin's clock); `recorded_at` / `revoke_recorded_at` are when the gateway applied them, which is what
    streams act on: a stream opened after `recorded_at` may follow, and one following stops at the
    `disconnect` stored right after `revoke_recorded_at` (seconds or hours after `revoked_at` when the
    consumer lags).
    """

    class Source(models.TextChoices):
        KAFKA = "kafka"
        ADMIN = "admin"

    user = models.CharField(max_length=150)
    process_instance = models.CharField(max_length=128)
    granted_at = models.DateTimeField()
    granted_by = models.CharField(max_length=255, help_text="the connect record, or the admin who granted")
    source = models.CharField(max_length=8, choices=Source.choices)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.CharField(max_length=255, blank=True)
    recorded_at = models.DateTimeField(default=timezone.now, help_text="when the gateway applied the grant")
    revoke_recorded_at = models.DateTimeField(
        null=True, blank=True, help_text="when the gateway applied the revocation"
    )

    class Meta:
        verbose_name = "grant"
        verbose_name_plural = "grants"
        constraints = [
            models.UniqueConstraint(
                fields=["user", "process_instance"],
                condition=Q(revoked_at__isnull=True),
                name="one_active_grant",
                violation_error_message="This user already holds an active grant for this process instance.",
            )
        ]
        indexes = [
            models.Index(fields=["-granted_at"], name="grant_granted"),
            models.Index(fields=["user", "process_instance"], name="grant_user_pi"),
            models.Index(fields=["process_instance"], name="grant_pi"),
        ]
        permissions = [("view_all_process_instances", "May follow every process instance without a grant")]

    def __str__(self) -> str:
        return f"{self.user} -> {self.process_instance}"

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def ended_at(self) -> datetime | None:
        """When the revocation took effect (rows revoked before it was recorded: the record's time)."""
        return self.revoke_recorded_at or self.revoked_at


class RejectedRecord(models.Model):
    """A Kafka record that was not accepted; a copy went to the dead-letter topic."""

    received_at = models.DateTimeField()
    topic = models.CharField(max_length=255)
    partition = models.IntegerField()
    offset = models.BigIntegerField()
    reason = models.CharField(max_length=32)
    detail = models.TextField()
    key = models.TextField(blank=True)
    value_preview = models.TextField(blank=True, help_text="the first 4 KiB of the value, as text")
    value_size = models.PositiveIntegerField(verbose_name="value size (bytes)")
    headers = models.JSONField(default=list, blank=True)

    class Meta:
        verbose_name = "rejected record"
        verbose_name_plural = "rejected records"
        indexes = [
            models.Index(fields=["-received_at"], name="rejected_received"),
            models.Index(fields=["reason", "-received_at"], name="rejected_reason"),
            models.Index(fields=["topic", "partition", "offset"], name="rejected_coords"),
        ]

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}: {self.reason}"
