"""Why a stream did or did not get an event: the answer behind the admin's delivery trace page.

`delivery_trace` answers for one stream, or for each of a user's streams open around the event: delivered,
replayed or dropped (from the audit rows, with when and how late), or the first reason it could not have
been, with the evidence. Who may see an event is decided by `routing.visible_to`, the rule the hub and
replay use; this module only asks it about the following the stream had at the event's time. Reads only.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db.models import Q, QuerySet, TextChoices
from django.db.models.functions import Coalesce
from django.utils import timezone
from redis import RedisError

from events.core import blocking, routing
from events.core.records import CloseReason, StoredEvent
from events.core.store import parse_id
from subscriptions import selectors
from subscriptions.models import BroadcastDelivery, DeliveryAudit, Grant, RejectedRecord, Subscription

# A user's streams this close to the event are traced: EventSource reconnects within seconds
# (EVENTS_RETRY_MS), and a stream opened soon after may have replayed the event.
AROUND = timedelta(minutes=5)
# At most this many of a user's streams are traced on one page (the newest first).
MAX_STREAMS = 50
# The hub reads new events within about a second (it polls every second without announcements): a
# stream that closed this soon after an event was stored may have closed before the event was handed out.
HANDOUT = timedelta(seconds=2)
# Audit rows reach the database about a second after the write (the audit writer's flush, then the sink);
# before this, a missing row may only be on its way.
AUDIT_DELAY = timedelta(seconds=10)
# A producer id is looked for in the values of this many of the newest rejected records (their values
# are not indexed; a rejected record kept no parsed fields).
REJECTED_SCAN = 10_000
GRANTS_SHOWN = 10
# The latest time a datetime can hold (year 9999), in epoch milliseconds: ids past it were never issued.
_MAX_MS = 253_402_300_799_999


class Verdict(TextChoices):
    DELIVERED = "delivered", "delivered"
    REPLAYED = "replayed", "replayed"
    DROPPED = "dropped", "dropped"
    EXPECTED = "expected", "should have been delivered (not audited)"
    PENDING = "pending", "audit not written yet"
    UNRECORDED = "unrecorded", "should have been delivered, no audit row"
    AUDIENCE = "audience", "not in the event's audience"
    NOT_FOLLOWED = "not_followed", "process instance not followed"
    NO_GRANT = "no_grant", "no grant"
    REVOKED = "revoked", "grant revoked"
    CLOSED = "closed", "stream closed"
    NOT_OPEN = "not_open", "stream not yet open"
    DEAD_LETTERED = "dead_lettered", "dead-lettered"
    NOT_CONSUMED = "not_consumed", "not consumed yet"
    NOT_HELD = "not_held", "no longer held"
    UNKNOWN_EVENT = "unknown_event", "unknown event"
    UNREADABLE = "unreadable", "unreadable stored entry"
    GRANT_CHANGE = "grant_change", "a grant change, not an event"
    UNKNOWN_STREAM = "unknown_stream", "unknown stream"


# The verdicts that say the stream got the event.
RECEIVED = frozenset({Verdict.DELIVERED, Verdict.REPLAYED})


class StoreUnavailable(Exception):
    """Redis could not be reached, so the event could not be read."""


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What is known of the event. `verdict` is set when that alone decides every stream (unknown, not held,
    dead-lettered, not a message); streams' audit rows are still read where there is an id."""

    reference: str
    event_id: str | None = None
    stored_at: datetime | None = None  # from the id: when the store accepted it
    event: StoredEvent | None = None
    producer_id: str = ""
    audience: str = ""
    rejected: tuple[RejectedRecord, ...] = ()
    verdict: Verdict | None = None
    summary: str = ""
    notes: tuple[str, ...] = ()

    @property
    def published_at(self) -> datetime | None:
        return _from_ms(self.event.published_ms) if self.event is not None else None


@dataclass(frozen=True, slots=True)
class StreamAnswer:
    """What became of the event on one stream, and why."""

    stream_id: uuid.UUID
    stream: Subscription | None
    verdict: Verdict
    summary: str
    at: datetime | None = None  # when it was written or dropped
    after_published_ms: float | None = None
    after_stored_ms: float | None = None
    evidence: tuple[str, ...] = ()

    @property
    def received(self) -> bool:
        return self.verdict in RECEIVED


