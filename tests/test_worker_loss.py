"""A cluster that loses its workers: the embedded cluster's nannies keep restarting a
worker that keeps crashing, and a run left with no workers fails instead of hanging."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import dask
import pytest

from mixedscale.errors import RunIncomplete
from mixedscale.executor import _WorkerWatch, local_cluster


def test_nanny_keeps_restarting_a_worker_that_keeps_dying() -> None:
    from distributed import Client

    # SpecCluster closes a nanny whose worker is not back lost-worker-timeout after a
    # removal; at 10 ms every restart would lose the race. Ours leaves it to the nanny.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "10ms"}):
        cluster = local_cluster(1)
        client = Client(cluster)
        try:
            for _ in range(3):
                client.wait_for_workers(1, timeout=60)
                (addr, pid), = client.run(os.getpid).items()
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 60  # until the nanny's new worker registers
                while time.monotonic() < deadline and set(
                        client.scheduler_info(n_workers=-1)["workers"]) in (set(), {addr}):
                    time.sleep(0.05)
                time.sleep(0.3)  # past the 10 ms timer
            client.wait_for_workers(1, timeout=60)
            assert len(cluster.workers) == 1
            assert client.submit(sum, [1, 2]).result(timeout=60) == 3
        finally:
            client.close()
            cluster.close()


class _NoWorkers:
    def scheduler_info(self, n_workers: int = 0) -> dict[str, Any]:
        return {"workers": {}}


def test_run_with_no_workers_fails_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_WorkerWatch, "INTERVAL", 0.0)
    watch = _WorkerWatch(_NoWorkers(), timeout=0.2)
    watch.check()  # starts the clock
    time.sleep(0.3)
    with pytest.raises(RunIncomplete, match="no Dask workers for"):
        watch.check()
    waiting = _WorkerWatch(_NoWorkers(), timeout=None)  # a batch queue: only warns
    waiting.check()
    time.sleep(0.3)
    waiting.check()


def test_manifest_of_a_killed_driver_reads_as_abandoned(tmp_path: Any) -> None:
    import socket
    import subprocess
    import sys

    from mixedscale.store import Store

    st = Store(str(tmp_path / "store"))
    st.init()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    here = socket.gethostname()
    for run_id, pid, host in (("r-dead", int(dead.stdout), here), ("r-live", os.getpid(), here),
                              ("r-elsewhere", int(dead.stdout), "another-host")):
        st.write_manifest(run_id, {"run_id": run_id, "state": "running", "pid": pid,
                                   "host": host, "message": ""})
    states = dict(zip(st.runs()["run_id"], st.runs()["state"], strict=True))
    assert states == {"r-dead": "abandoned", "r-live": "running", "r-elsewhere": "running"}
