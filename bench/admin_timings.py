"""Time every admin changelist, filter and search page against the configured database.

Fill it first, then run (the same DATABASE_URL for both):

    DATABASE_URL=sqlite:////tmp/audits.sqlite3 .venv/bin/python manage.py migrate
    DATABASE_URL=sqlite:////tmp/audits.sqlite3 .venv/bin/python manage.py generate_audits --rows 2000000
    DATABASE_URL=sqlite:////tmp/audits.sqlite3 .venv/bin/python bench/admin_timings.py

Each page is fetched once to warm caches, then --repeat times through Django's test client as a superuser
(the real settings, middleware and templates). Prints a table, writes bench/results/admin_timings.json
(or --output), and exits 1 if any page took 1 s or more (median) or did not answer 200.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")  # also records each page's SQL, reported for the slowest page

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection, reset_queries  # noqa: E402
from django.test import Client  # noqa: E402
from django.utils import timezone  # noqa: E402

from subscriptions.models import DeliveryAudit, Grant, RejectedRecord, Subscription  # noqa: E402
from subscriptions.selectors import distinct_values  # noqa: E402

LIMIT_S = 1.0
BASE = "/admin/subscriptions"


def samples() -> dict[str, str]:
    """Real values from the database to search and filter by."""
    recent = list(
        DeliveryAudit.objects.order_by("-sent_at").values_list("event_id", "process_instance", "subscription_id")[:2000]
    )
    if not recent:
        sys.exit("no delivery audits: run `manage.py generate_audits --rows 2000000` first")
    broadcast = next((e for e, _, _ in recent if e.endswith("-0")), recent[0][0])
    process_instance = next((p for _, p, _ in recent if p), "")
    stream = Subscription.objects.order_by("-opened_at").values_list("pk", "user").first()
    assert stream is not None
    heavy_user = Subscription.objects.order_by("user").values_list("user", flat=True).first() or ""
    oldest = DeliveryAudit.objects.order_by("sent_at").values_list("event_id", flat=True).first() or ""
    grant = Grant.objects.order_by("-granted_at").values_list("user", "process_instance").first() or ("", "")
    rejected = RejectedRecord.objects.order_by("-received_at").first()
    now = timezone.localtime()
    return {
        "event_id": broadcast,
        "old_event_id": oldest,
        "process_instance": process_instance,
        "stream_id": str(stream[0]),
        "user": stream[1],
        "heavy_user": heavy_user,
        "instance": (distinct_values(model=Subscription, field="instance") or [""])[0],
        "grant_user": grant[0],
        "grant_process_instance": grant[1],
        "rejected": f"{rejected.topic}/{rejected.partition}/{rejected.offset}" if rejected else "none/0/0",
        "year": str(now.year),
        "month": str(now.month),
        "day": str(now.day),
        "audit_pk": str(DeliveryAudit.objects.order_by("-sent_at").values_list("pk", flat=True).first()),
    }


def pages(s: dict[str, str]) -> list[tuple[str, str]]:
    audits, subs = f"{BASE}/deliveryaudit/", f"{BASE}/subscription/"
    ymd = f"year={s['year']}&sent_at__month={s['month']}"
    return [
        ("audits: list", audits),
        ("audits: page 2", f"{audits}?p=2"),
        ("audits: deepest page (100)", f"{audits}?p=100"),
        ("audits: status=delivered", f"{audits}?status__exact=delivered"),
        ("audits: status=replayed", f"{audits}?status__exact=replayed"),
        ("audits: status=dropped", f"{audits}?status__exact=dropped"),
        ("audits: this year", f"{audits}?sent_at__year={s['year']}"),
        ("audits: this month", f"{audits}?sent_at__{ymd}"),
        ("audits: today", f"{audits}?sent_at__{ymd}&sent_at__day={s['day']}"),
        ("audits: dropped this month", f"{audits}?status__exact=dropped&sent_at__{ymd}"),
        ("audits: search event id (broadcast)", f"{audits}?q={s['event_id']}"),
        ("audits: search old event id", f"{audits}?q={s['old_event_id']}"),
        ("audits: search user", f"{audits}?q={s['user']}"),
        ("audits: search heaviest user", f"{audits}?q={s['heavy_user']}"),
        ("audits: search heaviest user, dropped", f"{audits}?q={s['heavy_user']}&status__exact=dropped"),
        ("audits: search process instance", f"{audits}?q={s['process_instance']}"),
        ("audits: search stream id", f"{audits}?q={s['stream_id']}"),
        ("audits: search, no match", f"{audits}?q=nobody-at-all"),
        ("audits: one stream's deliveries", f"{audits}?subscription__exact={s['stream_id']}"),
        ("audits: one event's deliveries", f"{audits}?event_id={s['event_id']}"),
        ("audits: sorted oldest first", f"{audits}?o=2"),
        ("audits: detail", f"{audits}{s['audit_pk']}/change/"),
        ("streams: list", subs),
        ("streams: open", f"{subs}?state=open"),
        ("streams: open on one instance", f"{subs}?state=open&instance={s['instance']}"),
        ("streams: closed as slow_client", f"{subs}?close_reason__exact=slow_client"),
        ("streams: by bearer token", f"{subs}?auth_method=bearer"),
        ("streams: this month", f"{subs}?opened_at__year={s['year']}&opened_at__month={s['month']}"),
        ("streams: search user", f"{subs}?q={s['user']}"),
        ("streams: search heaviest user", f"{subs}?q={s['heavy_user']}"),
        ("streams: search stream id", f"{subs}?q={s['stream_id']}"),
        ("streams: detail", f"{subs}{s['stream_id']}/change/"),
        ("grants: list", f"{BASE}/grant/"),
        ("grants: active", f"{BASE}/grant/?state=active"),
        ("grants: search user", f"{BASE}/grant/?q={s['grant_user']}"),
        ("grants: search process instance", f"{BASE}/grant/?q={s['grant_process_instance']}"),
        ("rejected: list", f"{BASE}/rejectedrecord/"),
        ("rejected: reason=not_json", f"{BASE}/rejectedrecord/?reason=not_json"),
        ("rejected: this month", f"{BASE}/rejectedrecord/?received_at__year={s['year']}"),
        ("rejected: search coordinates", f"{BASE}/rejectedrecord/?q={s['rejected']}"),
        ("rejected: search topic", f"{BASE}/rejectedrecord/?q=messaging_events_topic"),
    ]


def time_page(client: Client, url: str, repeat: int) -> dict[str, Any]:
    response = client.get(url)  # warm-up
    runs, statuses = [], {response.status_code}
    queries: list[dict[str, str]] = []
    for _ in range(repeat):
        reset_queries()
        started = time.perf_counter()
        response = client.get(url)
        runs.append(time.perf_counter() - started)
        statuses.add(response.status_code)
        queries = list(connection.queries)
    slowest = max(queries, key=lambda q: float(q["time"]), default={"sql": "", "time": "0"})
    return {
        "median_ms": round(statistics.median(runs) * 1000, 1),
        "max_ms": round(max(runs) * 1000, 1),
        "status": sorted(statuses),
        "queries": len(queries),
        "slowest_query_ms": round(float(slowest["time"]) * 1000, 1),
        "slowest_query": slowest["sql"][:300],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "admin_timings.json"))
    args = parser.parse_args()

    admin, _ = get_user_model().objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client(HTTP_HOST="localhost")
    client.force_login(admin)
    s = samples()
    counts = {
        "delivery_audits": DeliveryAudit.objects.count(),
        "subscriptions": Subscription.objects.count(),
        "open_subscriptions": Subscription.objects.filter(closed_at__isnull=True).count(),
        "grants": Grant.objects.count(),
        "rejected_records": RejectedRecord.objects.count(),
    }
    print(
        f"{connection.vendor} {connection.settings_dict['NAME']}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
    )
    results = []
    for name, url in pages(s):
        result = {"page": name, "url": url, **time_page(client, url, args.repeat)}
        results.append(result)
        flag = "" if result["median_ms"] < LIMIT_S * 1000 and result["status"] == [200] else "  <-- FAIL"
        print(
            f"{name:42} {result['median_ms']:8.1f} ms median {result['max_ms']:8.1f} ms max "
            f"{result['queries']:3} queries, slowest {result['slowest_query_ms']:6.1f} ms  {result['status']}{flag}"
        )
    failed = [r["page"] for r in results if r["median_ms"] >= LIMIT_S * 1000 or r["status"] != [200]]
    worst = max(results, key=lambda r: r["median_ms"])
    verdict = "FAILED: " + ", ".join(failed) if failed else "all under 1 s"
    print(f"slowest page: {worst['page']} {worst['median_ms']} ms; {verdict}")
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "database": connection.vendor,
        "database_version": _version(),
        "rows": counts,
        "repeat": args.repeat,
        "limit_ms": LIMIT_S * 1000,
        "all_under_limit": not failed,
        "pages": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(output.read_text()) if output.exists() else {}
    existing[connection.vendor] = report  # keep the other database's figures alongside
    output.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {output}")
    return 1 if failed else 0


def _version() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT sqlite_version()" if connection.vendor == "sqlite" else "SHOW server_version")
        row = cursor.fetchone()
    return str(row[0]) if row else ""


if __name__ == "__main__":
    sys.exit(main())
