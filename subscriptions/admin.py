"""Admin: streams, deliveries and rejected records are read-only records; grants are granted and revoked here.

The audit tables hold millions of rows, so no page here reads a whole table: counts stop at a cap
(PostgreSQL shows the planner's estimate for a whole table), filters offer values found by index seeks,
the date hierarchy finds its first and last dates and its periods by one index seek each, searches are
exact matches on indexed columns, and only indexed columns can be sorted on.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import cached_property
from math import ceil
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from redis import RedisError

from events.core import envelope
from events.core.store import ID_PATTERN
from subscriptions import selectors, services, trace
from subscriptions.models import BroadcastDelivery, DeliveryAudit, Grant, RejectedRecord, Subscription
from subscriptions.trace import moment

admin.site.site_header = "events-gateway admin"
admin.site.site_title = "events-gateway"
admin.site.index_title = "Streams, deliveries, grants and rejected records"
# The index links the overview (rejected records by reason, open streams per web process).
admin.site.index_template = "admin/subscriptions/index.html"

# A changelist counts at most this many rows and pages at most this deep; narrow the list (date, filter,
# search) to see further. Deep OFFSETs are as slow as counts, so the cap bounds both.
COUNT_CAP = 10_000
# The overview counts rejected records over this period (the reason index serves it).
OVERVIEW_PERIOD = timedelta(days=1)


class AtLeast(int):
    """A count that stopped at the cap."""

    def __str__(self) -> str:
        return f"{int(self):,}+"


class About(int):
    """The planner's estimate of a whole table's rows."""

    def __str__(self) -> str:
        return f"about {int(self):,}"


class CappedPaginator(Paginator):
    """Counts at most `cap` + 1 rows, and offers pages only as deep as `cap` rows."""

    cap = COUNT_CAP

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        assert isinstance(queryset, QuerySet)
        estimate = selectors.count_estimated(queryset=queryset)
        if estimate is not None and estimate > self.cap:
            return About(estimate)
        counted = selectors.count_capped(queryset=queryset, cap=self.cap)
        return AtLeast(self.cap) if counted > self.cap else counted

    @cached_property
    def num_pages(self) -> int:
        if self.count == 0 and not self.allow_empty_first_page:
            return 0
        hits = max(1, min(self.count, self.cap) - self.orphans)
        return ceil(hits / self.per_page)


class IndexedPeriodsQuerySet(QuerySet[Any]):
    """The date hierarchy asks for the first and last dates and for the periods that have rows: answer
    both by index seeks instead of scans."""

    def aggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if args or not kwargs or not all(_plain_min_or_max(a) for a in kwargs.values()):
            return super().aggregate(*args, **kwargs)
        return {
            name: selectors.edge_value(
                queryset=self, field=a.source_expressions[0].name, last=isinstance(a, models.Max)
            )
            for name, a in kwargs.items()
        }

    def datetimes(  # type: ignore[override]
        self, field_name: str, kind: Any, order: Any = "ASC", tzinfo: Any = None
    ) -> list[datetime] | QuerySet[Any]:
        if kind in {"year", "month", "day"} and order == "ASC" and tzinfo is None:
            return selectors.periods_with_rows(queryset=self, field=field_name, kind=kind)
        return super().datetimes(field_name, kind, order, tzinfo)


def _plain_min_or_max(aggregate: Any) -> bool:
    sources = aggregate.source_expressions if isinstance(aggregate, models.Min | models.Max) else []
    return (
        len(sources) == 1 and isinstance(sources[0], models.F) and aggregate.filter is None and not aggregate.distinct
    )


class IndexOrderChangeList(ChangeList):
    def get_ordering(self, request: HttpRequest, queryset: QuerySet[Any]) -> list[Any]:
        ordering: list[Any] = super().get_ordering(request, queryset)
        # Django breaks ties with "-pk" whichever way the list is sorted; breaking them in the direction of
        # the first key lets one (field, id) index serve the whole ORDER BY, ascending or descending.
        first = ordering[0] if ordering else None
        if isinstance(first, str) and not first.startswith("-") and ordering[-1] == "-pk":
            ordering[-1] = "pk"
        return ordering


class LargeTableAdmin(admin.ModelAdmin):
    """Changelists that stay fast with millions of rows; searches go through `matching` (a selector)."""

    paginator = CappedPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    matching: Callable[..., QuerySet[Any]]

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return IndexOrderChangeList

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        queryset = super().get_queryset(request)
        return IndexedPeriodsQuerySet(model=queryset.model, query=queryset.query, using=queryset.db)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        for term in search_term.split():
            queryset = self.matching(queryset=queryset, term=term.strip("\"'"))
        return queryset, False


class ReadOnlyAdmin(LargeTableAdmin):
    """Records of what happened: staff with the view permission may look, nobody may add, edit or delete."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _changelist(model: type[models.Model], **params: object) -> str:
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist") + f"?{query}"


