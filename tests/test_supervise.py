"""Long-lived tasks outlive their failures and say whether they run (in-process, no services)."""

from __future__ import annotations

import asyncio

import pytest

from events.management.commands import run_consumer
from events.ops import metrics, supervise
from events.ops.supervise import Supervisor


def _failures(task: str) -> float:
    return metrics.TASK_FAILURES.labels(task)._value.get()


async def test_a_failing_body_is_restarted_and_reported_not_running_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervise, "RESTART_FIRST", 0.2)
    runs: list[int] = []
    release = asyncio.Event()

    async def body() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise ValueError("a bad item nobody caught")
        await release.wait()

    before = _failures("test-body")
    supervisor = Supervisor()
    supervisor.start("test-body", body)
    await asyncio.sleep(0.05)
    assert supervisor.alive() == {"test-body": False}  # failed, waiting to restart
    assert _failures("test-body") == before + 1
    await asyncio.sleep(0.3)
    assert runs == [0, 1]
    assert supervisor.alive() == {"test-body": True}
    await supervisor.stop()
    assert supervisor.alive() == {}
    await supervisor.stop()  # idempotent


async def test_a_body_that_returns_is_not_restarted() -> None:
    supervisor = Supervisor()
    done = asyncio.Event()

    async def body() -> None:
        done.set()

    supervisor.start("once", body)
    await done.wait()
    await asyncio.sleep(0)
    assert supervisor.alive() == {"once": False}
    await supervisor.stop()


class _Service:
    """Stands in for IngestService: its loop fails once with a bug, then runs until stopped."""

    def __init__(self) -> None:
        self.runs = 0
        self.rewinds = 0

    async def run(self) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("a bug in the loop")

    async def rewind(self) -> None:
        self.rewinds += 1


async def test_the_consume_loop_restarts_from_what_is_durable(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []

    async def no_wait(seconds: float) -> None:
        sleeps.append(seconds)

    monkeypatch.setattr(run_consumer.asyncio, "sleep", no_wait)
    service = _Service()
    await run_consumer._consume(service)  # type: ignore[arg-type]
    assert (service.runs, service.rewinds) == (2, 1)
    assert sleeps == [1.0]


async def test_stop_ends_a_task_whose_first_cancellation_was_lost() -> None:
    # As Python 3.11's wait_for does to a cancellation that arrives just as the awaited step completes (redis-py
    # sends commands under it): the body swallows one cancellation and carries on with its loop.
    swallowed = 0
    ticks = 0

    async def body() -> None:
        nonlocal swallowed, ticks
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1
            ticks += 1

    supervisor = Supervisor()
    supervisor.start("loop", body)
    await asyncio.sleep(0.2)
    stopping = asyncio.create_task(supervisor.stop())
    done, _ = await asyncio.wait({stopping}, timeout=10)
    assert done, "stop() is still waiting for a task that carried on after its cancellation"
    assert swallowed == 1
    assert supervisor.alive() == {}
