"""Memory and CPU probes: driver RSS high-water, worker RSS polled in a thread."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

MB = 2**20
VERSIONS = ("numpy", "scipy", "pandas", "pyarrow", "statsmodels", "patsy", "dask",
            "distributed")


def versions() -> dict[str, str]:
    """The libraries every runner's speed depends on: rows of different sessions compare
    only with these (and the CPU probe) beside them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def cpu_probe_ms(repeats: int = 5) -> float:
    """Milliseconds for a fixed single-threaded workload shaped like the fast engine's
    (batched 3x3 solves and Cholesky factors, a Python loop), best of ``repeats``. The
    same code ran 30-80 % slower on some days than on others: a row's probe says which
    machine it met."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 3, 3))
    a = a @ a.transpose(0, 2, 1) + 3 * np.eye(3)
    b = rng.normal(size=(2000, 3, 1))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(40):
            np.linalg.solve(a, b)
            np.linalg.cholesky(a)
        sum(i * i for i in range(100_000))
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def _vm_hwm() -> int | None:
    """The kernel's peak RSS of this process (bytes), if readable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak RSS counter (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class DriverMemory:
    """Peak RSS of this process, per phase, sampled every ``interval`` seconds.

    The kernel's VmHWM (reset at start when the kernel allows) catches peaks
    between samples; it is attributed to the whole run. Every 50 ms, not 10: a 10 ms
    sampler used 3 % of a core, taken from the workers it shares two cores with.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.proc = psutil.Process()
        self.interval = interval
        self.phase = "run"
        self.peaks: dict[str, int] = {}
        self.baseline = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.hwm_reset = False

    def __enter__(self) -> DriverMemory:
        self.hwm_reset = _reset_hwm()
        self.baseline = self.proc.memory_info().rss
        self.cpu0 = self.proc.cpu_times()
        self._thread.start()
        return self

    def _sample(self) -> None:
        rss = self.proc.memory_info().rss
        ph = self.phase
        if rss > self.peaks.get(ph, 0):
            self.peaks[ph] = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def set_phase(self, phase: str) -> None:
        self._sample()
        self.phase = phase
        self._sample()

    def __exit__(self, *exc: Any) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()
        cpu = self.proc.cpu_times()
        self.cpu_seconds = (cpu.user - self.cpu0.user) + (cpu.system - self.cpu0.system)

    @property
    def peak(self) -> int:
        sampled = max(self.peaks.values(), default=0)
        hwm = _vm_hwm() if self.hwm_reset else None
        return max(sampled, hwm or 0)


def _rss() -> int:
    import psutil as _ps

    return int(_ps.Process().memory_info().rss)


class Poller:
    """Calls ``fn() -> {worker: rss}`` every ``interval`` s in a thread; keeps maxima."""

    def __init__(self, fn: Callable[[], dict[str, int]], interval: float = 0.25) -> None:
        self.fn = fn
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.seen: set[str] = set()
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _poll(self) -> None:
        try:
            got = self.fn()
        except Exception:  # a worker restarting mid-poll: try again next tick
            self.errors += 1
            return
        for k, v in got.items():
            self.seen.add(k)
            if v > self.peak.get(k, 0):
                self.peak[k] = int(v)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> Poller:
        self._poll()
        self.initial = set(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    @property
    def max_rss(self) -> int:
        return max(self.peak.values(), default=0)

    @property
    def replaced(self) -> int:
        """Workers seen beyond the initial ones (restarted or replaced during the run)."""
        return len(self.seen - self.initial)


def dask_workers(client: Any) -> Callable[[], dict[str, int]]:
    """RSS of every Dask worker, keyed by pid (a restarted worker is a new key).

    Read from the operating system when every worker runs on this machine (the shared
    LocalCluster): polling through ``client.run`` puts a call on every worker's event
    loop and through the scheduler four times a second, inside the run it measures.
    The pids are asked of the workers once, and again only after one is gone. Workers
    on other machines are polled through ``client.run``."""
    def remote() -> dict[str, int]:
        return {str(k): int(v) for k, v in client.run(_rss).items()}

    if set(client.run(socket.gethostname).values()) != {socket.gethostname()}:
        return remote

    def ask() -> list[int]:
        return sorted(int(p) for p in client.run(os.getpid).values())

    def read(ps: list[int]) -> dict[str, int]:
        out = {}
        for pid in ps:
            with contextlib.suppress(psutil.Error):
                out[str(pid)] = int(psutil.Process(pid).memory_info().rss)
        return out

    pids = ask()

    def fn() -> dict[str, int]:
        nonlocal pids
        out = read(pids)
        if len(out) < len(pids):  # a worker restarted: learn its new pid
            pids = ask()
            out = read(pids)
        return out
    return fn


def child_processes() -> Callable[[], dict[str, int]]:
    """RSS of every descendant process of this one, keyed by pid (pool or cluster workers)."""
    me = psutil.Process()

    def fn() -> dict[str, int]:
        out = {}
        for p in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out[str(p.pid)] = int(p.memory_info().rss)
        return out
    return fn


def scheduler_cpu(client: Any) -> float | None:
    """CPU seconds used so far by the Dask scheduler's process."""
    def fn() -> float:
        import psutil as _ps

        t = _ps.Process().cpu_times()
        return float(t.user + t.system)
    try:
        return float(client.run_on_scheduler(fn))
    except Exception:
        return None


def now() -> float:
    return time.perf_counter()


def pid() -> int:
    return os.getpid()
