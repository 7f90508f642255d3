"""Long work off the page's thread: a :class:`Job` runs a function in a thread of its own with a stop flag the
function polls, and collects what it reports, so that a page handler can stream progress, and a cancelled handler
stops its job instead of leaving it running."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Job"]


class Job:
    """``Job(fn, *args)`` starts ``fn(*args, report=..., stop=...)`` in a daemon thread: ``report(event)`` queues an
    event, ``stop`` is a :class:`threading.Event` set by :meth:`cancel`. :meth:`events` drains what was reported;
    :attr:`result` and :attr:`error` hold the outcome once :attr:`done`."""

    def __init__(self, fn: Callable[..., Any], *args):
        self.stop = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._events: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(fn, args), name="sdo-job", daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self.result = fn(*args, report=self._events.put, stop=self.stop)
        except Exception as err:  # noqa: BLE001 - handed to the page, which shows it
            self.error = err

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def events(self, wait: float = 0.25) -> list:
        """What was reported since the last call, waiting up to ``wait`` seconds for the first one."""
        found = []
        try:
            found.append(self._events.get(timeout=wait))
            while True:
                found.append(self._events.get_nowait())
        except queue.Empty:
            return found

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the job to end; whether it has."""
        self._thread.join(timeout)
        return self.done

    def cancel(self, wait: float = 30.0) -> None:
        """Ask the job to stop and wait (up to ``wait`` seconds) for its thread to end."""
        self.stop.set()
        self._thread.join(wait)