def stream_id(value: object) -> str:
    """A stream id on one line (a UUID's hyphens would let it wrap), in a fixed-width font."""
    return format_html('<span class="stream-id" style="white-space: nowrap; font-family: monospace">{}</span>', value)


def latency(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def _change(obj: models.Model) -> str:
    return reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])


# --- filters ---------------------------------------------------------------------------------------------
class StreamStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("open", "open streams"), ("closed", "closed streams")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "open":
            return queryset.filter(closed_at__isnull=True)
        if self.value() == "closed":
            return queryset.filter(closed_at__isnull=False)
        return queryset


class IndexedValuesFilter(admin.SimpleListFilter):
    """Offers the distinct values of an indexed column, found by one index seek each."""

    field: str

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(v, v) for v in selectors.distinct_values(model=model_admin.model, field=self.field)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(**{self.field: value}) if value else queryset


class InstanceFilter(IndexedValuesFilter):
    title = "serving instance"
    parameter_name = field = "instance"


class TopicFilter(IndexedValuesFilter):
    title = "topic"
    parameter_name = field = "topic"


class AuthMethodFilter(admin.SimpleListFilter):
    title = "authenticated by"
    parameter_name = "auth_method"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("session", "session cookie"), ("bearer", "bearer token"), ("ticket", "ticket")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(auth_method=self.value()) if self.value() else queryset


class ReasonFilter(admin.SimpleListFilter):
    title = "reason"
    parameter_name = "reason"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(r.value, r.value.replace("_", " ")) for r in envelope.Rejection]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(reason=self.value()) if self.value() else queryset


class GrantStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "active"), ("revoked", "revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


# --- the delivery trace ----------------------------------------------------------------------------------
# Who may trace: it reads streams, deliveries, grants and rejected records.
TRACE_PERMISSIONS = (
    "subscriptions.view_subscription",
    "subscriptions.view_deliveryaudit",
    "subscriptions.view_grant",
    "subscriptions.view_rejectedrecord",
)
# The topic names Kafka accepts.
KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}\Z")


def _trace(**params: object) -> str:
    return reverse("admin:subscriptions_trace") + "?" + urlencode({k: str(v) for k, v in params.items()})


def _trace_url(request: HttpRequest) -> str | None:
    return reverse("admin:subscriptions_trace") if request.user.has_perms(TRACE_PERMISSIONS) else None


