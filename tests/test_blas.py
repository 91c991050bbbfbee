"""Fits run with one BLAS thread, and the caller's setting comes back afterwards."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import mixedscale as ms
from mixedscale import _blas
from mixedscale._blas import one_blas_thread

from .conftest import make_genes


def _threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


@pytest.fixture
def two_threads() -> Iterator[None]:
    """BLAS at two threads (the test process may have started with one)."""
    if not _threads():
        pytest.skip("no BLAS library found by threadpoolctl")
    with threadpool_limits(2, user_api="blas"):
        yield


def test_limit_inside_and_restored_after(two_threads: None) -> None:
    before = _threads()
    assert max(before) == 2
    with one_blas_thread():
        assert set(_threads()) == {1}
        with one_blas_thread():  # nested: the inner exit keeps the limit
            pass
        assert set(_threads()) == {1}
    assert _threads() == before


def test_overlapping_threads_restore_once_the_last_leaves(two_threads: None) -> None:
    before = _threads()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def a() -> None:
        with one_blas_thread():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with one_blas_thread():
            b_in.set()
            a_out.wait(5)  # a left first: b must still hold the limit
            # (checked on the guard: OpenBLAS may ignore a limit set from a thread
            # other than the one that last set it, so its count is no witness here)
            seen["b"] = (_blas._depth, _blas._limiter is not None)

    ts = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert seen["b"] == (1, True)
    assert _blas._depth == 0 and _blas._limiter is None
    assert _threads() == before


def test_fit_restores_the_callers_setting(two_threads: None) -> None:
    before = _threads()
    df = make_genes(n_genes=1)
    r = ms.fit(df, ms.ModelSpec("y ~ time", groups="subject"))
    assert r.status == "ok"
    assert _threads() == before
