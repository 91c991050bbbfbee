"""Large temporaries from the heap again in Dask's worker processes.

Dask's nannies start their workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (distributed's
``nanny.pre-spawn-environ``), so that freed memory goes back to the system at once.
Setting it also pins glibc's mmap threshold at 128 KiB, which glibc otherwise raises to
the size of the blocks a process frees (up to 32 MiB). Every array above that is then
mapped afresh, its pages faulted in as it is first written, and unmapped when freed:
the fast engine's Newton steps make many such temporaries. In one process with that
variable, genes' 12 tasks took 4.6-5.7 s of fit time against 2.2-3.0 s without it
(three runs each; 2.4 s with it and this module's setting), and the 100,000-row
random-slope fit 0.095-0.099 s against 0.058-0.068 s (medians of 5, two pairs of
processes). mixedscale's own embedded cluster does not set it; a user's cluster (a
plain ``LocalCluster``, dask-jobqueue's workers) does.

So, once per worker process whose trim threshold is Dask's default, this sets what
glibc's own rule would reach: the mmap threshold at 32 MiB and the trim threshold at
twice that. Memory freed inside the heap is then kept for reuse up to 64 MiB at its
top, as in a process started without the variable. Another value is the user's choice
and is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

DASK_TRIM_THRESHOLD = "65536"  # distributed's default nanny.pre-spawn-environ value
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
applied = False  # whether this process's thresholds were set here


def heap_for_temporaries() -> bool:
    """Undo Dask's default trim threshold's pinned mmap threshold in this process (glibc
    on Linux only); True if it did. Never raises: it is only a speed-up."""
    global applied
    if applied or not sys.platform.startswith("linux") or (
            os.environ.get("MALLOC_TRIM_THRESHOLD_") != DASK_TRIM_THRESHOLD):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD) == 1)
    except (OSError, AttributeError):  # no glibc (musl's mallopt is a stub returning 0)
        return False
    applied = ok
    return ok
