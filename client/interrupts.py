"""Ctrl-C that always stops a long job.

Python raises KeyboardInterrupt wherever the main thread is when the signal arrives.
Raised inside a `__del__` (gRPC's call objects have one, and the garbage collector runs
it in whichever thread allocates), it is printed as ignored and the job runs on to the
end. So the handler also records the signal, and the job's loop checks the record.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class CtrlC:
    """Whether Ctrl-C was pressed while `ctrl_c_stops` was in force."""

    def __init__(self) -> None:
        self.pressed = threading.Event()

    def check(self) -> None:
        """Raises KeyboardInterrupt (again) if Ctrl-C was pressed."""
        if self.pressed.is_set():
            raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_stops() -> Iterator[CtrlC]:
    """Records Ctrl-C for `CtrlC.check` and raises KeyboardInterrupt as usual. Where
    Python's own handler is not in force (another thread; SIGINT ignored, as in a
    background job of a script), it changes nothing."""
    ctrl_c = CtrlC()
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield ctrl_c
        return

    def on_sigint(signum, frame):
        ctrl_c.pressed.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
