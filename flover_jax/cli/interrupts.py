"""SIGINT and SIGTERM on the command line: exit 130 / 143, never a traceback or a crash.

Until a mode starts its run, a signal ends the process at once: loading or compiling can
take minutes, and nothing has finished that could be written. While a mode runs inside
`while_running`, the first signal only sets `stop`: the loop ends between iterations and
the mode writes what finished; a second signal ends the process at once.

A watcher thread acts on the signal, not a Python handler in the main thread: that one
waits until XLA returns (seconds, in a compile), and a KeyboardInterrupt raised wherever
the interpreter happens to be can be swallowed by a finalizer or end the process halfway
through XLA's teardown (it segfaulted 1 run in 5 that way). The main thread's handler
does nothing: installing it is what makes Python write each signal to the wakeup pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupts:
    def __init__(self) -> None:
        self.stop = threading.Event()  # set by the first signal inside `while_running`
        self.signal: signal.Signals | None = None  # that signal
        self._running = False
        self._lock = threading.Lock()

    def install(self) -> None:
        """Route SIGINT and SIGTERM to the watcher (call from the main thread, once)."""
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        for signum in EXIT_CODES:
            signal.signal(signum, lambda *_: None)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_end,), name="signals", daemon=True).start()

    @contextlib.contextmanager
    def while_running(self) -> Iterator[threading.Event]:
        """Inside: a signal sets the yielded event instead of ending the process."""
        with self._lock:
            self._running = True
        try:
            yield self.stop
        finally:
            with self._lock:
                self._running = False

    def exit_code(self) -> int | None:
        """130 or 143 once a signal has stopped a run, else None."""
        return None if self.signal is None else EXIT_CODES[self.signal]

    def _watch(self, read_end: int) -> None:
        while True:
            for signum in os.read(read_end, 64):
                if signum in EXIT_CODES:
                    self._on_signal(signal.Signals(signum))

    def _on_signal(self, signum: signal.Signals) -> None:
        with self._lock:
            if self._running and self.signal is None:
                self.signal = signum
                self.stop.set()
                print(f"{signum.name}: stopping after this iteration and writing what finished "
                      "(again to stop at once)", file=sys.stderr, flush=True)
                return
        _exit_now(signum)


def _exit_now(signum: signal.Signals) -> None:
    print(f"{signum.name}: stopped", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(EXIT_CODES[signum])
