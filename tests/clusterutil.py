"""A real Dask cluster for the tests: `dask scheduler` and `dask worker --nanny` as separate
process groups on 127.0.0.1, plus `mixedscale` CLI runs as subprocesses.

Every process is started in a session of its own, so teardown kills the whole group
(a nanny and its worker process, a driver and anything it spawned) with SIGKILL, also
when the test fails. Waits are polls with deadlines, never bare sleeps.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT = 60.0
_LIVE: set[int] = set()  # process-group ids still to kill at interpreter exit


def _kill_all_live() -> None:
    for pgid in list(_LIVE):
        kill_group(pgid)


atexit.register(_kill_all_live)


def _kill_all_live_on_term(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, a CI job's cancel) ends Python without its atexit hooks: the
    clusters would live on, idle but waking, and slow whatever runs next."""
    _kill_all_live()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


with contextlib.suppress(ValueError):  # not the main thread: leave its handler alone
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _kill_all_live_on_term)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without Dask/fault settings, BLAS pinned to 1 thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DASK_") and k != "MIXEDSCALE_TEST_FAULTS"}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    # Fail fast on an unreachable scheduler instead of dask's default 30 s.
    env["DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"] = "5s"
    env.update(extra or {})
    return env


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    if sig == signal.SIGKILL:
        _LIVE.discard(pgid)


