"""A cluster that loses its workers: the embedded cluster's nannies keep restarting a
worker that keeps crashing, and a run left with no workers fails instead of hanging.
A driver that dies: its manifest reads as abandoned, and the next run sweeps what it
left in the store."""

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
    # Elsewhere too, with heartbeats: one stopped 11 beats ago, one still beating.
    for run_id in ("r-silent", "r-beating"):
        st.write_manifest(run_id, {"run_id": run_id, "state": "running", "pid": 1,
                                   "host": "another-host", "message": "",
                                   "heartbeat_seconds": 60.0})
    long_ago = time.time() - 11 * 60
    os.utime(tmp_path / "store" / "_runs" / "r-silent.json", (long_ago, long_ago))
    runs = st.runs()
    states = dict(zip(runs["run_id"], runs["state"], strict=True))
    assert states == {"r-dead": "abandoned", "r-live": "running", "r-elsewhere": "running",
                      "r-silent": "abandoned", "r-beating": "running"}
    silent = runs.set_index("run_id").loc["r-silent", "message"]
    assert "stopped writing its heartbeat 11 min ago" in silent


def test_runs_read_oldest_first_also_within_one_second(tmp_path: Any) -> None:
    """Run ids carry the second they started and a random suffix, so two runs of one
    second sort by chance; ``runs()`` (and ``show``'s last run state) go by start time."""
    from mixedscale.executor import _now
    from mixedscale.store import Store

    st = Store(str(tmp_path / "store"))
    st.init()
    assert len(_now()) == len("2026-11-26T23:07:16.123456+00:00")  # to the microsecond
    first, second = "2026-11-26T23:07:16.400000+00:00", "2026-11-26T23:07:16.900000+00:00"
    for run_id, started in (("20261126T230716-ffffffff", first),
                            ("20261126T230716-00000000", second)):
        st.write_manifest(run_id, {"run_id": run_id, "state": "complete", "started": started})
    assert list(st.runs()["run_id"]) == ["20261126T230716-ffffffff", "20261126T230716-00000000"]


def _dead_pid() -> int:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_sweep_removes_only_what_ended_runs_left(tmp_path: Any) -> None:
    import socket
    from datetime import UTC, datetime

    from mixedscale.store import Store

    st = Store(str(tmp_path / "store"))
    st.init()
    here, dead = socket.gethostname(), _dead_pid()
    manifests: dict[str, Any] = {
        "r-done": {"state": "complete"}, "r-failed": {"state": "failed"},
        "r-stopped": {"state": "interrupted"},
        # A dead pid on this host name may be a live driver in another pid namespace.
        "r-dead": {"state": "running", "pid": dead, "host": here},
        "r-live": {"state": "running", "pid": os.getpid(), "host": here},
        "r-away": {"state": "running", "pid": dead, "host": "elsewhere"},
        "r-odd": {"state": "Running"}, "r-empty": {}}
    for run_id, m in manifests.items():
        st.write_manifest(run_id, {"run_id": run_id, **m})
    root = tmp_path / "store"
    (root / "_runs" / "r-null.json").write_text("null")  # unreadable: kept, no crash
    # No manifest at all (its write failed): kept, however old its run id.
    old, new = "20200101T000000-0badc0de", datetime.now(UTC).strftime("%Y%m%dT%H%M%S-a1b2c3d4")
    runs = [*manifests, "r-null", old, new]
    for run_id in runs:
        (root / "_runs" / f"{run_id}.started" / "task").mkdir(parents=True)
        (root / "_runs" / f"{run_id}.started" / "task" / "marker").write_text("1")
        (root / "_tmp" / f"shuffle-{run_id}-1").mkdir()
        (root / "_tmp" / f"shuffle-{run_id}-1" / "p0.parquet").write_bytes(b"x")
    (root / "_runs" / "r-failed.oom").write_text("{}")
    stale, fresh = root / "_tmp" / "fits-t1.aa.parquet", root / "_tmp" / "fits-t2.bb.parquet"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    other = root / "_tmp" / "not-ours"  # a folder: judged by nothing it holds, so kept
    other.mkdir()
    two_days_ago = time.time() - 2 * 86400
    for p in (stale, other):
        os.utime(p, (two_days_ago, two_days_ago))

    removed = {p.rstrip("/").rsplit("/", 1)[-1] for p in st.sweep()}

    gone = {"r-done", "r-failed", "r-stopped"}
    assert removed == ({f"{r}.started" for r in gone} | {f"shuffle-{r}-1" for r in gone}
                       | {"r-failed.oom", stale.name})
    left = {p.name for p in (root / "_runs").iterdir()} | {p.name for p in
                                                           (root / "_tmp").iterdir()}
    for run_id in set(runs) - gone:
        assert {f"{run_id}.started", f"shuffle-{run_id}-1"} <= left, run_id
    assert fresh.exists() and other.exists()
    assert {f"{r}.json" for r in manifests} <= left
    assert st.sweep() == []  # nothing left to sweep