@dataclass(frozen=True, slots=True)
class Trace:
    event: EventFacts
    answers: list[StreamAnswer]
    user: str | None = None
    # In user mode: whether the event's audience includes the user at all (None: the event is not known).
    user_in_audience: bool | None = None
    window: tuple[datetime, datetime] | None = None
    more_streams: bool = False


def delivery_trace(
    *,
    event_id: str | None = None,
    kafka_record: tuple[str, int, int] | None = None,
    producer_id: str | None = None,
    stream_id: uuid.UUID | None = None,
    user: str | None = None,
    now: datetime | None = None,
) -> Trace:
    """Trace one event (by store id, Kafka record `(topic, partition, offset)` or producer id) on stream
    `stream_id`, or on each of `user`'s streams open around it.

    Raises ValueError unless exactly one event reference and one of stream / user are given, and
    StoreUnavailable when Redis cannot be reached.
    """
    if sum(ref is not None for ref in (event_id, kafka_record, producer_id)) != 1:
        raise ValueError("name the event once: an event id, a Kafka record or a producer id")
    if (stream_id is None) == (user is None):
        raise ValueError("name a stream or a user")
    now = now or timezone.now()
    try:
        facts = _event_facts(
            event_id=event_id,
            kafka_record=kafka_record,
            producer_id=producer_id,
            streams=_streams_named(stream_id=stream_id, user=user),
            now=now,
        )
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"Redis could not be reached: {exc}") from exc
    if stream_id is not None:
        stream = Subscription.objects.filter(pk=stream_id).first()
        if stream is None:
            answer = StreamAnswer(
                stream_id,
                None,
                Verdict.UNKNOWN_STREAM,
                "No stream has this id: it never opened, its row was purged, or it opened less than a second "
                "ago (stream rows are written about a second after they open).",
            )
        else:
            answer = _answer(stream, facts, now)
        return Trace(facts, [answer])
    assert user is not None
    in_audience = _in_audience(user, facts.event) if facts.event is not None else None
    if facts.stored_at is None or facts.verdict not in (None, Verdict.NOT_HELD):
        return Trace(facts, [], user=user, user_in_audience=in_audience)
    window = (facts.stored_at - AROUND, facts.stored_at + AROUND)
    streams = list(_streams_around(user=user, start=window[0], end=window[1])[: MAX_STREAMS + 1])
    answers = [_answer(s, facts, now) for s in streams[:MAX_STREAMS]]
    return Trace(
        facts, answers, user=user, user_in_audience=in_audience, window=window, more_streams=len(streams) > MAX_STREAMS
    )


def _streams_named(*, stream_id: uuid.UUID | None, user: str | None) -> QuerySet[Subscription]:
    if stream_id is not None:
        return Subscription.objects.filter(pk=stream_id)
    return Subscription.objects.filter(user=user)


def _streams_around(*, user: str, start: datetime, end: datetime) -> QuerySet[Subscription]:
    """`user`'s streams open at some moment between `start` and `end`, the newest first (index sub_user_opened)."""
    return (
        Subscription.objects.filter(user=user, opened_at__lte=end)
        .filter(Q(closed_at__isnull=True) | Q(closed_at__gte=start))
        .order_by("-opened_at", "-pk")
    )


