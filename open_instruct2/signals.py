"""Ctrl-C (SIGINT) and SIGTERM: stop at the next safe point, not in the middle of a write.

During training (`armed`), the first signal only records itself: the loop finishes the current step, saves
a resumable state if checkpointing is on, stops the child servers and exits 130 (SIGINT) or 143 (SIGTERM)
with one line saying how to resume. A second signal stops at once. Outside training (start-up: loading,
launching a server) a signal stops at once, as before.
"""

import signal
import sys
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stopped(BaseException):
    """Raised to end the run on a signal; `message` is the one line for stderr."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1)


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self.armed = False

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.armed or self.signum is not None:
            raise Stopped(signum, f"stopped by {name}")
        self.signum = signum
        print(f"{name}: stopping after this step (send it again to stop now)", file=sys.stdout, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None