def test_sweep_removes_what_silent_running_runs_left(tmp_path: Any) -> None:
    """A "running" manifest whose heartbeat stopped 10 beats before the sweeping run's
    own manifest was written is a dead driver's: its scratch and markers go. The
    times compared are both the store's (its listing), never this host's clock."""
    from mixedscale.store import HEARTBEAT_SECONDS, SILENT_HEARTBEATS, Store

    st = Store(str(tmp_path / "store"))
    st.init()
    root = tmp_path / "store"
    beat = {"state": "running", "heartbeat_seconds": HEARTBEAT_SECONDS}
    manifests: dict[str, Any] = {
        "r-silent": beat, "r-beating": beat,
        # An older version's manifest has no heartbeat: never judged silent.
        "r-old-version": {"state": "running"},
        "r-bad-beat": {"state": "running", "heartbeat_seconds": "60"},
        "r-me": beat}
    for run_id, m in manifests.items():
        st.write_manifest(run_id, {"run_id": run_id, **m})
        (root / "_runs" / f"{run_id}.started").mkdir()
        (root / "_tmp" / f"shuffle-{run_id}-1").mkdir()
    now = time.time()
    silent = now - SILENT_HEARTBEATS * HEARTBEAT_SECONDS - 60
    for run_id in ("r-silent", "r-old-version", "r-bad-beat"):
        os.utime(root / "_runs" / f"{run_id}.json", (silent, silent))
    recent = now - (SILENT_HEARTBEATS - 1) * HEARTBEAT_SECONDS
    os.utime(root / "_runs" / "r-beating.json", (recent, recent))

    assert st.sweep() == []  # no own manifest to measure silence against: keep all
    removed = {p.rstrip("/").rsplit("/", 1)[-1] for p in st.sweep(own_run="r-me")}

    assert removed == {"r-silent.started", "shuffle-r-silent-1"}
    for run_id in set(manifests) - {"r-silent"}:
        assert (root / "_runs" / f"{run_id}.started").exists(), run_id
        assert (root / "_tmp" / f"shuffle-{run_id}-1").exists(), run_id
    assert (root / "_runs" / "r-silent.json").exists()  # its history stays


