"""py-spy on the web process while a workload runs: where its time goes, by thread, component and stage."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.support import ROOT, log


class Profiler:
    """py-spy recording a process until stop(): collapsed stacks at 200 Hz, every thread, not pausing it."""

    def __init__(self, pid: int, output: Path) -> None:
        self.output = output
        self.proc: subprocess.Popen[bytes] | None = None
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(spy, os.X_OK):
            log("  ! py-spy not installed (pip install py-spy): no profile")
            return
        output.parent.mkdir(parents=True, exist_ok=True)
        argv = [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--nolineno", "--threads"]
        argv += ["--nonblocking", "--output", str(output)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def stop(self) -> dict[str, Any]:
        """Stop recording and summarise; {} when py-spy is missing or recorded nothing."""
        if self.proc is None:
            return {}
        self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        return summarize_profile(self.output)


# Where a sample's time goes: its innermost frame from one of these parts of the stack.
COMPONENTS = [
    ("events/", "gateway: hub, streams, sse (events/)"),
    ("subscriptions/", "gateway: audits (subscriptions/)"),
    ("django/db/", "django ORM / sqlite (auth lookups, audit writes)"),
    ("django/", "django (ASGI handler, streaming response)"),
    ("asgiref/", "asgiref (sync_to_async, ...)"),
    ("daphne/", "daphne (HTTP protocol, app queues)"),
    ("twisted/", "twisted (reactor, socket writes)"),
    ("channels_redis/", "channels_redis layer"),
    ("channels/", "channels"),
    ("redis/", "redis client"),
    ("prometheus_client/", "prometheus_client"),
    ("asyncio/", "asyncio event loop"),
]
THREAD_KINDS = {
    "MainThread": "event loop (main thread)",
    "ThreadPoolExecutor": "asgiref sync_to_async threads (thread-sensitive)",
    "asyncio": "loop default executor (thread_sensitive=False: audit writes)",
}
# Stages of the per-delivery path, counted inclusively (a sample inside any matching frame).
STAGES = [
    ("feed: read + hand out live events", ("_read (events/delivery/feed.py)",)),
    ("feed: decode", ("decode_live (events/core/store.py)",)),
    ("hub: dispatch to streams", ("_dispatch (events/delivery/hub.py)",)),
    ("sse: render", ("render (events/delivery/stream.py)",)),
    ("stream: body generator", ("body (events/delivery/stream.py)",)),
    ("stream: _take + audit/metrics record", ("_take (events/delivery/stream.py)",)),
    ("stream: open (auth, slot, attach)", ("_respond_opening (events/delivery/endpoint.py)",)),
    ("socket: direct writes", ("send_now (events/delivery/daphne.py)",)),
    ("daphne: handle_reply", ("handle_reply (daphne/http_protocol.py)",)),
    ("twisted: socket writes", ("doWrite (twisted/internet/", "writeSomeData (twisted/internet/")),
    ("audit writer", ("audit_writer.py",)),
    ("metrics (prometheus observe)", ("observe (prometheus_client/metrics.py)",)),
]


def summarize_profile(path: Path) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> share of samples by component, by stage, and the hottest frames."""
    if not path.exists():
        return {}
    samples: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        collapsed, _, number = line.rpartition(" ")
        if collapsed and number.isdigit():
            samples.append((collapsed.split(";"), int(number)))
    total = sum(c for _, c in samples) or 1
    by_thread: Counter[str] = Counter()
    components: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for stack, count in samples:
        thread, frames = stack[0], stack[1:]
        name = thread.split(": ", 1)[-1]
        by_thread[THREAD_KINDS.get(name.split("-", 1)[0].rstrip("_0123456789"), name)] += count
        if frames:
            leaf[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        where = "other (stdlib, C)"
        for frame in reversed(frames):
            found = next((label for marker, label in COMPONENTS if marker in frame), None)
            if found:
                where = found
                break
        components[where] += count
        for label, markers in STAGES:
            if any(m in f for f in frames for m in markers):
                stages[label] += count

    def share(counter: Counter[str], n: int = 15) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(n)}

    summary: dict[str, Any] = {
        "samples": total,
        "threads": share(by_thread),
        "components_percent": share(components, 20),
        "stages_percent": {label: round(100 * stages[label] / total, 1) for label, _ in STAGES},
        "top_self_percent": share(leaf, 20),
        "top_inclusive_percent": share(inclusive, 30),
        "raw": str(path.relative_to(ROOT)),
    }
    log(f"  profile of the web process ({total} samples at 200 Hz, {path.relative_to(ROOT)}):")
    log("    by thread: " + ", ".join(f"{k} {v}%" for k, v in summary["threads"].items()))
    for name, pct in summary["components_percent"].items():
        log(f"    {pct:5.1f}%  {name}")
    log("    stages (inclusive):")
    for name, pct in summary["stages_percent"].items():
        log(f"    {pct:5.1f}%  {name}")
    log("    hottest frames (self):")
    for name, pct in list(summary["top_self_percent"].items())[:12]:
        log(f"    {pct:5.1f}%  {name}")
    return summary