class TraceForm(forms.Form):
    """A stream or a user, and an event: its id, its Kafka record or its producer id."""

    stream = forms.UUIDField(required=False, label="Stream id")
    user = forms.CharField(
        required=False,
        max_length=envelope.USER_MAX_LENGTH,
        label="or user",
        help_text="Each of the user's streams open within 5 minutes of the event.",
    )
    event = forms.CharField(
        required=False,
        max_length=300,
        label="Event",
        help_text="An event id (the SSE id:, e.g. 1732683600000-0), or a Kafka record as topic/partition/offset.",
    )
    producer_id = forms.CharField(
        required=False,
        max_length=envelope.PRODUCER_ID_MAX_LENGTH,
        label="or producer id",
        help_text="The id field the producer put in the envelope.",
    )

    def clean_event(self) -> str:
        value: str = self.cleaned_data["event"]
        if value and not ID_PATTERN.match(value) and self._kafka_record(value) is None:
            raise forms.ValidationError(
                "Enter an event id such as 1732683600000-0 (digits, a hyphen, digits), "
                "or a Kafka record as topic/partition/offset."
            )
        return value

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean() or {}
        if self.errors:
            return data
        if (data.get("stream") is None) == (not data.get("user")):
            raise forms.ValidationError("Name either a stream id or a user.")
        if bool(data.get("event")) == bool(data.get("producer_id")):
            raise forms.ValidationError("Name the event either by its id or Kafka record, or by its producer id.")
        return data

    def arguments(self) -> dict[str, Any]:
        """The valid form as delivery_trace's keyword arguments."""
        data = self.cleaned_data
        arguments: dict[str, Any] = {"stream_id": data["stream"], "user": data["user"] or None}
        if data["producer_id"]:
            arguments["producer_id"] = data["producer_id"]
        elif ID_PATTERN.match(data["event"]):
            arguments["event_id"] = data["event"]
        else:
            arguments["kafka_record"] = self._kafka_record(data["event"])
        return arguments

    @staticmethod
    def _kafka_record(value: str) -> tuple[str, int, int] | None:
        match = selectors.KAFKA_COORDINATES.match(value)
        if match is None or not KAFKA_TOPIC.match(match["topic"]):
            return None
        return match["topic"], int(match["partition"]), int(match["offset"])


# --- streams ---------------------------------------------------------------------------------------------
@admin.register(Subscription)
class SubscriptionAdmin(ReadOnlyAdmin):
    matching = staticmethod(selectors.subscriptions_matching)
    list_display = (
        "stream",
        "user",
        "is_open",
        "opened",
        "closed",
        "close_reason",
        "instance",
        "auth_method",
        "events_delivered",
        "deliveries_link",
    )
    list_filter = (StreamStateFilter, InstanceFilter, "close_reason", AuthMethodFilter)
    search_fields = ("id", "user", "instance")
    search_help_text = "Exact stream id, user or serving instance (host:pid)."
    date_hierarchy = "opened_at"
    ordering = ("-opened_at",)
    sortable_by = ("opened",)
    fields = (
        "id",
        "user",
        "process_instances",
        "auth_method",
        "opened",
        "closed",
        "close_reason",
        "resumed_from",
        "last_event_id",
        "events_delivered",
        "deliveries_link",
        "trace_link",
        "client_address",
        "user_agent",
        "instance",
    )
    readonly_fields = fields

    change_list_template = "admin/subscriptions/change_list_trace.html"

    def get_urls(self) -> list[URLPattern]:
        overview = path("overview/", self.admin_site.admin_view(self.overview_view), name="subscriptions_overview")
        traced = path("trace/", self.admin_site.admin_view(self.trace_view), name="subscriptions_trace")
        return [overview, traced, *super().get_urls()]

    def trace_view(self, request: HttpRequest) -> HttpResponse:
        """The delivery trace: what became of one event on one stream, or on a user's streams, and why."""
        if not request.user.has_perms(TRACE_PERMISSIONS):
            raise PermissionDenied
        form = TraceForm(request.GET or None)
        answer = None
        if form.is_valid():
            try:
                answer = trace.delivery_trace(**form.arguments())
            except trace.StoreUnavailable as exc:
                form.add_error(None, str(exc))
        context = {
            **self.admin_site.each_context(request),
            "title": "Delivery trace",
            "form": form,
            "trace": answer,
        }
        return TemplateResponse(request, "admin/subscriptions/trace.html", context)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        return super().changelist_view(request, {**(extra_context or {}), "trace_url": _trace_url(request)})

    def overview_view(self, request: HttpRequest) -> HttpResponse:
        """Rejected records by reason over the last day, and open streams per web process."""
        since = timezone.now() - OVERVIEW_PERIOD
        rejected = selectors.rejected_records_by_reason(since=since)
        open_streams = [(i, n, moment(oldest)) for i, n, oldest in selectors.open_streams_by_instance()]
        context = {
            **self.admin_site.each_context(request),
            "title": "Overview",
            "since": moment(since),
            "rejected": rejected,
            "rejected_total": sum(n for _, n in rejected),
            "rejected_url": _changelist(RejectedRecord).rstrip("?"),
            "open_streams": open_streams,
            "open_total": sum(n for _, n, _ in open_streams),
            "streams_url": _changelist(Subscription).rstrip("?"),
        }
        return TemplateResponse(request, "admin/subscriptions/overview.html", context)

    @admin.display(boolean=True, description="open")
    def is_open(self, obj: Subscription) -> bool:
        return obj.closed_at is None

    @admin.display(description="stream id", ordering="id")
    def stream(self, obj: Subscription) -> str:
        return stream_id(obj.pk)

    @admin.display(description="opened at (UTC)", ordering="opened_at")
    def opened(self, obj: Subscription) -> str:
        return moment(obj.opened_at)

    @admin.display(description="closed at (UTC)", ordering="closed_at")
    def closed(self, obj: Subscription) -> str:
        return moment(obj.closed_at)

    @admin.display(description="deliveries")
    def deliveries_link(self, obj: Subscription) -> str:
        return format_html('<a href="{}">deliveries</a>', _changelist(DeliveryAudit, subscription__exact=obj.pk))

    @admin.display(description="delivery trace")
    def trace_link(self, obj: Subscription) -> str:
        return format_html('<a href="{}">why did this stream (not) get an event?</a>', _trace(stream=obj.pk))


