"""Stop at a safe point on SIGTERM/SIGINT: a flag that loops poll, so they save before exiting.

A command stopped this way exits with status 128 + the signal number (``bitgen.cli``).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


class PreemptionFlag:
    """Set by SIGTERM/SIGINT; loops poll ``requested`` at safe points and save before exiting.

    Poll it at step boundaries *and* inside long inner loops (evaluation, sampling), so a job
    scheduler's grace period is not spent waiting for a loop to finish. Handlers are installed
    only from the main thread and restored by ``uninstall``.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum
        log.warning("received %s: will checkpoint and stop at the next safe point",
                    signal.Signals(signum).name)

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
