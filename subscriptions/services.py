"""Writes: grants, rejected records, streams and their delivery audits. Sync; call via sync_to_async."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, connection, models, transaction
from django.db.models import Exists, Model, OuterRef
from django.utils import timezone
from redis import RedisError

from events.core import blocking
from events.core.audit import AuditBatch, BroadcastRow, DeliveryRow, StreamRow
from subscriptions.models import BroadcastDelivery, DeliveryAudit, Grant, RejectedRecord, Subscription


def grant_apply(*, user: str, process_instance: str, granted_by: str, source: str, at: datetime) -> bool:
    """Let `user` follow `process_instance`; False if an active grant already existed."""
    try:
        with transaction.atomic():
            Grant.objects.create(
                user=user, process_instance=process_instance, granted_by=granted_by[:255], source=source, granted_at=at
            )
    except IntegrityError:
        return False
    return True


def grant_revoke(*, user: str, process_instance: str, revoked_by: str, at: datetime) -> int:
    """End the active grant, if any; returns how many were ended. `at` is the record's time; when the
    revocation was applied is recorded too (the disconnect is stored right after)."""
    return Grant.objects.filter(user=user, process_instance=process_instance, revoked_at__isnull=True).update(
        revoked_at=at, revoked_by=revoked_by[:255], revoke_recorded_at=timezone.now()
    )


def rejected_records_create(*, records: Sequence[RejectedRecord]) -> None:
    RejectedRecord.objects.bulk_create(records)


AUDIT_LOCK_TIMEOUT_MS = 500
_CLOSE_FIELDS = ["closed_at", "close_reason", "last_event_id", "events_delivered"]


def streams_record(*, batch: AuditBatch) -> None:
    """Write one batch of what a web process's streams did. Batches may arrive in any order (several
    sinks, retries): stream rows are upserts, and deliveries do not need their stream's row first."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # Yield to whatever holds these tables (a migration, a purge, a TRUNCATE) rather than wait or
            # deadlock: the batch stays in Redis and is retried.
            with connection.cursor() as cursor:
                cursor.execute(f"SET LOCAL lock_timeout = '{AUDIT_LOCK_TIMEOUT_MS}ms'")
        Subscription.objects.bulk_create([_subscription(row) for row in batch.opened], ignore_conflicts=True)
        Subscription.objects.bulk_create(
            [_subscription(row) for row in batch.closed],
            update_conflicts=True,
            unique_fields=["id"],
            update_fields=_CLOSE_FIELDS,
        )
        _insert(DeliveryAudit, DeliveryRow._fields, batch.deliveries)
        _insert(BroadcastDelivery, BroadcastRow._fields, batch.broadcasts)


def _subscription(row: StreamRow) -> Subscription:
    values: dict[str, Any] = row._asdict()
    values["id"] = uuid.UUID(row.id)
    values["opened_at"] = _when(row.opened_at)
    values["closed_at"] = _when(row.closed_at) if row.closed_at is not None else None
    return Subscription(**values)


def _when(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)


def db_columns(model: type[Model], names: Sequence[str]) -> list[str]:
    """The database columns of `model`'s fields `names` (a foreign key's is `<name>_id`)."""
    return [str(model._meta.get_field(name).column) for name in names]  # type: ignore[union-attr]