# --- the event -------------------------------------------------------------------------------------------
def _event_facts(
    *,
    event_id: str | None,
    kafka_record: tuple[str, int, int] | None,
    producer_id: str | None,
    streams: QuerySet[Subscription],
    now: datetime,
) -> EventFacts:
    notes: list[str] = []
    rejected: tuple[RejectedRecord, ...] = ()
    if kafka_record is not None:
        topic, partition, offset = kafka_record
        reference = f"{topic}/{partition}/{offset}"
        rejected = tuple(
            RejectedRecord.objects.filter(topic=topic, partition=partition, offset=offset).order_by("received_at")[:5]
        )
        if rejected:
            return _dead_lettered(reference, rejected, f"The Kafka record {reference}")
        event_id = (
            DeliveryAudit.objects.filter(
                subscription__in=streams, kafka_topic=topic, kafka_partition=partition, kafka_offset=offset
            )
            .values_list("event_id", flat=True)
            .first()
        )
        if event_id is None:
            return _record_not_found(reference, topic, partition, offset)
        notes.append(f"The Kafka record {reference} was stored as event {event_id} (from its delivery audit).")
    elif producer_id is not None:
        reference = f"producer id {producer_id}"
        rejected = _rejected_with_producer_id(producer_id)
        event_id = blocking.stored_event_id_of_producer(producer_id=producer_id)
        if event_id is None:
            if rejected:
                return _dead_lettered(reference, rejected, f"The record with producer id {producer_id!r}")
            return EventFacts(
                reference,
                producer_id=producer_id,
                verdict=Verdict.UNKNOWN_EVENT,
                summary=(
                    f"No event with producer id {producer_id!r} was stored within retention "
                    f"({_duration(timedelta(seconds=settings.EVENTS_RETENTION_SECONDS))}), and none of the "
                    f"newest {REJECTED_SCAN:,} rejected records carries it: the producer did not send it, it "
                    "is older, or it has not been consumed yet."
                ),
            )
        notes.append(f"Producer id {producer_id!r} was stored as event {event_id}; later copies are duplicates.")
        if rejected:
            notes.append(
                f"A record with this producer id was also dead-lettered ({_rejection(rejected[0])}); the "
                "stored one is traced."
            )
    else:
        assert event_id is not None
        reference = event_id
    return _stored_event(reference, event_id, now, tuple(notes), rejected)


def _stored_event(
    reference: str, event_id: str, now: datetime, notes: tuple[str, ...], rejected: tuple[RejectedRecord, ...]
) -> EventFacts:
    parsed = parse_id(event_id)
    if parsed is None:
        raise ValueError(f"{event_id!r} is not an event id")
    ms, seq = parsed
    event_id = f"{ms}-{seq}"  # as the store writes it: no leading zeros
    stored_at = _from_ms(ms)
    fields = selectors.stored_event_get(event_id=event_id)
    if fields is None:
        retention = timedelta(seconds=settings.EVENTS_RETENTION_SECONDS)
        if stored_at is None or stored_at > now + HANDOUT:
            return EventFacts(
                reference,
                event_id,
                notes=notes,
                verdict=Verdict.UNKNOWN_EVENT,
                summary=f"No event has id {event_id}: ids are times, and that one has not come yet.",
            )
        if stored_at < now - retention:
            return EventFacts(
                reference,
                event_id,
                stored_at,
                notes=notes,
                verdict=Verdict.NOT_HELD,
                summary=(
                    f"The store no longer holds {event_id} (stored at {moment(stored_at)}, older than the "
                    f"retention of {_duration(retention)}, EVENTS_RETENTION_SECONDS): what it was and who "
                    "could see it cannot be read; the audit rows still say which streams got it."
                ),
            )
        return EventFacts(
            reference,
            event_id,
            notes=notes,
            verdict=Verdict.UNKNOWN_EVENT,
            summary=(
                f"No event was stored with id {event_id}: the store holds every event since "
                f"{moment(now - retention)} and this id is not among them."
            ),
        )
    try:
        event = StoredEvent.from_fields(event_id, fields)
    except (KeyError, ValueError, TypeError) as exc:
        return EventFacts(
            reference,
            event_id,
            stored_at,
            notes=notes,
            verdict=Verdict.UNREADABLE,
            summary=f"The stored entry {event_id} cannot be read as an event ({type(exc).__name__}: {exc}); "
            "the web processes skipped it, so no stream got it.",
        )
    facts = EventFacts(
        reference,
        event_id,
        stored_at,
        event,
        producer_id=fields.get("producer_id", ""),
        audience=_audience(event),
        rejected=rejected,
        notes=notes,
    )
    if event.type == "connect":
        return _with_verdict(
            facts,
            Verdict.GRANT_CHANGE,
            f"{event_id} is a connect record: it granted {event.user} process instance "
            f"{event.process_instance}. Streams are not sent it; a stream opened afterwards may follow.",
        )
    if event.type == "disconnect":
        return _with_verdict(
            facts,
            Verdict.GRANT_CHANGE,
            f"{event_id} is a disconnect record: it revoked {event.user}'s grant for process instance "
            f"{event.process_instance}. Their streams following it were sent `unsubscribed` (not audited) "
            "and stopped following it.",
        )
    return facts


