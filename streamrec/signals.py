"""Stop on SIGINT/SIGTERM: the one signal mechanism of the long-running commands (``replay``,
``learner``).

The handler takes no lock. It runs in the main thread between two bytecodes, possibly while that
thread holds a lock of its own: a handler calling ``threading.Event.set()`` while the main thread
was inside that event's ``wait()`` deadlocked (a replay that ignored SIGTERM). It also does not
log, since the main thread may be in the middle of a write to the same stream. It records the
signal, sets a flag and writes one byte to a pipe; :meth:`StopOnSignal.sleep` is a ``select`` on
that pipe, so a signal cuts a wait short.

>>> stop = StopOnSignal()
>>> stop.is_set(), stop.signum
(False, None)
"""
from __future__ import annotations

import os
import select
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """A stop flag set by SIGINT/SIGTERM while installed (:meth:`install` / ``with``).

    ``interrupt_on_second``: a second signal raises ``KeyboardInterrupt`` in the main thread (stop
    at once) instead of being ignored. Readers call :meth:`is_set` (the interface of
    ``threading.Event`` that the stop loops use) and may wait with :meth:`sleep`.
    """

    def __init__(self, interrupt_on_second: bool = True) -> None:
        self.interrupt_on_second = interrupt_on_second
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, object] = {}
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            if self.interrupt_on_second:
                raise KeyboardInterrupt
            return
        self.signum = signum
        try:
            os.write(self._write_fd, b"x")
        except BlockingIOError:  # pragma: no cover - the pipe already holds a byte
            pass

    @property
    def name(self) -> str | None:
        """The received signal's name (``SIGTERM``), None before one came."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def is_set(self) -> bool:
        return self.signum is not None

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when a stop signal comes in (also one that came before)."""
        if self.signum is None and seconds > 0:
            select.select([self._read_fd], [], [], seconds)

    def install(self) -> StopOnSignal:
        """Handle SIGINT and SIGTERM from now on (call from the main thread)."""
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back and close the pipe."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._read_fd >= 0:
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = -1

    def __enter__(self) -> StopOnSignal:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()