def audit_params(model: type[Model], columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Audit wire rows (events.core.audit: ids as text, times as epoch seconds, -1 for "none") as database
    parameters for `model`'s `columns`."""
    fields = [model._meta.get_field(name) for name in columns]
    prepared: list[dict[Any, Any]] = [{} for _ in fields]  # the same value is prepared once per batch
    convert: list[Any] = []
    for field in fields:
        if isinstance(field, models.ForeignKey) or (isinstance(field, models.UUIDField) and field.primary_key):
            convert.append(lambda v, f=field: f.get_db_prep_value(uuid.UUID(v), connection))
        elif isinstance(field, models.DateTimeField):
            convert.append(lambda v, f=field: f.get_db_prep_value(_when(v), connection) if v is not None else None)
        elif isinstance(field, models.IntegerField | models.BigIntegerField) and field.null:
            convert.append(lambda v: v if v is not None and v >= 0 else None)
        elif isinstance(field, models.JSONField):
            convert.append(lambda v, f=field: f.get_db_prep_value(v, connection))
        else:
            convert.append(None)
    params = []
    for row in rows:
        values = []
        for index, raw in enumerate(row):
            fn = convert[index]
            if fn is None:
                values.append(raw)
                continue
            cache = prepared[index]
            key = raw if not isinstance(raw, list) else tuple(raw)
            if key not in cache:
                cache[key] = fn(raw)
            values.append(cache[key])
        params.append(values)
    return params


def _insert(model: type[Model], columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """One INSERT executed for many rows, without model instances: with a row per delivery this is the
    audit's hot path, and building model instances costs several times the insert itself."""
    if not rows:
        return
    meta = model._meta
    names = ", ".join(connection.ops.quote_name(column) for column in db_columns(model, columns))
    placeholders = ", ".join(["%s"] * len(columns))
    sql = f"INSERT INTO {connection.ops.quote_name(meta.db_table)} ({names}) VALUES ({placeholders})"  # noqa: S608
    params = audit_params(model, columns, rows)
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


# --- grants changed by hand in the admin -----------------------------------------------------------------
class GrantChangeFailed(Exception):
    """The grant change could not be announced to open streams, so it was not made."""


def grant_create_from_admin(*, user: str, process_instance: str, admin: str) -> Grant:
    """Grant `user` `process_instance` and tell open streams, as a `connect` record would.

    The row and the connect event are stored together: if Redis is unreachable nothing changes and
    GrantChangeFailed says why. Raises IntegrityError if an active grant already exists.
    """
    with transaction.atomic():
        now = timezone.now()
        grant = Grant.objects.create(
            user=user,
            process_instance=process_instance,
            granted_at=now,
            recorded_at=now,
            granted_by=f"admin {admin}"[:255],
            source=Grant.Source.ADMIN,
        )
        _announce(grant, granted=True)
    return grant


def grant_revoke_from_admin(*, grant_ids: Sequence[int], admin: str) -> int:
    """End the active grants among `grant_ids`; each one's open streams get `unsubscribed`.

    One short transaction per grant, holding its row until its disconnect event is stored (a stream
    opened in that window of milliseconds may still see the grant). Returns how many were ended;
    raises GrantChangeFailed at the first that could not be announced (those before it stay ended).
    """
    revoked = 0
    for grant_id in grant_ids:
        with transaction.atomic():
            grant = Grant.objects.select_for_update().filter(pk=grant_id, revoked_at__isnull=True).first()
            if grant is None:
                continue
            grant.revoked_at = grant.revoke_recorded_at = timezone.now()
            grant.revoked_by = f"admin {admin}"[:255]
            grant.save(update_fields=["revoked_at", "revoked_by", "revoke_recorded_at"])
            try:
                _announce(grant, granted=False)
            except GrantChangeFailed as exc:
                if revoked:
                    raise GrantChangeFailed(f"{exc} ({revoked} grant(s) before it were ended)") from exc
                raise
        revoked += 1
    return revoked


def _announce(grant: Grant, *, granted: bool) -> None:
    try:
        blocking.store_grant_change(user=grant.user, process_instance=grant.process_instance, granted=granted)
    except (RedisError, OSError) as exc:
        raise GrantChangeFailed(f"open streams could not be told, so {grant} was not changed: {exc}") from exc


# --- retention ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PurgeResult:
    audits: int
    subscriptions: int
    rejected_records: int
    chunks: int
    longest_chunk_seconds: float = 0.0
    broadcasts: int = 0


def audits_purge(
    *,
    before: datetime,
    chunk_size: int = 5000,
    dry_run: bool = False,
    pause_seconds: float = 0.0,
    progress: Callable[[str, int], None] | None = None,
) -> PurgeResult:
    """Delete delivery audits, broadcast rows and rejected records older than `before`, and the closed
    streams older than it that have no audits left, `chunk_size` rows per short transaction so no table
    is locked for long.

    With dry_run, count what would go and delete nothing. Grants are kept: they are the access history.
    After each chunk, `progress(table, deleted so far from it)` is called, then the purge sleeps
    `pause_seconds` (a sync caller's pause: it lets a busy database catch up between transactions).
    """
    old_audits = DeliveryAudit.objects.filter(sent_at__lt=before)
    old_rejected = RejectedRecord.objects.filter(received_at__lt=before)
    old_broadcasts = BroadcastDelivery.objects.filter(sent_at__lt=before)
    # opened_at bounds the scan to old rows through sub_opened; closed_at < before implies opened_at < before.
    old_streams = Subscription.objects.filter(opened_at__lt=before, closed_at__lt=before).filter(
        ~Exists(DeliveryAudit.objects.filter(subscription=OuterRef("pk")))
    )
    if dry_run:
        audits = old_audits.count()
        # The streams whose audits would all be gone.
        streams = (
            Subscription.objects.filter(opened_at__lt=before, closed_at__lt=before)
            .exclude(Exists(DeliveryAudit.objects.filter(subscription=OuterRef("pk"), sent_at__gte=before)))
            .count()
        )
        return PurgeResult(audits, streams, old_rejected.count(), 0, broadcasts=old_broadcasts.count())
    chunks, longest = 0, 0.0
    counts: list[int] = []
    for rows, order in (
        (old_audits, "sent_at"),
        (old_streams, "opened_at"),
        (old_rejected, "received_at"),
        (old_broadcasts, "sent_at"),
    ):
        total = 0
        while True:
            started = time.monotonic()
            with transaction.atomic():
                ids = list(rows.order_by(order).values_list("pk", flat=True)[:chunk_size])
                if not ids:
                    break
                _, deleted = rows.model._default_manager.filter(pk__in=ids).delete()
            longest = max(longest, time.monotonic() - started)
            total += deleted.get(rows.model._meta.label, 0)
            chunks += 1
            if progress is not None:
                progress(str(rows.model._meta.verbose_name_plural), total)
            if pause_seconds > 0:
                time.sleep(pause_seconds)
        counts.append(total)
    return PurgeResult(counts[0], counts[1], counts[2], chunks, longest, broadcasts=counts[3])