def _with_verdict(facts: EventFacts, verdict: Verdict, summary: str) -> EventFacts:
    return EventFacts(
        facts.reference,
        facts.event_id,
        facts.stored_at,
        facts.event,
        facts.producer_id,
        facts.audience,
        facts.rejected,
        verdict,
        summary,
        facts.notes,
    )


def _dead_lettered(reference: str, rejected: tuple[RejectedRecord, ...], what: str) -> EventFacts:
    first = rejected[0]
    return EventFacts(
        reference,
        rejected=rejected,
        verdict=Verdict.DEAD_LETTERED,
        summary=(
            f"{what} was rejected at {moment(first.received_at)} and sent to the dead-letter topic with the "
            f"reason {_rejection(first)}; it was never stored, so no stream could receive it."
        ),
    )


def _record_not_found(reference: str, topic: str, partition: int, offset: int) -> EventFacts:
    stored = blocking.stored_offset_get(topic=topic, partition=partition)
    if offset > stored:
        where = "nothing of that partition yet" if stored < 0 else f"up to offset {stored}"
        return EventFacts(
            reference,
            verdict=Verdict.NOT_CONSUMED,
            summary=(
                f"The Kafka record {reference} has not been consumed yet: the store holds {where} (the consumer "
                "lags or is down, or the gateway does not consume that topic)."
            ),
        )
    return EventFacts(
        reference,
        verdict=Verdict.UNKNOWN_EVENT,
        summary=(
            f"The Kafka record {reference} was consumed (the store holds up to offset {stored}) and not "
            "dead-lettered, so it was stored as an event or skipped as a repeat of a producer id; no delivery "
            "on these streams names it. Trace it by its event id or its producer id."
        ),
    )


def _rejected_with_producer_id(producer_id: str) -> tuple[RejectedRecord, ...]:
    """Rejected records among the newest REJECTED_SCAN whose value has `"id": <producer_id>`."""
    quoted = json.dumps(producer_id, ensure_ascii=False)
    newest = RejectedRecord.objects.order_by("-received_at").values("pk")[:REJECTED_SCAN]
    candidates = RejectedRecord.objects.filter(pk__in=newest, value_preview__contains=quoted).order_by("-received_at")[
        :20
    ]
    pattern = re.compile(r'"id"\s*:\s*' + re.escape(quoted))
    return tuple(r for r in candidates if pattern.search(r.value_preview))[:5]


def _rejection(record: RejectedRecord) -> str:
    detail = record.detail if len(record.detail) <= 200 else record.detail[:199] + "…"
    return f"{record.reason} ({detail}), Kafka record {record.topic}/{record.partition}/{record.offset}"


def _audience(event: StoredEvent) -> str:
    if event.broadcast:
        return "a broadcast: every open stream"
    if event.process_instance is not None and event.user is not None:
        return f"process instance {event.process_instance}, only on {event.user}'s streams following it"
    if event.process_instance is not None:
        return f"the streams following process instance {event.process_instance}"
    return f"{event.user}'s streams only"


def _visible(user: str, event: StoredEvent, followed: set[str] | frozenset[str]) -> bool:
    return routing.visible_to(
        stream_user=user,
        event_user=event.user,
        process_instance=event.process_instance,
        broadcast=event.broadcast,
        followed=followed,
    )


def _in_audience(user: str, event: StoredEvent) -> bool:
    """Whether a stream of `user` could see `event` if it followed the event's process instance."""
    return _visible(user, event, frozenset({event.process_instance} if event.process_instance else ()))


