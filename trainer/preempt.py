"""A graceful stop on SIGTERM (``docker compose stop``, a Kubernetes eviction or node drain, a
spot-instance reclaim, a batch scheduler's end of allotment).

The first SIGTERM asks the run to stop after the epoch in progress: every process finishes it, the
processes agree on the stop with the same all-reduce that agrees on the time budget (so they stop
after the same epoch), a resumable checkpoint is written, and :class:`Stopped` ends the run with
exit status 143 (128 + SIGTERM), which restart policies treat as a failure to retry; ``--resume
auto`` then continues from that checkpoint. A second SIGTERM kills the process at once.

How long the stop may take is the caller's grace period: compose's ``stop_grace_period``, the
pod's ``terminationGracePeriodSeconds``; under ``accelerate launch`` / torchrun the launcher
forwards SIGTERM to every process and kills them ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds
later (torch's default 30; ``--processes`` sets 300 unless it is set).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

EXIT_STOPPED = 128 + signal.SIGTERM  # 143
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: Ctrl-C, as a shell reports it


class Stopped(Exception):
    """The run stopped on SIGTERM after ``epochs`` epochs, its state in ``checkpoint``."""

    def __init__(self, epochs: int, checkpoint: Path) -> None:
        super().__init__(f"stopped on SIGTERM after epoch {epochs}; resumable checkpoint {checkpoint}")
        self.epochs, self.checkpoint = epochs, checkpoint


class StopRequest:
    """While in use (``with StopRequest() as stop``), SIGTERM sets ``stop.requested`` instead of
    ending the process; the previous handler is back afterwards. Off the main thread (where Python
    cannot install handlers) it never fires, and the default SIGTERM behaviour stays."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second one: stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.requested = True
        if self.announce:
            print("flowrl: SIGTERM: finishing the epoch in progress, then writing a checkpoint "
                  "(a second SIGTERM stops at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