def test_a_running_driver_rewrites_its_manifest_and_the_next_run_sweeps_a_silent_one(
        tmp_path: Any, cluster_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import mixedscale as ms
    import mixedscale.executor as executor
    from mixedscale.store import HEARTBEAT_SECONDS, SILENT_HEARTBEATS, Store

    from .conftest import make_genes

    store = tmp_path / "store"
    st = Store(str(store))
    st.init()
    # A shuffled run whose driver was killed: "running", and silent for 10 beats.
    st.write_manifest("r-killed", {"run_id": "r-killed", "state": "running",
                                   "heartbeat_seconds": HEARTBEAT_SECONDS})
    long_ago = time.time() - (SILENT_HEARTBEATS + 1) * HEARTBEAT_SECONDS
    os.utime(store / "_runs" / "r-killed.json", (long_ago, long_ago))
    scratch = store / "_tmp" / "shuffle-r-killed-1"
    scratch.mkdir()
    (scratch / "p0.parquet").write_bytes(b"x" * 1000)

    states: list[str] = []
    write = Store.write_manifest

    def spy(self: Store, run_id: str, manifest: dict[str, Any]) -> bool:
        if run_id != "r-killed":
            states.append(manifest["state"])
            if manifest["state"] == "running":
                assert manifest["heartbeat_seconds"] == 0.001
        return write(self, run_id, manifest)

    monkeypatch.setattr(Store, "write_manifest", spy)
    monkeypatch.setattr(executor, "HEARTBEAT_SECONDS", 0.001)  # beat on every loop turn
    spec = ms.ModelSpec("y ~ time", groups="subject")
    res = ms.fit_many(make_genes(), spec, split_by="gene", store=str(store),
                      client=cluster_client, progress=False)
    assert res.run.state == "complete"
    assert states[-1] == "complete" and states.count("running") >= 2, states
    assert not scratch.exists()
    ours = json.loads((store / "_runs" / f"{res.run.run_id}.json").read_text())
    assert ours["heartbeat_seconds"] is None  # ended: nothing to wait for
    assert ours["state"] == "complete"  # no late beat overwrote it
    import threading

    assert not [t for t in threading.enumerate() if t.name == "mixedscale-heartbeat"]


def test_the_heartbeat_beats_from_its_own_thread_and_says_when_it_cannot(
        caplog: pytest.LogCaptureFixture) -> None:
    """The driver's main loop can be busy for minutes in one step (restarting workers,
    committing failures); the heartbeat does not wait for it."""
    import logging

    from mixedscale.executor import _Heartbeat

    beats: list[float] = []
    beat = _Heartbeat(lambda: beats.append(time.monotonic()) or True, 0.01)
    beat.start()
    time.sleep(0.2)  # the main thread "busy"
    beat.stop()
    n = len(beats)
    assert n >= 5
    time.sleep(0.05)
    assert len(beats) == n  # stopped means stopped

    failing = _Heartbeat(lambda: False, 0.01)
    with caplog.at_level(logging.WARNING, logger="mixedscale.executor"):
        failing.start()
        time.sleep(0.2)
        failing.stop()
    said = [r.getMessage() for r in caplog.records if "heartbeat" in r.getMessage()]
    assert len(said) == 1 and "3 times in a row" in said[0], said
    assert failing.failed >= 5

    idle = _Heartbeat(lambda: beats.append(-1.0) or True, None)  # no store: no beats
    idle.start()
    time.sleep(0.05)
    assert not idle.thread.is_alive() and -1.0 not in beats


def test_a_run_sweeps_what_an_ended_run_left_and_survives_a_failing_sweep(
        tmp_path: Any, cluster_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import mixedscale as ms
    from mixedscale.store import Store

    from .conftest import make_genes

    store = tmp_path / "store"
    st = Store(str(store))
    st.init()
    # A failed run whose own cleanup did not finish (e.g. its driver lost the store).
    st.write_manifest("r-failed", {"run_id": "r-failed", "state": "failed"})
    scratch = store / "_tmp" / "shuffle-r-failed-1"
    scratch.mkdir()
    (scratch / "p0.parquet").write_bytes(b"x" * 1000)
    df = make_genes().query("gene in ['g000', 'g001']")
    spec = ms.ModelSpec("y ~ time", groups="subject")
    res = ms.fit_many(df, spec, split_by="gene", store=str(store), client=cluster_client,
                      progress=False)
    assert res.run.state == "complete" and len(res.fits) == 2
    assert not scratch.exists()
    assert list((store / "_tmp").iterdir()) == []

    def broken(self: Store, stale_after: float = 0.0) -> list[str]:
        raise PermissionError("listing _tmp")

    monkeypatch.setattr(Store, "sweep", broken)  # housekeeping never stops a run
    res = ms.fit_many(make_genes().query("gene == 'g002'"), spec, split_by="gene",
                      store=str(store), client=cluster_client, progress=False)
    assert res.run.state == "complete" and len(res.fits) == 1


def test_a_run_whose_scratch_was_swept_fails_clearly_and_a_rerun_resumes(
        tmp_path: Any, cluster_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run's sweep took this one for dead (or a user deleted the scratch): the
    run ends at once with a message that says so, not after retries as a failing
    store; what it committed is kept once, and a rerun completes the job."""
    import shutil
    from pathlib import Path

    import mixedscale as ms
    import mixedscale.executor as executor
    import mixedscale.plan as plan_mod

    from .clusterutil import check_invariant
    from .conftest import make_genes

    data = tmp_path / "data"
    data.mkdir()
    make_genes(n_genes=24, shuffle=True).to_parquet(data / "all.parquet", index=False,
                                                    row_group_size=100)
    monkeypatch.setattr(plan_mod, "UNIT_MAX_ROWS", 200)  # many units: a shuffled run
    store = tmp_path / "store"
    spec = ms.ModelSpec("y ~ time", groups="subject")
    real = executor._handle
    calls = {"n": 0}

    def sweep_then_handle(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:  # after the first task: the scratch goes
            for d in (store / "_tmp").glob("shuffle-*"):
                shutil.rmtree(d)
        return real(*args, **kw)

    monkeypatch.setattr(executor, "_handle", sweep_then_handle)
    with pytest.raises(ms.RunIncomplete, match=r"^this run's shuffle scratch .* is gone: another"):
        ms.fit_many(str(data), spec, split_by="gene", store=str(store),
                    client=cluster_client, progress=False)
    monkeypatch.setattr(executor, "_handle", real)
    res = ms.fit_many(str(data), spec, split_by="gene", store=str(store),
                      client=cluster_client, progress=False)
    assert res.plan.shuffle and res.run.state == "complete" and res.run.n_skipped >= 1
    check_invariant(Path(store), res.plan.fit_ids())
