"""One BLAS thread while mixedscale fits.

A fit's dense algebra is many small or tall-skinny products (n x p with p of a few
columns). Multi-threaded OpenBLAS gains nothing on them, and its threads' wake-ups and
spinning cost more than the products: on 2 cores, the 100,000-row random-slope fit took
0.09-0.10 s with one thread and 0.13-0.16 s with two (medians of 7, alternating
processes), and scipy's L-BFGS-B steps alone 0.3 ms against 4-60 ms per fit.
Dask's nannies already start workers with OPENBLAS_NUM_THREADS=1; this does the same
for ``fit()`` in the caller's process and for workers started without a nanny.

The limit is process-wide (BLAS libraries have one setting), so concurrent fits in
threads share one limit: the first to enter sets it, the last to leave restores it.
(OpenBLAS may ignore a limit set from a thread other than the one that set its count
last; such a fit then runs as it would have without this.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_lock = threading.Lock()
_depth = 0
_limiter: Any = None
_controller: Any = None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with every loaded BLAS library limited to one thread."""
    global _depth, _limiter, _controller
    with _lock:
        if _depth == 0:
            try:
                if _controller is None:  # ~0.3 ms: finds the loaded libraries once
                    from threadpoolctl import ThreadpoolController

                    _controller = ThreadpoolController()
                _limiter = _controller.limit(limits=1, user_api="blas")
            except Exception:  # only a speed-up: never fail a fit for it
                _limiter = None
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _limiter is not None:
                _limiter.restore_original_limits()
                _limiter = None