# --- deliveries ------------------------------------------------------------------------------------------
@admin.register(DeliveryAudit)
class DeliveryAuditAdmin(ReadOnlyAdmin):
    matching = staticmethod(selectors.deliveries_matching)
    list_display = (
        "event_id",
        "sent",
        "latency",
        "status",
        "event",
        "stream_user",
        "process_instance",
        "stream_link",
        "stream_instance",
    )
    list_filter = ("status",)
    list_select_related = ("subscription",)
    search_fields = ("event_id", "process_instance", "subscription__user")
    search_help_text = "Exact event id, user (deliveries on that user's streams), process instance, or stream id."
    date_hierarchy = "sent_at"
    ordering = ("-sent_at",)
    sortable_by = ("sent",)
    fields = (
        "event_id",
        "event",
        "status",
        "sent",
        "latency",
        "stream_link",
        "stream_user",
        "stream_instance",
        "same_event_link",
        "user",
        "process_instance",
        "kafka_record",
        "stored_event",
        "trace_link",
    )
    readonly_fields = fields
    change_list_template = "admin/subscriptions/change_list_trace.html"

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        return super().changelist_view(request, {**(extra_context or {}), "trace_url": _trace_url(request)})

    @admin.display(description="delivery trace")
    def trace_link(self, obj: DeliveryAudit) -> str:
        return format_html(
            '<a href="{}">trace {} on this stream</a>',
            _trace(stream=obj.subscription_id, event=obj.event_id),
            obj.event_id,
        )

    @admin.display(description="sent at (UTC)", ordering="sent_at")
    def sent(self, obj: DeliveryAudit) -> str:
        return moment(obj.sent_at)

    @admin.display(description="latency")
    def latency(self, obj: DeliveryAudit) -> str:
        return latency(obj.latency_ms)

    @admin.display(description="stream user")
    def stream_user(self, obj: DeliveryAudit) -> str:
        return obj.subscription.user

    @admin.display(description="instance")
    def stream_instance(self, obj: DeliveryAudit) -> str:
        return obj.subscription.instance

    @admin.display(description="stream")
    def stream_link(self, obj: DeliveryAudit) -> str:
        return format_html(
            '<a href="{}">{}</a>',
            reverse("admin:subscriptions_subscription_change", args=[obj.subscription_id]),
            stream_id(obj.subscription_id),
        )

    @admin.display(description="all deliveries of this event")
    def same_event_link(self, obj: DeliveryAudit) -> str:
        return format_html(
            '<a href="{}">every stream that got {}</a>', _changelist(DeliveryAudit, event_id=obj.event_id), obj.event_id
        )

    @admin.display(description="Kafka record")
    def kafka_record(self, obj: DeliveryAudit) -> str:
        if obj.kafka_partition is None or obj.kafka_offset is None:
            return f"none: made by the gateway ({obj.kafka_topic})" if obj.kafka_topic else "none"
        return f"{obj.kafka_topic}/{obj.kafka_partition}/{obj.kafka_offset}"

    @admin.display(description="stored event (Redis, within retention)")
    def stored_event(self, obj: DeliveryAudit) -> str:
        try:
            stored = selectors.stored_event_get(event_id=obj.event_id)
        except (RedisError, OSError) as exc:
            return f"Redis could not be reached: {exc}"
        if stored is None:
            return "no longer stored (older than EVENTS_RETENTION_SECONDS)"
        shown: dict[str, Any] = dict(stored)
        with contextlib.suppress(ValueError, KeyError):
            shown["data"] = json.loads(stored["data"])
        return format_html("<pre>{}</pre>", json.dumps(shown, indent=2, ensure_ascii=False))