def spawn(args: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path
          ) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session (its own process group), output to ``log``."""
    with open(log, "ab") as fh:
        p = subprocess.Popen(list(args), env=dict(env), cwd=cwd, stdout=fh,
                             stderr=subprocess.STDOUT, start_new_session=True)
    _LIVE.add(p.pid)
    return p


def stop(p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Kill ``p``'s whole process group and reap it."""
    kill_group(p.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=timeout)


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.05,
             on_fail: Callable[[], str] | None = None) -> Any:
    """Poll ``pred`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            extra = on_fail() if on_fail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{extra}")
        time.sleep(poll)


@dataclass
class DaskCluster:
    """Handles on a running scheduler and its nanny-managed workers."""

    workdir: Path
    port: int
    n_workers: int
    nthreads: int
    preload: list[str]
    memory_limit: str
    worker_env: dict[str, str]
    scheduler_env: dict[str, str]
    scheduler: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    drivers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    generation: int = 0

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    # -- lifecycle
    def start_scheduler(self) -> None:
        self.generation += 1
        sched_file = self.workdir / f"scheduler-{self.generation}.json"
        self.scheduler = spawn(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1",
             "--port", str(self.port), "--no-dashboard",
             # the HTTP server (health, metrics) stays up without a dashboard: keep it local
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)],
            self.workdir / "scheduler.log", base_env(self.scheduler_env), self.workdir)
        sched = self.scheduler

        def ready() -> bool:
            if sched.poll() is not None:
                raise AssertionError(f"dask scheduler exited early:\n{self.logs()}")
            return sched_file.exists() and sched_file.stat().st_size > 0

        wait_for(ready, START_TIMEOUT, "the dask scheduler", on_fail=self.logs)
        addr = json.loads(sched_file.read_text())["address"]
        assert addr == self.address, (addr, self.address)

    def start_workers(self, n: int) -> None:
        for _ in range(n):
            i = len(self.workers)
            self.workers.append(spawn(
                [sys.executable, "-m", "dask", "worker", self.address, "--host", "127.0.0.1",
                 "--nworkers", "1", "--nthreads", str(self.nthreads), "--nanny",
                 "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                 "--memory-limit", self.memory_limit, "--death-timeout", "60",
                 "--name", f"w{i}",
                 *(a for m in self.preload for a in ("--preload", m))],
                self.workdir / f"worker-{i}.log", base_env(self.worker_env), self.workdir))

    def stop_all(self) -> None:
        for p in [*self.drivers, *self.workers]:
            stop(p)
        if self.scheduler is not None:
            stop(self.scheduler)

    # -- inspection
    def client(self, timeout: str = "10s") -> Any:
        from distributed import Client

        return Client(self.address, timeout=timeout)

    def wait_for_workers(self, n: int | None = None, timeout: float = START_TIMEOUT) -> None:
        n = self.n_workers if n is None else n
        with self.client() as c:
            try:
                c.wait_for_workers(n, timeout=timeout)
            except TimeoutError:
                raise AssertionError(f"{n} workers did not register:\n{self.logs()}") from None

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> pid of the worker process (the nanny's child)."""
        with self.client() as c:
            return dict(c.run(os.getpid))

    def n_tasks(self) -> int:
        """Tasks the scheduler still knows about (in flight, or zombies of a dead driver)."""
        with self.client() as c:
            return int(c.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)))

    def wait_idle(self, timeout: float = 60.0) -> None:
        wait_for(lambda: self.n_tasks() == 0, timeout, "the cluster to finish every task",
                 poll=0.2, on_fail=self.logs)

    def logs(self) -> str:
        out = []
        for f in sorted(self.workdir.glob("*.log")):
            out.append(f"--- {f.name}\n{tail(f, 2500)}")
        return "\n".join(out)

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        stop(self.scheduler)

    # -- the CLI
    def cli(self, args: Sequence[str], *, timeout: float = 180.0, env: Mapping[str, str]
            | None = None, scheduler: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(args, cwd=self.workdir, timeout=timeout, env=env,
                       scheduler=self.address if scheduler else None)

    def start_cli(self, args: Sequence[str], name: str = "driver",
                  env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}-{len(self.drivers)}.out"
        p = spawn(cli_args(args, self.address), log, base_env(env), self.workdir)
        self.drivers.append(p)
        return p, log


def cli_args(args: Sequence[str], scheduler: str | None) -> list[str]:
    out = [sys.executable, "-m", "mixedscale.cli", *args]
    if scheduler is not None and args and args[0] == "run":
        out += ["--scheduler", scheduler]
    return out


def run_cli(args: Sequence[str], *, cwd: Path, timeout: float = 180.0,
            env: Mapping[str, str] | None = None, scheduler: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run ``mixedscale ARGS`` to completion in its own process group."""
    p = subprocess.Popen(cli_args(args, scheduler), env=base_env(env), cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    _LIVE.add(p.pid)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p.pid)
        out, err = p.communicate()
        raise AssertionError(f"mixedscale {' '.join(args)} did not finish in {timeout:g} s"
                             f"\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}") from None
    finally:
        kill_group(p.pid)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def invoke(args: Sequence[str]) -> tuple[int, str, str]:
    """Run the CLI in this process (fast): (exit code, stdout, stderr).

    For commands that fail before any cluster work; `run` installs a SIGTERM handler,
    which is restored afterwards.
    """
    from typer.testing import CliRunner

    from mixedscale.cli import app

    before = signal.getsignal(signal.SIGTERM)
    try:
        r = CliRunner().invoke(app, list(args))
    finally:
        signal.signal(signal.SIGTERM, before)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


@contextlib.contextmanager
def dask_cluster(workdir: Path, n_workers: int = 2, *, nthreads: int = 1,
                 memory_limit: str = "2GiB", preload: Sequence[str] = (),
                 worker_env: Mapping[str, str] | None = None,
                 scheduler_env: Mapping[str, str] | None = None,
                 allowed_failures: int | None = 1, wait: bool = True) -> Iterator[DaskCluster]:
    """A scheduler and ``n_workers`` nanny workers (``nthreads`` each), stopped on exit.

    ``worker_env`` reaches the worker processes (e.g. MIXEDSCALE_TEST_FAULTS);
    ``allowed_failures`` sets distributed.scheduler.allowed-failures on the scheduler;
    ``preload`` modules are imported by each worker before it registers.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    senv = dict(scheduler_env or {})
    if allowed_failures is not None:
        senv.setdefault("DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES", str(allowed_failures))
    cl = DaskCluster(workdir=workdir, port=free_port(), n_workers=n_workers,
                     nthreads=nthreads, preload=list(preload), memory_limit=memory_limit,
                     worker_env=dict(worker_env or {}), scheduler_env=senv)
    try:
        for attempt in range(3):  # the free port may be taken before the scheduler binds it
            try:
                cl.start_scheduler()
                break
            except AssertionError:
                if attempt == 2:
                    raise
                if cl.scheduler is not None:
                    stop(cl.scheduler)
                cl.port = free_port()
        cl.start_workers(n_workers)
        if wait:
            cl.wait_for_workers(n_workers)
        yield cl
    finally:
        cl.stop_all()


def faults_env(*rules: Mapping[str, Any]) -> dict[str, str]:
    return {"MIXEDSCALE_TEST_FAULTS": json.dumps(list(rules))}


# -- jobs and data -------------------------------------------------------------------


def write_genes(path: Path, n_genes: int, *, files: int = 1, seed: int = 0,
                shuffle: bool = False, row_group_size: int | None = None) -> Path:
    """``n_genes`` slices (48 rows each) as ``files`` Parquet files under ``path``."""
    from .conftest import make_genes

    df = make_genes(n_genes=n_genes, seed=seed, shuffle=shuffle)
    path.mkdir(parents=True, exist_ok=True)
    genes = sorted(df["gene"].unique())
    chunks = [genes[i::files] if shuffle else genes[i * len(genes) // files:
                                                      (i + 1) * len(genes) // files]
              for i in range(files)]
    for i, keep in enumerate(chunks):
        part = df[df["gene"].isin(keep)]
        part.to_parquet(path / f"part-{i}.parquet", index=False,
                        row_group_size=row_group_size)
    return path


def flip_column(path: Path, column: str) -> None:
    """Invert every byte of ``column``'s chunks (page headers and data), footer intact:
    the file still plans, but that column cannot be read."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata
    raw = bytearray(path.read_bytes())
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    for g in range(md.num_row_groups):
        cc = md.row_group(g).column(names.index(column))
        start = min(o for o in (cc.dictionary_page_offset, cc.data_page_offset) if o)
        for i in range(start, start + cc.total_compressed_size):
            raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def write_job(path: Path, data: str | Path, store: str | Path, *, models: Sequence[Mapping[
        str, Any]] | None = None, split_by: Sequence[str] = ("gene",), fit: Mapping[str, Any]
        | None = None, name: str = "test") -> Path:
    """A job file (YAML is a superset of JSON, so this writes JSON)."""
    job: dict[str, Any] = {
        "name": name,
        "data": {"path": str(data), "split_by": list(split_by)},
        "models": list(models or [{"name": "ri", "formula": "y ~ time", "groups": "subject"}]),
        "store": str(store),
    }
    if fit:
        job["fit"] = dict(fit)
    path.write_text(json.dumps(job, indent=2))
    return path


def planned(job: Path) -> Any:
    """The job's plan, computed in this process (no cluster, no fitting)."""
    from mixedscale.api import prepare
    from mixedscale.job import load_job

    j = load_job(job)
    _, plan = prepare(j.data.path, j.specs(), j.data.split_by, j.data.filter)
    return plan


def manifests(store: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted((store / "_runs").glob("*.json")):
        out.append(json.loads(f.read_text()))
    return sorted(out, key=lambda m: m.get("started") or "")


def committed_parts(store: Path) -> int:
    d = store / "fits"
    return len(list(d.glob("part-*.parquet"))) if d.is_dir() else 0


# -- the invariant ---------------------------------------------------------------------

_STAGING = (r"^(fits|params|variance)-[0-9a-z-]+\.[0-9a-f]{32}\.parquet$",
            r"^run-[0-9TZ]+-[0-9a-f]{8}\.[0-9a-f]{32}\.json$")


def read_parts(store: Path, table: str) -> Any:
    """Every row of every part file of ``table`` (no deduplication), with its file name.

    Fails naming the file if any part is unreadable or misnamed.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    d = store / table
    for f in sorted(d.iterdir()) if d.is_dir() else []:
        assert f.name.startswith("part-") and f.name.endswith(".parquet"), \
            f"unexpected file in {table}/: {f.name}"
        try:
            t = pq.read_table(f)
        except Exception as exc:  # any reader error is a torn or partial file
            raise AssertionError(f"unreadable part file {f}: {exc}") from None
        frames.append(t.to_pandas().assign(_file=f.name))
    if not frames:
        return pd.DataFrame(columns=["fit_id", "gene", "status", "error_type", "error_message",
                                     "_file"])
    return pd.concat(frames, ignore_index=True)


def check_invariant(store: Path, planned_fit_ids: Sequence[str] | set[str], *,
                    others: Sequence[str] | set[str] = (), incomplete: bool = False
                    ) -> dict[str, Any]:
    """Jepsen-style check of a store after a (possibly faulty) run.

    - every planned fit is in fits/ exactly once, counted over all part files (lost = ∅,
      duplicated = ∅), and each is ``ok``/``not_converged`` or an ``error`` with a reason;
    - no fit outside ``planned_fit_ids`` ∪ ``others`` (another job's fits);
    - params/variance rows only for committed fits, each fit's rows from one part only;
    - every file outside ``_tmp`` is a readable part file; ``_tmp`` holds only staging
      leftovers.

    ``incomplete=True`` checks a store after a run that did not finish: fits may be
    missing, but none is duplicated and nothing partial is visible.

    Returns {"fits": frame, "by_status": {...}, "errors": {fit_id: error_type}}.
    """
    import re

    planned_ids = set(planned_fit_ids)
    allowed = planned_ids | set(others)
    fits = read_parts(store, "fits")
    counts = fits["fit_id"].value_counts()
    lost = planned_ids - set(counts.index)
    duplicated = {k: int(v) for k, v in counts.items() if v > 1}
    unexpected = set(counts.index) - allowed
    assert incomplete or not lost, \
        f"lost fits: {len(lost)} of {len(planned_ids)}: {sorted(lost)[:5]}"
    assert not duplicated, f"duplicated fits: {dict(list(duplicated.items())[:5])}"
    assert not unexpected, f"fits nobody planned: {sorted(unexpected)[:5]}"
    ok_status = {"ok", "not_converged", "error"}
    assert set(fits["status"]) <= ok_status, set(fits["status"])
    err = fits[fits["status"] == "error"]
    no_reason = err[err["error_type"].isna() | (err["error_type"] == "")
                    | err["error_message"].isna() | (err["error_message"] == "")]
    assert no_reason.empty, f"failed fits without a reason: {no_reason['fit_id'].tolist()[:5]}"
    committed = set(counts.index)
    for table in ("params", "variance"):
        rows = read_parts(store, table)
        if rows.empty:
            continue
        orphans = set(rows["fit_id"]) - committed
        # Rows of a task whose fits part never landed are invisible to readers; they
        # are allowed only if they belong to a planned fit of this store.
        assert orphans <= allowed, f"{table} rows of unknown fits: {sorted(orphans)[:5]}"
        live = rows[rows["fit_id"].isin(committed)]
        per_fit = live.groupby("fit_id")["_file"].nunique()
        twice = per_fit[per_fit > 1]
        assert twice.empty, f"{table} rows of one fit in several parts: {twice.to_dict()}"
    tmp = store / "_tmp"
    if tmp.is_dir():
        for f in tmp.iterdir():
            assert any(re.match(p, f.name) for p in _STAGING), \
                f"unexpected file under _tmp: {f.name}"
    for extra in store.iterdir():  # _corrupt, _retried: parts a rerun moved aside
        assert extra.name in {"fits", "params", "variance", "_runs", "_tmp", "_corrupt",
                              "_retried"}, \
            f"unexpected entry in the store: {extra.name}"
    return {
        "fits": fits,
        "by_status": {str(k): int(v) for k, v in fits["status"].value_counts().items()},
        "errors": dict(zip(err["fit_id"], err["error_type"], strict=True)),
    }
