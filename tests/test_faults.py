"""Fault injection on a real cluster (issue "Clusters and faults", §3), Jepsen-style.

Every case runs `mixedscale run JOB --scheduler ...` as a subprocess against a
`dask scheduler` + `dask worker --nanny` cluster of separate processes (tests/clusterutil),
injects one fault, and then checks the store's invariant with ``check_invariant``:
every planned fit is in the store exactly once (counted over all part files) or
recorded as failed with a reason; lost = ∅, duplicated = ∅; params/variance rows only
for committed fits; no unreadable file outside ``_tmp``.

Faults inside workers come from MIXEDSCALE_TEST_FAULTS (see worker._maybe_inject and
store._publish_faults). Most cases share one cluster whose fault rules are switched on
by a file for the duration of a test (``"while": PATH``); cases that need a different
cluster (chaos, two threads, a killed scheduler) start their own. Case 15 (TLS) is
tests/test_tls.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import mixedscale as ms
from mixedscale.errors import SpecError

from .clusterutil import (
    DaskCluster,
    base_env,
    check_invariant,
    cli_args,
    committed_parts,
    dask_cluster,
    faults_env,
    flip_column,
    invoke,
    manifests,
    planned,
    read_parts,
    run_cli,
    spawn,
    stop,
    tail,
    wait_for,
    write_genes,
    write_job,
)
from .conftest import make_genes

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

RI = {"name": "ri", "formula": "y ~ time", "groups": "subject"}
RS = {"name": "rs", "formula": "y ~ time", "groups": "subject", "re_formula": "~time"}
# statsmodels' engine fits one slice at a time (never batched): per-fit semantics, and
# enough planned cost that a small job has many tasks.
SM = {"name": "sm", "formula": "y ~ time", "groups": "subject", "engine": "statsmodels"}
UNREACHABLE = "tcp://127.0.0.1:1"


def fit_of(report: dict[str, Any], gene: str) -> dict[str, Any]:
    rows = report["fits"][report["fits"]["gene"] == gene]
    assert len(rows) == 1, rows
    return dict(rows.iloc[0])


def no_errors_except(report: dict[str, Any], *genes: str) -> None:
    fits = report["fits"]
    bad = fits[(fits["status"] == "error") & ~fits["gene"].isin(genes)]
    assert bad.empty, bad[["gene", "error_type", "error_message"]].to_string()


def finish(p: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the driver did not finish in {timeout:g} s:\n{tail(log)}") from None


def mid_run(store: Path, p: subprocess.Popen[bytes], log: Path, n_parts: int = 1) -> None:
    """Wait until the run has committed ``n_parts`` tasks and is still running."""
    wait_for(lambda: committed_parts(store) >= n_parts or p.poll() is not None, 90,
             "the first committed tasks", on_fail=lambda: tail(log))
    assert p.poll() is None, f"the run ended before it could be interrupted:\n{tail(log)}"


class Faulty:
    """The shared cluster, and its fault switches."""

    def __init__(self, cluster: DaskCluster, switches: Path) -> None:
        self.cluster, self.switches = cluster, switches

    @contextlib.contextmanager
    def on(self, *names: str) -> Iterator[DaskCluster]:
        """Faults ``names`` switched on; off again (and the cluster idle) afterwards."""
        for n in names:
            (self.switches / n).touch()
        try:
            yield self.cluster
        finally:
            for n in names:
                (self.switches / n).unlink(missing_ok=True)
            self.cluster.wait_idle()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    """Two single-threaded workers (1 GiB each, allowed-failures 1) with every rule below
    wired in but off until its switch file exists."""
    d = tmp_path_factory.mktemp("faulty")
    sw = d / "switches"
    sw.mkdir()

    def rule(switch: str, **r: Any) -> dict[str, Any]:
        return {**r, "while": str(sw / switch)}

    env = faults_env(
        rule("slow", at="task_start", do="sleep", seconds=0.3),  # runs can be caught mid-way
        rule("victim", key=["g005"], do="hang", seconds=300, once=str(sw / "victim.pid")),
        rule("poison", key=["g007"], do="kill"),
        rule("oom", key=["g011"], do="oom"),
        rule("hang", key=["g003"], do="hang", seconds=3600),
        # one fits write fails half-way
        rule("enospc-once", at="publish", table="fits", do="enospc", after_bytes=200,
             once=str(sw / "enospc-once.fired")),
        # every params write fails half-way
        rule("enospc", at="publish", table="params", do="enospc", after_bytes=100),
        # a worker dies inside one commit: params and variance published, fits not
        rule("crash-commit", at="publish", table="fits", do="kill",
             once=str(sw / "crash-commit.fired")),
    )
    with dask_cluster(d / "cluster", 2, worker_env=env, memory_limit="1GiB",
                      allowed_failures=1) as cl:
        yield Faulty(cl, sw)


@pytest.fixture
def sleepy(faulty: Faulty) -> Iterator[DaskCluster]:
    with faulty.on("slow") as cl:
        yield cl


# 1 ----------------------------------------------------------------------------------
def test_worker_sigkilled_mid_fit_is_retried_and_committed_once(tmp_path: Path,
                                                                   faulty: Faulty) -> None:
    job = write_job(tmp_path / "job.yaml", write_genes(tmp_path / "data", 30),
                    tmp_path / "store")
    ids = planned(job).fit_ids()
    victim = faulty.switches / "victim.pid"
    victim.unlink(missing_ok=True)
    with faulty.on("victim") as cl:
        pids = set(cl.worker_pids().values())
        p, log = cl.start_cli(["run", str(job), "--quiet"])
        pid = wait_for(lambda: victim.exists() and victim.read_text().strip(), 60,
                       "the fit of g005 to start", on_fail=lambda: tail(log))
        assert int(pid) in pids  # a worker process, not a nanny or the driver
        os.kill(int(pid), signal.SIGKILL)
        assert finish(p, log) == 0, tail(log)
    rep = check_invariant(tmp_path / "store", ids)
    assert fit_of(rep, "g005")["status"] != "error"
    no_errors_except(rep)


# 2 ----------------------------------------------------------------------------------
def test_continuous_chaos_killworker_run_completes(tmp_path: Path) -> None:
    from distributed.chaos import KillWorker

    data = write_genes(tmp_path / "data", 200)
    # Every task sleeps first, so the run outlasts KillWorker's 2 s delay however few
    # tasks the planner cuts. A worker lives exp(mean 2 s) after it starts, so a task
    # needing T s survives an attempt with chance exp(-T/2). With a 0.8 s sleep and 10
    # attempts, one CI run on a slow moment committed nothing in 180 s (each worker
    # restarted ~50 times in 240 s; its one task, or its 200 one-fit pieces, each
    # sleeping too, kept dying). Hence a shorter sleep and more attempts per task.
    env = faults_env({"at": "task_start", "do": "sleep", "seconds": 0.5})
    restarts = 0
    with dask_cluster(tmp_path / "cluster", 2, worker_env=env, allowed_failures=25,
                      preload=["mixedscale.executor"]) as cl:
        # KillWorker's delay is random (exponential, mean 2 s per worker): 2 runs in 15
        # here ended before any kill. Run again, on a fresh store, until one lands.
        for attempt in range(5):
            store = tmp_path / f"store{attempt}"
            job = write_job(tmp_path / f"job{attempt}.yaml", data, store)
            with cl.client() as c:
                # segfault: a hard crash the nanny restarts from (mode "sys.exit" exits
                # 0, which the nanny takes as a clean shutdown and does not restart).
                # Workers preload mixedscale, so a fresh worker is not killed while
                # importing.
                c.register_plugin(KillWorker(delay="2s", mode="segfault"), name="chaos")
            r = cl.cli(["run", str(job), "--quiet"], timeout=240)
            assert r.returncode == 0, r.stderr[-3000:]
            _stop_chaos(cl)
            ids = planned(job).fit_ids()
            rep = check_invariant(store, ids)
            assert set(rep["errors"].values()) <= {"WorkerCrash"}, rep["errors"]
            assert rep["by_status"].get("error", 0) <= len(ids) // 10, rep["by_status"]
            assert manifests(store)[-1]["state"] == "complete"
            restarts = sum(tail(f, 10**7).count("Worker process")
                           for f in (tmp_path / "cluster").glob("worker-*.log"))
            if restarts:
                break
    assert restarts >= 1, "KillWorker never killed a worker"


def test_a_task_dealt_to_a_worker_is_run_after_every_worker_died(tmp_path: Path) -> None:
    """The first task of a run is dealt to a worker (``_Run.spread_over``). If every
    worker dies while it runs, Dask parks it in no-worker with that worker's address,
    and offers it to none of the restarted workers (their addresses are new): the run
    waited forever (the continuous-chaos test above: 1 run in 6). It must be resubmitted
    and finish."""
    data = write_genes(tmp_path / "data", 20)
    job = write_job(tmp_path / "job.yaml", data, tmp_path / "store")
    plan = planned(job)
    assert len(plan.tasks) == 1, "precondition: one task, dealt to a worker"
    started = tmp_path / "store" / "_runs"
    env = faults_env({"at": "task_start", "do": "sleep", "seconds": 3})
    # allowed-failures 25: two deaths while it runs must not end it as KilledWorker
    # (which the executor resubmits unpinned anyway, hiding the hang).
    with dask_cluster(tmp_path / "cluster", 2, worker_env=env, allowed_failures=25,
                      preload=["mixedscale.executor"]) as cl:
        pids = cl.worker_pids()
        p, log = cl.start_cli(["run", str(job), "--quiet"])
        wait_for(lambda: any(started.glob("*.started/*/*")), 60, "the task to start",
                 on_fail=lambda: tail(log))
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        assert finish(p, log, timeout=90) == 0, tail(log)
    rep = check_invariant(tmp_path / "store", plan.fit_ids())
    no_errors_except(rep)


def test_a_shuffled_run_finishes_after_its_units_home_workers_died(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A spilled shuffle's tasks go to their unit's home worker (``_Run.home_units``).
    When every worker dies while tasks run, the tasks dealt to them get new homes on
    the restarted workers (new addresses), and every fit is committed once."""
    import threading

    import mixedscale.plan as plan_mod

    data = write_genes(tmp_path / "data", 24, shuffle=True, row_group_size=100)
    monkeypatch.setattr(plan_mod, "UNIT_MAX_ROWS", 200)  # many units: a shuffled run
    store = tmp_path / "store"
    gate = tmp_path / "slow"  # tasks start slowly until the workers are killed
    gate.touch()
    env = faults_env({"at": "task_start", "do": "sleep", "seconds": 2, "while": str(gate)})
    out: dict[str, Any] = {}
    caplog.set_level("INFO", logger="mixedscale.executor")
    with dask_cluster(tmp_path / "cluster", 2, worker_env=env, allowed_failures=25,
                      preload=["mixedscale.executor"]) as cl, cl.client() as client:
        pids = cl.worker_pids()

        def run() -> None:
            try:
                out["res"] = ms.fit_many(str(data), ms.ModelSpec("y ~ time", groups="subject"),
                                         split_by="gene", store=str(store), client=client,
                                         progress=False)
            except BaseException as exc:  # re-raised below, in the test's thread
                out["exc"] = exc

        th = threading.Thread(target=run, daemon=True)
        th.start()
        wait_for(lambda: any((store / "_runs").glob("*.started/*/*")), 60,
                 "a fit task to start", on_fail=cl.logs)
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        gate.unlink()
        th.join(120)
        assert not th.is_alive(), f"the run did not finish:\n{cl.logs()}"
    if "exc" in out:
        raise out["exc"]
    res = out["res"]
    assert res.plan.shuffle and len(res.plan.units) >= 2 and res.run.state == "complete"
    assert "dealt to a worker that has left" in caplog.text  # resubmitted to new homes
    no_errors_except(check_invariant(store, res.plan.fit_ids()))