# --- broadcasts ------------------------------------------------------------------------------------------
@admin.register(BroadcastDelivery)
class BroadcastDeliveryAdmin(ReadOnlyAdmin):
    """A broadcast is audited once per web process; its recipients are that process's open streams."""

    matching = staticmethod(selectors.broadcasts_matching)
    list_display = ("event_id", "sent", "latency", "event", "instance", "streams")
    search_fields = ("event_id", "instance")
    search_help_text = "Exact event id or serving instance (host:pid)."
    date_hierarchy = "sent_at"
    ordering = ("-sent_at",)
    sortable_by = ("sent",)
    fields = (
        "event_id",
        "event",
        "instance",
        "streams",
        "sent",
        "latency",
        "kafka_topic",
        "kafka_partition",
        "kafka_offset",
        "recipients",
    )
    readonly_fields = fields

    @admin.display(description="sent at (UTC)", ordering="sent_at")
    def sent(self, obj: BroadcastDelivery) -> str:
        return moment(obj.sent_at)

    @admin.display(description="latency")
    def latency(self, obj: BroadcastDelivery) -> str:
        return latency(obj.latency_ms)

    @admin.display(description="streams that received it (all web processes)")
    def recipients(self, obj: BroadcastDelivery) -> str:
        shown = 100
        streams = list(selectors.broadcast_recipients(event_id=obj.event_id).order_by("opened_at")[: shown + 1])
        links = format_html_join(
            ", ", '<a href="{}">{} ({})</a>', ((_change(s), stream_id(s.pk), s.user) for s in streams[:shown])
        )
        more = f" and more (first {shown} shown)" if len(streams) > shown else ""
        return format_html("{}{}", links, more) if streams else "none"


# --- rejected records ------------------------------------------------------------------------------------
@admin.register(RejectedRecord)
class RejectedRecordAdmin(ReadOnlyAdmin):
    matching = staticmethod(selectors.rejected_records_matching)
    list_display = ("received", "coordinates", "reason", "short_detail", "value_size")
    list_filter = (ReasonFilter, TopicFilter)
    search_fields = ("topic", "reason")
    search_help_text = "topic/partition/offset, or an exact topic or reason."
    date_hierarchy = "received_at"
    ordering = ("-received_at",)
    sortable_by = ("received",)
    fields = (
        "received",
        "coordinates",
        "reason",
        "detail",
        "key",
        "value_size",
        "value_preview_pre",
        "headers",
    )
    readonly_fields = fields

    @admin.display(description="received at (UTC)", ordering="received_at")
    def received(self, obj: RejectedRecord) -> str:
        return moment(obj.received_at)

    @admin.display(description="Kafka record")
    def coordinates(self, obj: RejectedRecord) -> str:
        return f"{obj.topic}/{obj.partition}/{obj.offset}"

    @admin.display(description="detail")
    def short_detail(self, obj: RejectedRecord) -> str:
        return obj.detail if len(obj.detail) <= 120 else obj.detail[:119] + "…"

    @admin.display(description="value (first 4 KiB)")
    def value_preview_pre(self, obj: RejectedRecord) -> str:
        return format_html("<pre>{}</pre>", obj.value_preview)


