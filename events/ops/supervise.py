"""Long-lived tasks that outlive their failures, and say whether they run.

A task body handles the failures of one item itself (log with its coordinates, count, set it aside, go
on); what escapes it is a bug the task cannot see past. The supervisor logs and counts that too, waits a
little and runs the body again, so one bad item never stops a loop for good. `alive()` feeds readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from events.ops import metrics

logger = logging.getLogger(__name__)

# A body that fails at once again (the same bad state) is retried at most this often.
RESTART_FIRST, RESTART_MAX = 0.5, 10.0


def failed(task: str, message: str, **coordinates: object) -> None:
    """Log and count a failure a task survived; `coordinates` say which item (topic/partition/offset, id)."""
    metrics.TASK_FAILURES.labels(task).inc()
    logger.exception(message, extra={"task": task, **coordinates})


# A task still running this long after it was cancelled is cancelled again (see cancel_and_wait).
CANCEL_AGAIN_SECONDS = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again any that goes on.

    A cancellation can be lost on Python 3.11: its `asyncio.wait_for` drops one that arrives just as the step
    it awaits completes, and redis-py sends every command of a client with a socket timeout under `wait_for`.
    A task cancelled once in the middle of a Redis command could carry on with its loop, and whoever waited
    for it would wait for ever. Outcomes are left for the caller to read (`task.result()`)."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_SECONDS)


class Supervisor:
    """Runs named task bodies until stop(), restarting a body whenever it raises."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, bool] = {}

    def start(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        self._running[name] = True
        self._tasks[name] = asyncio.get_running_loop().create_task(self._keep(name, body), name=name)

    async def _keep(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        delay = RESTART_FIRST
        while True:
            try:
                self._running[name] = True
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - whatever escaped the body is logged, counted and survived
                self._running[name] = False
                failed(name, "task failed; restarting it")
                metrics.TASK_RESTARTS.labels(name).inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)

    def alive(self) -> dict[str, bool]:
        """Each task by name: running (not finished, not waiting to restart after a failure)."""
        return {name: not task.done() and self._running.get(name, False) for name, task in self._tasks.items()}

    async def stop(self) -> None:
        """Cancel every task and wait for them; safe to call more than once."""
        tasks, self._tasks = list(self._tasks.values()), {}
        await cancel_and_wait(tasks)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
