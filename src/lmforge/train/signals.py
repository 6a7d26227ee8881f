"""Ctrl+C and SIGTERM: finish the step, save, exit cleanly. A second Ctrl+C exits at once."""

from __future__ import annotations

import os
import signal
import sys
import threading


class GracefulStop:
    """While active, SIGINT/SIGTERM only set `requested` (the loop checks it between steps)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            print(
                "\nlmforge: second Ctrl+C: exiting now without saving", file=sys.stderr, flush=True
            )
            os._exit(130)
        self.requested = name
        print(
            f"\nlmforge: {name} received: finishing this step, then saving a checkpoint "
            "(Ctrl+C again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