# --- one stream ------------------------------------------------------------------------------------------
def _answer(stream: Subscription, facts: EventFacts, now: datetime) -> StreamAnswer:
    if facts.event_id is not None:
        row = (
            DeliveryAudit.objects.filter(event_id=facts.event_id, subscription=stream).order_by("sent_at", "pk").first()
        )
        if row is not None:
            return _audited(stream, facts, row)
        live = _live_broadcast(stream, facts.event_id)
        if live is not None:
            return _received(
                stream,
                facts,
                Verdict.DELIVERED,
                at=live.sent_at,
                latency_ms=live.latency_ms,
                how=f"delivered live as a broadcast by {live.instance}, to its {live.streams} open stream(s)",
            )
    if facts.verdict is not None:
        summary = facts.summary
        if facts.verdict == Verdict.NOT_HELD:
            summary += " No audit row says this stream got it."
        return StreamAnswer(stream.pk, stream, facts.verdict, summary, evidence=facts.notes)
    event, stored_at = facts.event, facts.stored_at
    assert event is not None
    assert stored_at is not None
    evidence: list[str] = [*facts.notes, f"The event is for {facts.audience}."]

    # Who may see it: the same rule live delivery and replay apply, asked about this stream's following.
    if not _in_audience(stream.user, event):
        if event.process_instance is None:
            summary = f"The event was addressed to {event.user}, not to {stream.user}: no stream of theirs gets it."
        else:
            summary = (
                f"The event on process instance {event.process_instance} was for {event.user}'s streams only "
                f"(a user filter), so no stream of {stream.user}'s gets it, following or not."
            )
        return StreamAnswer(stream.pk, stream, Verdict.AUDIENCE, summary, evidence=tuple(evidence))
    if event.process_instance is not None:
        followed, verdict, summary, grant_evidence = _following(stream, event.process_instance, stored_at)
        evidence += grant_evidence
        if not _visible(stream.user, event, followed):
            assert verdict is not None
            return StreamAnswer(stream.pk, stream, verdict, summary, evidence=tuple(evidence))

    # When: the stream has to be open when the hub hands the event out, or replay it on resuming.
    closed = stream.closed_at
    if closed is not None and closed < stored_at:
        return StreamAnswer(
            stream.pk,
            stream,
            Verdict.CLOSED,
            f"The stream closed at {moment(closed)} ({_close_reason(stream)}), {_duration(stored_at - closed)} "
            f"before the event was stored at {moment(stored_at)}.",
            evidence=tuple(evidence),
        )
    expected = "delivered"
    if stream.opened_at > stored_at:
        resumed = parse_id(stream.resumed_from)
        event_position = parse_id(facts.event_id or "")
        late = f"opened at {moment(stream.opened_at)}, {_duration(stream.opened_at - stored_at)} after the event"
        if resumed is None or event_position is None or resumed >= event_position:
            start = (
                f"resumed from {stream.resumed_from}, which is not before the event"
                if stream.resumed_from
                else "had no Last-Event-ID, so it started at the newest event"
            )
            return StreamAnswer(
                stream.pk,
                stream,
                Verdict.NOT_OPEN,
                f"The stream {late} was stored at {moment(stored_at)}, and it {start}.",
                evidence=tuple(evidence),
            )
        retention = timedelta(seconds=settings.EVENTS_RETENTION_SECONDS)
        resumed_at = _from_ms(resumed[0])
        if resumed_at is not None and resumed_at < stream.opened_at - retention:
            return StreamAnswer(
                stream.pk,
                stream,
                Verdict.NOT_OPEN,
                f"The stream {late} and resumed from {stream.resumed_from}, older than the retention of "
                f"{_duration(retention)}: it was sent `stream-reset` and replayed nothing.",
                evidence=tuple(evidence),
            )
        expected = "replayed"
        evidence.append(f"The stream {late}, resuming from {stream.resumed_from}, before it: it replays it.")
    elif closed is not None and closed < stored_at + HANDOUT:
        return StreamAnswer(
            stream.pk,
            stream,
            Verdict.CLOSED,
            f"The stream closed at {moment(closed)} ({_close_reason(stream)}), {_duration(closed - stored_at)} "
            f"after the event was stored: before its web process had handed the event out (about a second).",
            evidence=tuple(evidence),
        )
    return _unaudited(stream, facts, expected, evidence, now)


