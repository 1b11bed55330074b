"""(e) A reconnect storm: a web process killed (SIGKILL) under N streams, half on session cookies; every stream
reconnects to a second web process within a second with Last-Event-ID while events keep flowing.

Reports whether each stream resumed exactly (missing, duplicated, out of order), the status of every
reconnect (no 5xx; a transient-fault retry would show as a third connect), how long until all were back,
and the database queries the surviving process made meanwhile (`gateway_database_queries_total`), per
reconnect. The scenario is tests/storm.py, which tests/test_connect_storm.py runs at 200 streams.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import psutil

from bench import systems
from bench.profiling import Profiler
from bench.support import RESULTS, ROOT, Bench, log
from tests.harness import Gateway
from tests.storm import Plan, run_storm

SESSIONS_CODE = """
import json
from django.contrib.auth import get_user_model
from django.test import Client
users = get_user_model().objects
out = {}
for name in json.loads(NAMES):
    user, _ = users.get_or_create(username=name)
    client = Client()
    client.force_login(user)
    out[name] = client.cookies["sessionid"].value
print("SESSIONS " + json.dumps(out))
"""


async def _sessions(deployment: Gateway, plan: Plan) -> dict[str, str]:
    """Log the plan's session users in through the deployment's own manage.py: as at a real login, each
    session is written to the database and to the cache in Redis."""
    names = [plan.user(i) for i in range(plan.users) if plan.on_session(i)]
    code = SESSIONS_CODE.replace("NAMES", repr(json.dumps(names)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "manage.py", "shell", "-c", code, cwd=ROOT, env=deployment.env, stdout=subprocess.PIPE
    )
    stdout, _ = await proc.communicate()
    output = stdout.decode()
    line = next(line for line in output.splitlines() if line.startswith("SESSIONS "))
    sessions: dict[str, str] = json.loads(line.removeprefix("SESSIONS "))
    return sessions


async def run(bench: Bench) -> dict[str, Any]:
    s = bench.scale
    plan = Plan(streams=s.storm_streams, users=s.storm_users, prefix="bench-storm")
    deployment = systems.gateway(bench, "storm", webs=2)
    try:
        await deployment.start()
        sessions = await _sessions(deployment, plan)
        survivor = psutil.Process(deployment.webs[1].proc.pid)
        spy = None
        if bench.args.profile:
            spy = Profiler(survivor.pid, RESULTS / "profile-storm-survivor.txt")
        cpu_before, started = sum(survivor.cpu_times()[:2]), time.monotonic()
        out = await run_storm(deployment, plan, sessions, timeout=300)
        out["survivor_cpu_s"] = round(sum(survivor.cpu_times()[:2]) - cpu_before, 2)
        if spy is not None:
            out["survivor_profile"] = await spy.stop()
        out["storm_s"] = round(time.monotonic() - started, 2)
    finally:
        await deployment.stop()
    log(
        f"  (e) {out['streams']} streams ({out['session_streams']} on sessions, {out['users']} users), web process "
        f"killed: all {out['reconnected']} back on the other in {out['reconnect_s']} s; statuses {out['statuses']}, "
        f"5xx {out['server_errors']}; {out['deliveries_received']}/{out['deliveries_expected']} deliveries, "
        f"missing {out['missing']}, twice {out['duplicated']}, out of order {out['out_of_order_streams']}; "
        f"survivor's database queries {out['survivor_queries']:.0f} = {out['queries_per_reconnect']} per reconnect"
    )
    return out
