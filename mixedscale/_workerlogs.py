"""The embedded cluster's worker processes log like the driver: errors only.

They share the driver's stderr. Their warnings there are expected events that
mixedscale reports itself, in one line, or that need no action: a task cancelled
when the executor restarts a worker (a fit timeout) or when a stopped run closes
the cluster (``Async instruction ... ended with CancelledError``), or an event loop
held up by a long fit. Errors still show, with their tracebacks: a task that raises
(a failed store write, or a bug); tasks return the failures they expect instead
(a corrupt input file: see ``worker.LoadFailed``).

Its own module because it imports ``distributed`` at import time (the plugin must
subclass WorkerPlugin), and worker processes unpickle it by this name.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import warnings
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["QuietWorkerLogs"]


class _LostHeartbeat(logging.Filter):
    """A heartbeat that finds the embedded scheduler gone: the driver, in whose process
    it runs, is closing the cluster (a finished or interrupted run) and reports the run
    itself; the worker's traceback would print above that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to communicate with scheduler during heartbeat" not in record.getMessage()


class QuietWorkerLogs(WorkerPlugin):  # type: ignore[misc]
    name = "mixedscale-quiet-logs"

    def setup(self, worker: Any) -> None:
        logging.getLogger("distributed").setLevel(logging.ERROR)
        worker_log = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _LostHeartbeat) for f in worker_log.filters):  # one each
            worker_log.addFilter(_LostHeartbeat())
        # Fits record their warnings as data (inside catch_warnings); what reaches the
        # filters here comes from a fit abandoned at its timeout, still running in its
        # thread, and would print statsmodels' ConvergenceWarning into the driver's output.
        warnings.simplefilter("ignore")
        # Ctrl-C reaches the whole process group: the driver stops the run and closes
        # the cluster; each worker printed a KeyboardInterrupt traceback besides.
        with contextlib.suppress(ValueError):  # only possible in the main thread
            signal.signal(signal.SIGINT, signal.SIG_IGN)
