"""Long work off the page's thread: a :class:`Job` runs a function in a thread of its own with a stop flag the
function polls, and collects what it reports, so that a page handler can stream progress, and a cancelled handler
stops its job instead of leaving it running."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Python 3.10 has no typing.Self
    from typing_extensions import Self

__all__ = ["CommandJob", "Job"]


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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        """Leaving a ``with`` block (a page handler that ended or was cancelled) stops the job if it still runs."""
        if not self.done:
            self.cancel()


# `python -m sdo ARGS` with Ctrl-C's handler restored first: a page started in the background (`sdo ui &`, nohup)
# ignores SIGINT, and a child inherits that, so that cancel's interrupt would do nothing
_RUN = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from sdo.cli.app import main; sys.exit(main())")


class CommandJob:
    """``CommandJob(["finetune", ...], log)``: ``python -m sdo <args>`` (as :data:`_RUN`) in a process of its own
    (the command line's own code, its files written as it writes them), its output to the file ``log``.
    :meth:`cancel` interrupts it as Ctrl-C does (the command stops cleanly), then kills it if it has not ended;
    :attr:`error` is the last line it printed when it failed (its one-line message, without the ``sdo <command>:
    error:`` prefix)."""

    def __init__(self, args: list[str], log):
        self.log = log
        with open(log, "w") as out:
            self._process = subprocess.Popen([sys.executable, "-c", _RUN, *args], stdout=out,
                                             stderr=subprocess.STDOUT)
        self.cancelled = False

    @property
    def returncode(self) -> int | None:
        """The command's exit code (130 when Ctrl-C stopped it; minus the signal when it was killed), or None."""
        return self._process.poll()

    @property
    def done(self) -> bool:
        return self._process.poll() is not None

    @property
    def error(self) -> str | None:
        code = self._process.poll()
        if code in (None, 0) or self.cancelled:
            return None
        lines = [line for line in Path(self.log).read_text().splitlines() if line.strip()]
        return re.sub(r"^sdo [a-z-]+: error: ", "", lines[-1]) if lines else f"exit code {code}"

    def wait(self, timeout: float | None = None) -> bool:
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.done

    def cancel(self, wait: float = 30.0) -> None:
        if self.done:
            return
        self.cancelled = True
        self._process.send_signal(signal.SIGINT)
        if not self.wait(wait):
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        """As :meth:`Job.__exit__`: the command is interrupted if it still runs."""
        self.cancel()
