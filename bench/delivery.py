"""Delivery benchmark: Kafka -> consumer -> Redis -> web process -> SSE client, against a peer.

Starts everything itself on free loopback ports (Tansu broker, Redis, one daphne web process, one consumer),
drives it with aiokafka and with bench/sseclient.py worker processes, and stops it all at the end. One module
per workload (bench/workloads/), shared pieces in bench/support.py, the systems in bench/systems.py:

    (a) N streams, each following its own user; R events/s keyed by user for S seconds: latency, loss
    (b) the same streams on one broadcast at 20 then 50 events/s: deliveries/s achieved, latency, loss
    (c) many idle streams: web-process RSS per stream and the time to connect them all
    (d) connect/disconnect cycles: web RSS and asyncio tasks before and after (no leaks)
    (e) a reconnect storm: a web process killed under N streams (half on sessions), all resuming on a second
        one: exact resume, no 5xx, the survivor's database queries per reconnect (gateway only)

Systems, run one after the other in the same run so they never share the 2 cores:
    ours        the gateway as configured (AUDIT_DELIVERIES from --audit)
    audit-off   the gateway with AUDIT_DELIVERIES=off: (a) and (b20), the audit cost (issue 5)
    core-layer  the gateway on channels_redis' core layer (bench/settings_core_layer.py): (a) and (b20)
    peer        django-eventstream 5.3.4 on the same stack (bench/peer, its own virtualenv bench/.peer-venv)

Latency is the client's receipt time minus the event's `publishedAt` (the Kafka record timestamp, in
milliseconds, so figures carry up to 1 ms of truncation). Loss is expected deliveries minus received.

    .venv/bin/python bench/delivery.py                       # everything (about 10 minutes)
    .venv/bin/python bench/delivery.py --quick               # a small smoke run
    .venv/bin/python bench/delivery.py --workloads a,b --systems ours,peer --profile

Prints figures as it goes, writes bench/results/delivery.json, and the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (bench/delivery.py), not as -m bench.delivery
    sys.path.insert(0, str(ROOT))

from bench import systems  # noqa: E402
from bench.support import QUICK, RESULTS, Bench, Scale, System, flat, log  # noqa: E402
from bench.workloads import (  # noqa: E402
    a_user_streams,
    b_broadcast,
    c_idle_streams,
    d_connect_cycles,
    e_reconnect_storm,
)


async def run_system(bench: Bench, system: System, workloads: set[str], *, b_rates: tuple[int, ...]) -> dict[str, Any]:
    """The workloads one system runs, in an order where none hides what another measures."""
    fd_limit = system.ps.rlimit(psutil.RLIMIT_NOFILE)[0]
    log(f"== {system.name} (web pid {system.web.pid}, port {system.port}, open-file limit {fd_limit})")
    out: dict[str, Any] = {"rss_start_mb": round(system.rss() / 2**20, 1), "web_fd_limit": fd_limit}
    # (d) first, on the fresh process: (c)'s 10,000 streams leave freed memory that would hide a leak.
    if "d" in workloads and system.has_metrics:
        out["d"] = await d_connect_cycles.run(bench, system)
    if "c" in workloads:
        out["c"] = await c_idle_streams.run(bench, system)
    if workloads & {"a", "b"}:
        opened = await bench.open_streams(system, bench.scale.streams, bench.scale.streams)
        log(f"  {opened['opened']} streams open in {opened['seconds']:.1f} s")
        if "a" in workloads:
            out["a"] = await a_user_streams.run(bench, system)
        if "b" in workloads:
            for rate in b_rates:
                out[f"b{rate}"] = await b_broadcast.run(bench, system, rate)
            if bench.args.profile and system.name in {"ours", "audit-off"}:
                path = RESULTS / f"profile-{system.name}-b{max(b_rates)}.txt"
                log(f"  profiling the web process during (b{max(b_rates)}) again (figures not counted)")
                out["profile_run"] = await b_broadcast.run(bench, system, max(b_rates), profile=path)
        await bench.close_streams(system)
    return out


def code_version() -> str:
    """The commit measured, with `+dirty` when the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "events", "gateway_project", "subscriptions"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.decode().strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (100 streams, 5 s phases)")
    parser.add_argument("--workloads", default="a,b,c,d,e", help="subset of a,b,c,d,e (default: all)")
    parser.add_argument(
        "--systems",
        default="ours,audit-off,core-layer,peer",
        help="subset of ours,audit-off,core-layer,peer (default: all)",
    )
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None, help="include the peer")
    parser.add_argument("--audit", default="all", choices=["all", "failures", "off"], help="AUDIT_DELIVERIES of 'ours'")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True, help="py-spy during (b)")
    parser.add_argument("--streams", type=int, help="streams in (a) and (b)")
    parser.add_argument("--rate", type=int, help="events/s in (a)")
    parser.add_argument("--seconds", type=float, help="duration of (a)")
    parser.add_argument("--b-rates", help="broadcast events/s in (b), comma list (default 20,50)")
    parser.add_argument("--b-seconds", type=float, help="duration of each (b) phase")
    parser.add_argument("--idle-streams", type=int, help="streams in (c)")
    parser.add_argument("--cycles", type=int, help="connect/disconnect cycles in (d)")
    parser.add_argument("--idle-users", type=int, help="users the streams of (c) belong to (default 1,000)")
    parser.add_argument("--storm-streams", type=int, help="streams in (e) (default 1,000)")
    parser.add_argument("--storm-users", type=int, help="users of the streams in (e), half on sessions (default 500)")
    parser.add_argument("--clients", type=int, help="SSE client worker processes (default 1)")
    parser.add_argument("--connect-concurrency", type=int, help="connections opening at once in (a)-(c) (default 50)")
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        help="experiment: run both consumers (ours and the peer's feeder) with aiokafka's fetch_max_wait_ms at "
        f"this value (default: {systems.FETCH_MAX_WAIT_MS} ms for both)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "delivery.json")
    return parser.parse_args(argv)