def _following(
    stream: Subscription, process_instance: str, at: datetime
) -> tuple[set[str], Verdict | None, str, list[str]]:
    """The process instances `stream` followed at `at` (those it asked for when it opened, less any whose
    grant was revoked since), and, if `process_instance` is not among them, why, with the grant history."""
    asked = set(stream.process_instances or [])
    grants = _grants(user=stream.user, process_instance=process_instance)
    shown = list(grants.order_by("-recorded_at", "-pk")[:GRANTS_SHOWN])
    evidence = [_grant_line(g) for g in shown] or [f"{stream.user} never held a grant for {process_instance}."]
    if process_instance in asked:
        if not _active_at(grants, stream.opened_at).exists():
            evidence.append(
                f"The stream followed {process_instance} without a grant when it opened: its user had the "
                "permission to follow every process instance."
            )
        revoked = grants.filter(_ended_after(stream.opened_at) & ~_ended_after(at)).order_by(_ENDED, "pk").first()
        if revoked is None:
            return asked, None, "", evidence
        assert revoked.ended_at is not None
        summary = (
            f"{stream.user}'s grant for {process_instance} was revoked at {moment(revoked.ended_at)} "
            f"({revoked.revoked_by or 'revoked'}), {_duration(at - revoked.ended_at)} before the event was "
            f"stored: the stream was sent `unsubscribed` and stopped following {process_instance}."
        )
        if _active_at(grants, at).exists():
            summary += " The grant given again later does not reach open streams: a new stream would follow it."
        return asked - {process_instance}, Verdict.REVOKED, summary, evidence
    following = ", ".join(sorted(asked)) or "no process instance"
    active = _active_at(grants, at).order_by("recorded_at", "pk").first()
    if active is not None:
        summary = (
            f"The stream did not follow {process_instance}: it asked for {following} when it opened at "
            f"{moment(stream.opened_at)}, though {stream.user} held a grant for it"
        )
        if active.recorded_at > stream.opened_at:
            summary += (
                f" from {moment(active.recorded_at)}, after the stream opened; a stream follows what it asked "
                "for when it opened, so only a new stream (with processInstanceUuid) gets such events."
            )
        else:
            summary += "; the page did not ask for it (processInstanceUuid)."
        return asked, Verdict.NOT_FOLLOWED, summary, evidence
    summary = (
        f"{stream.user} held no grant for process instance {process_instance} when the event was stored at "
        f"{moment(at)}, and the stream did not follow it (it followed {following}): a stream may follow a "
        "process instance only with a grant, checked when it opens."
    )
    return asked, Verdict.NO_GRANT, summary, evidence


def _grants(*, user: str, process_instance: str) -> QuerySet[Grant]:
    """`user`'s grants for `process_instance` (index grant_user_pi)."""
    return Grant.objects.filter(user=user, process_instance=process_instance)


# When a revocation took effect (Grant.ended_at), in SQL.
_ENDED = Coalesce("revoke_recorded_at", "revoked_at")


def _ended_after(at: datetime) -> Q:
    """Grants revoked after `at`, or never."""
    return (
        Q(revoke_recorded_at__gt=at)
        | Q(revoke_recorded_at__isnull=True, revoked_at__gt=at)
        | Q(revoke_recorded_at__isnull=True, revoked_at__isnull=True)
    )


def _active_at(grants: QuerySet[Grant], at: datetime) -> QuerySet[Grant]:
    return grants.filter(_ended_after(at), recorded_at__lte=at)


def _grant_line(grant: Grant) -> str:
    line = f"Grant {grant.pk}: applied at {moment(grant.recorded_at)} ({grant.granted_by})"
    if grant.ended_at is not None:
        line += f", revoked at {moment(grant.ended_at)} ({grant.revoked_by or 'revoked'})"
    return line + "."


def _audited(stream: Subscription, facts: EventFacts, row: DeliveryAudit) -> StreamAnswer:
    if row.status == DeliveryAudit.Status.DROPPED:
        ended = f"ended ({_close_reason(stream)})" if stream.close_reason else "ended"
        return StreamAnswer(
            stream.pk,
            stream,
            Verdict.DROPPED,
            f"Dropped at {moment(row.sent_at)}: it was queued for the stream, which {ended} before writing it. "
            "The browser gets it by replay when it reconnects with its Last-Event-ID.",
            at=row.sent_at,
            after_published_ms=row.latency_ms,
            after_stored_ms=_ms_between(facts.stored_at, row.sent_at),
            evidence=facts.notes,
        )
    if row.status == DeliveryAudit.Status.REPLAYED:
        how = f"replayed when the stream resumed from {stream.resumed_from or 'an earlier id'}"
        return _received(stream, facts, Verdict.REPLAYED, at=row.sent_at, latency_ms=row.latency_ms, how=how)
    return _received(stream, facts, Verdict.DELIVERED, at=row.sent_at, latency_ms=row.latency_ms, how="delivered live")