# --- grants ----------------------------------------------------------------------------------------------
class GrantAddForm(forms.ModelForm):
    class Meta:
        model = Grant
        fields = ("user", "process_instance")

    def clean_process_instance(self) -> str:
        value: str = self.cleaned_data["process_instance"]
        if not envelope.PROCESS_INSTANCE.match(value):
            raise forms.ValidationError("Use letters, digits and _ . : - only (as in Kafka records).")
        return value

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean() or {}
        user, process_instance = data.get("user"), data.get("process_instance")
        if user and process_instance and selectors.grant_active_exists(user=user, process_instance=process_instance):
            raise forms.ValidationError(f"{user} already holds an active grant for {process_instance}.")
        return data


class GrantRevokeForm(forms.ModelForm):
    revoke = forms.BooleanField(
        required=False,
        label="Revoke now",
        help_text="Ends the grant: the user's open streams following this process instance get `unsubscribed`.",
    )

    class Meta:
        model = Grant
        fields = ()


GRANT_FIELDS = (
    "user",
    "process_instance",
    "source",
    "granted",
    "granted_by",
    "recorded",
    "revoked",
    "revoked_by",
    "revoke_recorded",
)


@admin.register(Grant)
class GrantAdmin(LargeTableAdmin):
    """Granting and revoking here act on open streams as `connect` / `disconnect` records do."""

    matching = staticmethod(selectors.grants_matching)
    list_display = ("user", "process_instance", "active", "source", "granted", "granted_by", "revoked")
    list_filter = (GrantStateFilter, "source")
    search_fields = ("user", "process_instance")
    search_help_text = "Exact user or process instance."
    ordering = ("-granted_at",)
    sortable_by = ("granted",)
    actions = ("revoke_selected",)

    @admin.display(boolean=True, description="active")
    def active(self, obj: Grant) -> bool:
        return obj.active

    @admin.display(description="granted at (UTC)", ordering="granted_at")
    def granted(self, obj: Grant) -> str:
        return moment(obj.granted_at)

    @admin.display(description="revoked at (UTC)", ordering="revoked_at")
    def revoked(self, obj: Grant) -> str:
        return moment(obj.revoked_at)

    @admin.display(description="applied by the gateway at (UTC)")
    def recorded(self, obj: Grant) -> str:
        return moment(obj.recorded_at)

    @admin.display(description="revocation applied at (UTC)")
    def revoke_recorded(self, obj: Grant) -> str:
        return moment(obj.revoke_recorded_at)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # revoke instead: grants are the record of who could follow what, and when

    def get_fields(self, request: HttpRequest, obj: Grant | None = None) -> Any:
        if obj is None:
            return ("user", "process_instance")
        return (*GRANT_FIELDS, "revoke") if obj.active else GRANT_FIELDS

    def get_readonly_fields(self, request: HttpRequest, obj: Grant | None = None) -> Any:
        return () if obj is None else GRANT_FIELDS

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        kwargs["form"] = GrantAddForm if obj is None else GrantRevokeForm
        return super().get_form(request, obj, change=change, **kwargs)

    def save_model(self, request: HttpRequest, obj: Grant, form: Any, change: bool) -> None:
        admin_name = request.user.get_username()
        if not change:
            created = services.grant_create_from_admin(
                user=obj.user, process_instance=obj.process_instance, admin=admin_name
            )
            for name in ("id", "granted_at", "granted_by", "source"):
                setattr(obj, name, getattr(created, name))
            obj._state.adding = False
        elif form.cleaned_data.get("revoke"):
            services.grant_revoke_from_admin(grant_ids=[obj.pk], admin=admin_name)
            obj.refresh_from_db()

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except services.GrantChangeFailed as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())

    @admin.action(description="Revoke selected grants", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[Grant]) -> None:
        ids = list(queryset.filter(revoked_at__isnull=True).values_list("pk", flat=True))
        try:
            revoked = services.grant_revoke_from_admin(grant_ids=ids, admin=request.user.get_username())
        except services.GrantChangeFailed as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(request, f"Revoked {revoked} grant(s); open streams following them were sent `unsubscribed`.")