def scale_from(args: argparse.Namespace) -> Scale:
    base = QUICK if args.quick else Scale()
    overrides = {
        "streams": args.streams,
        "a_rate": args.rate,
        "a_seconds": args.seconds,
        "b_rates": tuple(int(r) for r in args.b_rates.split(",")) if args.b_rates else None,
        "b_seconds": args.b_seconds,
        "idle_streams": args.idle_streams,
        "cycles": args.cycles,
        "clients": args.clients,
        "connect_concurrency": args.connect_concurrency,
        "idle_users": args.idle_users,
        "storm_streams": args.storm_streams,
        "storm_users": args.storm_users,
    }
    values = {**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    values["idle_users"] = min(values["idle_users"], values["idle_streams"])
    return Scale(**values)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scale = scale_from(args)
    workloads = set(args.workloads.split(","))
    names = [s for s in args.systems.split(",") if s]
    if args.peer is False:
        names = [s for s in names if s != "peer"]
    elif args.peer and "peer" not in names:
        names.append("peer")
    RESULTS.mkdir(parents=True, exist_ok=True)
    log(f"code {code_version()}; scale: {scale}; workloads {sorted(workloads)}; systems {names}")
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Cancel, so that every `finally` stops what it started (services run in sessions of their own).
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    bench = Bench(args, scale)
    report: dict[str, Any] = {
        "scale": scale.__dict__,
        "workloads": sorted(workloads),
        "audit": args.audit,
        "cores": psutil.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": code_version(),
        "systems": {},
    }
    await bench.start()
    try:
        if any(s != "peer" for s in names):
            await systems.prepare_database(bench)
        for name in names:
            if name == "ours":
                if "e" in workloads:
                    # Its own deployment (two web processes), before the others so it never shares the cores.
                    report["systems"].setdefault("ours", {})["e"] = await e_reconnect_storm.run(bench)
                if not workloads - {"e"}:
                    continue
                system = await systems.start_gateway(bench, "ours")
                todo, rates = workloads - {"e"}, scale.b_rates
            elif name == "audit-off":
                system = await systems.start_gateway(bench, "audit-off", AUDIT_DELIVERIES="off")
                todo, rates = workloads & {"a", "b"}, scale.b_rates
            elif name == "core-layer":
                settings = {"DJANGO_SETTINGS_MODULE": "bench.settings_core_layer"}
                system = await systems.start_gateway(bench, "core-layer", **settings)
                todo, rates = workloads & {"a", "b"}, scale.b_rates[:1]
            elif name == "peer":
                system = await systems.start_peer(bench)
                todo, rates = workloads - {"d"}, scale.b_rates
            else:
                raise SystemExit(f"unknown system {name!r}")
            try:
                report["systems"].setdefault(name, {}).update(await run_system(bench, system, todo, b_rates=rates))
            finally:
                await system.stop()
            args.output.write_text(json.dumps(report, indent=2, default=str))
    finally:
        await bench.stop()
    summary: dict[str, Any] = flat(report["systems"].get("ours", {}))
    for name in ("audit-off", "core-layer", "peer"):
        if name in report["systems"]:
            summary[name.replace("-", "_")] = flat(report["systems"][name])
    report["summary"] = summary
    args.output.write_text(json.dumps(report, indent=2, default=str))
    log(f"wrote {args.output}")
    return summary


if __name__ == "__main__":
    result = asyncio.run(main(parse_args()))
    print(json.dumps(result), flush=True)