def _received(
    stream: Subscription,
    facts: EventFacts,
    verdict: Verdict,
    *,
    at: datetime,
    latency_ms: float | None,
    how: str,
) -> StreamAnswer:
    stored_ms = _ms_between(facts.stored_at, at)
    lateness = []
    if latency_ms is not None:
        lateness.append(f"{_ms(latency_ms)} after it was published")
    if stored_ms is not None:
        lateness.append(f"{_ms(stored_ms)} after it was stored")
    late = f": {' and '.join(lateness)}" if lateness else ""
    return StreamAnswer(
        stream.pk,
        stream,
        verdict,
        f"{how[0].upper()}{how[1:]} at {moment(at)}{late}.",
        at=at,
        after_published_ms=latency_ms,
        after_stored_ms=stored_ms,
        evidence=facts.notes,
    )


def _live_broadcast(stream: Subscription, event_id: str) -> BroadcastDelivery | None:
    """The broadcast row by which `stream` received `event_id` live, if it did (selectors.broadcast_recipients)."""
    if not selectors.broadcast_recipients(event_id=event_id).filter(pk=stream.pk).exists():
        return None
    rows = BroadcastDelivery.objects.filter(event_id=event_id, instance=stream.instance, sent_at__gte=stream.opened_at)
    if stream.closed_at is not None:
        rows = rows.filter(sent_at__lte=stream.closed_at)
    return rows.order_by("sent_at").first()


def _unaudited(
    stream: Subscription, facts: EventFacts, expected: str, evidence: list[str], now: datetime
) -> StreamAnswer:
    """The stream could see the event and was there for it, and no audit row says what became of it."""
    assert facts.stored_at is not None
    mode = settings.AUDIT_DELIVERIES
    if mode != "all":
        audited = "no delivery is audited" if mode == "off" else "only drops are audited, and none was recorded"
        return StreamAnswer(
            stream.pk,
            stream,
            Verdict.EXPECTED,
            f"The stream could see the event and was open for it, so it was {expected}; AUDIT_DELIVERIES is "
            f"{mode}: {audited}.",
            evidence=tuple(evidence),
        )
    if now - facts.stored_at < AUDIT_DELAY:
        return StreamAnswer(
            stream.pk,
            stream,
            Verdict.PENDING,
            f"The stream could see the event and was open for it; it was stored {_duration(now - facts.stored_at)} "
            "ago and audit rows arrive about a second after the write: look again.",
            evidence=tuple(evidence),
        )
    if stream.closed_at is None:
        evidence.append(
            f"The stream is still listed open on {stream.instance}: if that web process stopped without closing "
            "it, what it last did was not audited."
        )
    return StreamAnswer(
        stream.pk,
        stream,
        Verdict.UNRECORDED,
        f"The stream could see the event and was open for it, so it should have been {expected}, but no audit "
        "row says so: the web process's audit batch was lost or set aside (see the consumer's audit-sink log "
        "and gateway_task_failures_total), or the process stopped without flushing it.",
        evidence=tuple(evidence),
    )


# --- formatting ------------------------------------------------------------------------------------------
def moment(value: datetime | None) -> str:
    """A timestamp to the millisecond, in TIME_ZONE (UTC): audits are read at that resolution."""
    if value is None:
        return "-"
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _from_ms(ms: int) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if 0 <= ms <= _MAX_MS else None


def _ms_between(start: datetime | None, end: datetime) -> float | None:
    return None if start is None else (end - start).total_seconds() * 1000


def _ms(value: float) -> str:
    return f"{value:,.1f} ms"


def _duration(delta: timedelta) -> str:
    seconds = abs(delta.total_seconds())
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _close_reason(stream: Subscription) -> str:
    if not stream.close_reason:
        return "reason not recorded"
    try:
        return str(CloseReason(stream.close_reason).label)
    except ValueError:
        return stream.close_reason