def _stop_chaos(cl: Any) -> None:
    """Unregister the KillWorker plugin. It keeps killing workers meanwhile, and the
    scheduler drops the call when a worker dies during its broadcast: retry."""
    for attempt in range(5):
        try:
            with cl.client() as c:
                c.unregister_worker_plugin("chaos")
            return
        except OSError:  # distributed's CommClosedError is one
            if attempt == 4:
                raise
            time.sleep(1.0)


# 3 ----------------------------------------------------------------------------------
def test_poison_slice_is_a_worker_crash_and_innocents_succeed(tmp_path: Path,
                                                               faulty: Faulty) -> None:
    job = write_job(tmp_path / "job.yaml", write_genes(tmp_path / "data", 30),
                    tmp_path / "store")
    plan = planned(job)
    poison_task = next(t for t in plan.tasks
                       if any(plan.slices[it.slice].key == ("g007",) for it in t.items))
    assert len(poison_task.items) > 1  # innocent fits share the poison slice's task
    with faulty.on("poison") as cl:
        r = cl.cli(["run", str(job), "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    rep = check_invariant(tmp_path / "store", plan.fit_ids())
    poison = fit_of(rep, "g007")
    assert poison["status"] == "error" and poison["error_type"] == "WorkerCrash", poison
    no_errors_except(rep, "g007")


# 4 ----------------------------------------------------------------------------------
def test_memory_blowup_fails_that_fit_with_memory_limit(tmp_path: Path,
                                                         faulty: Faulty) -> None:
    job = write_job(tmp_path / "job.yaml", write_genes(tmp_path / "data", 30),
                    tmp_path / "store")
    ids = planned(job).fit_ids()
    with faulty.on("oom") as cl:
        r = cl.cli(["run", str(job), "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    rep = check_invariant(tmp_path / "store", ids)
    hog = fit_of(rep, "g011")
    assert hog["status"] == "error" and hog["error_type"] == "MemoryLimit", hog
    assert "memory" in hog["error_message"]
    no_errors_except(rep, "g011")


# 5 ----------------------------------------------------------------------------------
def test_hanging_fit_times_out_and_the_run_ends(tmp_path: Path, faulty: Faulty) -> None:
    job = write_job(tmp_path / "job.yaml", write_genes(tmp_path / "data", 30),
                    tmp_path / "store", models=[SM], fit={"timeout": 2})
    ids = planned(job).fit_ids()
    with faulty.on("hang") as cl:
        t0 = time.monotonic()
        r = cl.cli(["run", str(job), "--quiet"], timeout=120)
        took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    rep = check_invariant(tmp_path / "store", ids)
    hung = fit_of(rep, "g003")
    assert hung["status"] == "error" and hung["error_type"] == "FitTimeout", hung
    no_errors_except(rep, "g003")
    assert took < 90


# 6 ----------------------------------------------------------------------------------
def test_driver_kill9_then_rerun_zombie_writes_lose(tmp_path: Path) -> None:
    """The first driver's task is held inside its commit (params and variance published,
    fits not yet) while the driver is SIGKILLed and a second driver commits that task;
    then the zombie is released and its fits write must lose cleanly.

    Workers have two threads: a zombie occupies a worker thread that the scheduler
    believes free, so with one thread the second run would queue behind it."""
    store = tmp_path / "store"
    job = write_job(tmp_path / "job.yaml", write_genes(tmp_path / "data", 40), store,
                    models=[SM])
    plan = planned(job)
    assert len(plan.tasks) >= 4, "precondition: the job must have several tasks"
    held, gate = tmp_path / "held.pid", tmp_path / "gate"
    env = faults_env({"at": "publish", "table": "fits", "do": "wait", "path": str(gate),
                      "seconds": 120, "once": str(held)})
    with dask_cluster(tmp_path / "cluster", 2, nthreads=2, worker_env=env) as cl:
        p1, log1 = cl.start_cli(["run", str(job), "--quiet"], name="first")
        wait_for(held.exists, 60, "a commit to be held", on_fail=lambda: tail(log1))
        os.killpg(p1.pid, signal.SIGKILL)
        p1.wait(timeout=30)
        r = cl.cli(["run", str(job), "--quiet"])
        assert r.returncode == 0, r.stderr[-3000:]
        check_invariant(store, plan.fit_ids())  # complete before the zombie wakes up
        gate.touch()
        cl.wait_idle()
    rep = check_invariant(store, plan.fit_ids())
    no_errors_except(rep)
    states = [m["state"] for m in manifests(store)]
    assert states.count("complete") == 1 and states.count("running") == 1, states


# 7 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "fit"])
def test_driver_sigterm_exits_3_interrupted_then_rerun_completes(
        tmp_path: Path, sleepy: DaskCluster, command: str) -> None:
    store = tmp_path / "store"
    data = write_genes(tmp_path / "data", 40)
    job = write_job(tmp_path / "job.yaml", data, store, models=[SM])
    plan = planned(job)
    assert len(plan.tasks) >= 4, "precondition: the job must have several tasks"
    args = ["run", str(job), "--quiet"]
    if command == "fit":  # one model, no job file: the engine is a run-wide override
        args = ["fit", str(data), "--formula", SM["formula"], "--groups", SM["groups"],
                "--split-by", "gene", "--engine", SM["engine"], "--store", str(store),
                "--quiet"]
        from mixedscale.api import prepare

        spec = ms.ModelSpec(SM["formula"], groups=SM["groups"], name=SM["formula"])
        plan = prepare(str(data), [spec], "gene", engine=SM["engine"])[1]
    p, log = sleepy.start_cli(args, name=f"sigterm-{command}")
    mid_run(store, p, log)
    p.send_signal(signal.SIGTERM)
    assert finish(p, log, 60) == 3, tail(log)
    assert "interrupted" in tail(log)
    (first,) = manifests(store)
    assert first["state"] == "interrupted", first
    check_invariant(store, plan.fit_ids(), incomplete=True)
    sleepy.wait_idle()
    r = sleepy.cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    sleepy.wait_idle()
    check_invariant(store, plan.fit_ids())
    assert manifests(store)[-1]["state"] == "complete"


@pytest.mark.cluster
def test_ctrl_c_on_the_embedded_cluster_exits_3_without_worker_tracebacks(
        tmp_path: Path) -> None:
    """Ctrl-C signals the whole process group: the driver ends the run as interrupted;
    the workers (which printed a KeyboardInterrupt traceback each) leave it to it."""
    store = tmp_path / "store"
    job = write_job(tmp_path / "job.yaml", write_genes(tmp_path / "data", 40), store,
                    models=[SM])
    log = tmp_path / "driver.out"
    env = base_env(faults_env({"at": "task_start", "do": "sleep", "seconds": 0.3}))
    p = spawn(cli_args(["run", str(job), "--quiet", "--workers", "2"], None), log, env,
              tmp_path)
    try:
        mid_run(store, p, log)
        os.killpg(p.pid, signal.SIGINT)
        assert finish(p, log, 90) == 3, tail(log)
    finally:
        stop(p)
    out = tail(log, 20000)
    assert "interrupted" in out and "Traceback" not in out, out
    assert manifests(store)[-1]["state"] == "interrupted"


# 8 ----------------------------------------------------------------------------------
def test_scheduler_killed_driver_exits_3_rerun_on_new_scheduler(tmp_path: Path) -> None:
    store = tmp_path / "store"
    job = write_job(tmp_path / "job.yaml", write_genes(tmp_path / "data", 40), store,
                    models=[SM])
    plan = planned(job)
    env = faults_env({"at": "task_start", "do": "sleep", "seconds": 0.3})
    with dask_cluster(tmp_path / "cluster", 2, worker_env=env) as cl:
        p, log = cl.start_cli(["run", str(job), "--quiet"])
        mid_run(store, p, log)
        cl.kill_scheduler()
        assert finish(p, log, 60) == 3, tail(log)
        err = tail(log)
        assert "lost the Dask scheduler" in err and "rerun" in err.lower(), err
        assert manifests(store)[-1]["state"] == "failed"
        check_invariant(store, plan.fit_ids(), incomplete=True)
        # Workers shut down without their scheduler: a new scheduler, new workers.
        for w in cl.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.pid, signal.SIGKILL)
        cl.start_scheduler()
        cl.start_workers(2)
        cl.wait_for_workers(2)
        r = cl.cli(["run", str(job), "--quiet"])
        assert r.returncode == 0, r.stderr[-3000:]
        cl.wait_idle()
    check_invariant(store, plan.fit_ids())


# 9 ----------------------------------------------------------------------------------
def test_failing_part_write_is_never_visible_and_is_retried(tmp_path: Path,
                                                            faulty: Faulty) -> None:
    data = write_genes(tmp_path / "data", 40)
    job1 = write_job(tmp_path / "job1.yaml", data, tmp_path / "store1", models=[SM])
    job2 = write_job(tmp_path / "job2.yaml", data, tmp_path / "store2", models=[SM])
    with faulty.on("enospc-once") as cl:  # one fits write fails: retried, then committed
        r = cl.cli(["run", str(job1)])
        assert r.returncode == 0, r.stderr[-3000:]
        assert (faulty.switches / "enospc-once.fired").exists()
        assert "retrying" in r.stderr
    check_invariant(tmp_path / "store1", planned(job1).fit_ids())

    with faulty.on("enospc") as cl:  # every params write fails: the run gives up
        r = cl.cli(["run", str(job2), "--quiet"])
        assert r.returncode == 3, r.stderr[-3000:]
        assert "store writes keep failing" in r.stderr
        cl.wait_idle()
        check_invariant(tmp_path / "store2", planned(job2).fit_ids(), incomplete=True)
        assert committed_parts(tmp_path / "store2") == 0, \
            read_parts(tmp_path / "store2", "fits").to_string()
    r = faulty.cluster.cli(["run", str(job2), "--quiet"])  # the disk has room again
    assert r.returncode == 0, r.stderr[-3000:]
    faulty.cluster.wait_idle()
    check_invariant(tmp_path / "store2", planned(job2).fit_ids())


def test_worker_dies_between_the_part_files_of_one_commit(tmp_path: Path,
                                                          faulty: Faulty) -> None:
    store = tmp_path / "store"
    job = write_job(tmp_path / "job.yaml", write_genes(tmp_path / "data", 40), store,
                    models=[SM])
    with faulty.on("crash-commit") as cl:
        r = cl.cli(["run", str(job), "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (faulty.switches / "crash-commit.fired").exists()
    rep = check_invariant(store, planned(job).fit_ids())
    no_errors_except(rep)


def test_disk_full_on_a_real_tmpfs(tmp_path: Path, sleepy: DaskCluster) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        store = disk / "store"
        job = write_job(tmp_path / "job.yaml", write_genes(tmp_path / "data", 40), store,
                        models=[SM])
        ids = planned(job).fit_ids()
        r = sleepy.cli(["run", str(job), "--quiet"])
        assert r.returncode == 3, r.stderr[-3000:]
        assert "No space left on device" in r.stderr
        sleepy.wait_idle()
        check_invariant(store, ids, incomplete=True)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = sleepy.cli(["run", str(job), "--quiet"])
        assert r.returncode == 0, r.stderr[-3000:]
        sleepy.wait_idle()
        check_invariant(store, ids)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# 10 ---------------------------------------------------------------------------------
def test_corrupt_inputs_are_named_and_other_slices_proceed(
        tmp_path: Path, sleepy: DaskCluster) -> None:
    data = write_genes(tmp_path / "data", 40, files=4)  # part-k holds g(10k)..g(10k+9)
    truncated, flipped, empty = (data / f"part-{i}.parquet" for i in (1, 2, 3))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    flip_column(flipped, "y")
    empty.write_bytes(b"")
    with pytest.raises(Exception):  # noqa: B017 - the precondition: y is unreadable
        pq.read_table(flipped, columns=["y"])
    assert pq.read_table(flipped, columns=["gene"]).num_rows == 480
    store = tmp_path / "store"
    job = write_job(tmp_path / "job.yaml", data, store, models=[SM])

    v = run_cli(["validate", str(job)], cwd=tmp_path)
    assert v.returncode == 0, v.stderr
    assert str(truncated) in v.stderr and str(empty) in v.stderr

    plan = planned(job)
    r = sleepy.cli(["run", str(job), "--quiet"], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(truncated) in r.stderr and str(empty) in r.stderr
    rep = check_invariant(store, plan.fit_ids())
    fits = rep["fits"]
    genes = set(fits["gene"])
    assert genes == {f"g{i:03d}" for i in [*range(10), *range(20, 30)]}  # 1 and 3 left out
    bad = fits[fits["gene"].between("g020", "g029")]
    assert (bad["status"] == "error").all() and (bad["error_type"] == "DataError").all()
    assert bad["error_message"].str.contains(str(flipped), regex=False).all()
    good = fits[fits["gene"] < "g010"]
    assert (good["status"] != "error").all(), good[["gene", "error_message"]]
    skipped = manifests(store)[-1]["plan"]["skipped_files"]
    assert set(skipped) == {str(truncated), str(empty)}


# 11 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["type", "missing"])
def test_schema_mismatch_across_files_is_rejected_at_plan_time(
        tmp_path: Path, change: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    df = make_genes(n_genes=4)
    df.iloc[:96].to_parquet(data / "a.parquet", index=False)
    other = df.iloc[96:].copy()
    if change == "type":
        other["y"] = other["y"].map(lambda v: f"{v:.3f}")
    else:
        other = other.drop(columns="time")
    other.to_parquet(data / "b.parquet", index=False)
    store = tmp_path / "store"
    job = write_job(tmp_path / "job.yaml", data, store)
    column = "'y'" if change == "type" else "'time'"
    code, _, err = invoke(["validate", str(job)])
    assert code == 2 and str(data / "b.parquet") in err and column in err, err
    # `run` rejects it before contacting any scheduler (this one does not exist).
    r = run_cli(["run", str(job), "--scheduler", UNREACHABLE], cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert str(data / "b.parquet") in r.stderr and column in r.stderr, r.stderr
    assert not store.exists()


# 12 ---------------------------------------------------------------------------------
MALICIOUS = [
    "y ~ __import__('os').system('touch CANARY')",
    "y ~ I(__import__('os').system('touch CANARY'))",
    "y ~ os.system('touch CANARY')",
    "y ~ np.os.system('touch CANARY')",
    "y ~ np.lib.npyio.os.system('touch CANARY')",
    "y ~ eval(\"__import__('os').system('touch CANARY')\")",
    "y ~ exec('import os')",
    "y ~ open('CANARY', 'w')",
    "y ~ (lambda: __import__('os'))()",
    "y ~ time.__class__.__mro__",
    "y ~ log(time).__globals__",
    "y ~ getattr(np, 'os')",
    "y ~ C(time, __import__('os').system('touch CANARY'))",
    "y ~ [c for c in ().__class__.__bases__]",
    "y ~ {'a': 1}",
    "y ~ time[0]",
    "y ~ I(time if __import__('os').system('touch CANARY') else time)",
    "y ~ time; import os",
    "y ~ time\nimport os",
    "__import__('os').system('touch CANARY') ~ time",
    "y ~ f\"{__import__('os').system('touch CANARY')}\"",
    "y ~ np.log.__self__",
    "y ~ Q('__builtins__')",
    "y ~ globals()",
    "y ~ vars()",
    "y ~ breakpoint()",
    "y ~ __builtins__",
    "y ~ I((time).__class__)",
    "y ~ time + _",
]


def test_malicious_formulas_and_yaml_run_nothing(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    canary = tmp_path / "CANARY"
    df = make_genes(n_genes=1)
    for text in MALICIOUS:
        with pytest.raises(SpecError):
            ms.fit(df, ms.ModelSpec(text, groups="subject"))
    for field, text in [("groups", "__import__('os').system('touch CANARY')"),
                        ("re_formula", "~__import__('os').system('touch CANARY')"),
                        ("vc_formula", {"v": "0 + eval('touch CANARY')"})]:
        with pytest.raises(SpecError):
            ms.fit(df, ms.ModelSpec("y ~ time", **{"groups": "subject", field: text}))
    assert not canary.exists()

    data = write_genes(tmp_path / "data", 2)
    bad_formula = write_job(tmp_path / "formula.yaml", data, tmp_path / "store", models=[
        {"formula": "y ~ I(__import__('os').system('touch CANARY'))", "groups": "subject"}])
    yaml_tag = tmp_path / "tag.yaml"
    yaml_tag.write_text(
        "data: !!python/object/apply:os.system ['touch CANARY']\n"
        f"store: {tmp_path / 'store'}\n"
        "models:\n  - formula: y ~ time\n    groups: subject\n")
    yaml_tag2 = tmp_path / "tag2.yaml"
    yaml_tag2.write_text(
        json.dumps({"data": {"path": str(data), "split_by": ["gene"]},
                    "models": [{"formula": "y ~ time", "groups": "subject"}]})[:-1]
        + ', "name": !!python/object/apply:os.system ["touch CANARY"]}\n')
    for job in (bad_formula, yaml_tag, yaml_tag2):
        code, _, err = invoke(["validate", str(job)])
        assert code == 2 and err.startswith("error: "), (job.name, err)
        assert not canary.exists()
    for job in (bad_formula, yaml_tag):  # as a real process, against no scheduler
        r = run_cli(["run", str(job), "--scheduler", UNREACHABLE], cwd=tmp_path, timeout=60)
        assert r.returncode == 2, (job.name, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
    assert not canary.exists()
    assert not (tmp_path / "store").exists()


# 13 ---------------------------------------------------------------------------------
def test_same_job_twice_at_once_and_again_after(tmp_path: Path, sleepy: DaskCluster) -> None:
    store = tmp_path / "store"
    job = write_job(tmp_path / "job.yaml", write_genes(tmp_path / "data", 40), store,
                    models=[SM])
    ids = planned(job).fit_ids()
    runs = [sleepy.start_cli(["run", str(job), "--quiet"], name=f"twin{i}") for i in range(2)]
    for p, log in runs:
        assert finish(p, log) == 0, tail(log)
    sleepy.wait_idle()
    check_invariant(store, ids)
    first = manifests(store)
    assert [m["state"] for m in first] == ["complete", "complete"]
    assert sum(m["n_run"] for m in first) >= len(ids)  # every fit ran in one or both

    r = sleepy.cli(["run", str(job), "--quiet"])
    assert r.returncode == 0, r.stderr
    last = manifests(store)[-1]
    assert last["state"] == "complete" and last["n_run"] == 0, last
    check_invariant(store, ids)


# 14 ---------------------------------------------------------------------------------
def test_two_different_jobs_into_one_store_concurrently(
        tmp_path: Path, sleepy: DaskCluster) -> None:
    store = tmp_path / "store"
    data = write_genes(tmp_path / "data", 40)
    job_a = write_job(tmp_path / "a.yaml", data, store, models=[SM], name="a")
    job_b = write_job(tmp_path / "b.yaml", data, store, models=[RS], name="b")
    ids_a, ids_b = planned(job_a).fit_ids(), planned(job_b).fit_ids()
    assert not set(ids_a) & set(ids_b)
    runs = [sleepy.start_cli(["run", str(j), "--quiet"], name=j.stem) for j in (job_a, job_b)]
    for p, log in runs:
        assert finish(p, log) == 0, tail(log)
    sleepy.wait_idle()
    check_invariant(store, ids_a, others=ids_b)
    check_invariant(store, ids_b, others=ids_a)
    assert len(ms.open_store(str(store)).fits()) == len(ids_a) + len(ids_b)
    assert len(read_parts(store, "fits")) == len(ids_a) + len(ids_b)
    assert [m["state"] for m in manifests(store)] == ["complete", "complete"]
