"""The Dask executor: submits a plan's tasks, streams outcomes, survives failures.

Statistics never happen here. Failure handling:

- ``KilledWorker`` on a multi-fit task: the task is split into single fits and
  resubmitted, so innocent fits that shared a worker with a poison slice succeed.
  On a single fit, it is committed as an ``error`` row (``WorkerCrash``, or
  ``MemoryLimit`` when the worker left a memory marker).
- A corrupt input file fails its tasks' fits as ``DataError`` rows naming the file.
- A store write failure is retried, then fails the run (exit 3); nothing
  partial is visible because parts are staged and published atomically.
- Losing the scheduler, or a stop request (SIGTERM), ends the run as
  ``interrupted``/``failed`` with RunIncomplete (exit 3); a rerun resumes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from .errors import DataError, RunIncomplete, StoreError
from .plan import Plan, Task
from .single import versions
from .source import Source
from .store import Store
from .worker import TaskOutcome, TaskPayload, failure_tables, load_unit, partition, piece, run_task

__all__ = ["RunOptions", "RunSummary", "execute", "local_cluster", "pending"]

log = logging.getLogger(__name__)

_STORE_RETRIES = 2
_PARTITION_BYTES = 128 * 2**20


@dataclass
class RunOptions:
    timeout: float | None = None
    engine: str | None = None
    progress: bool | None = None  # None: on when stderr is a TTY
    stop: threading.Event = field(default_factory=threading.Event)
    job: dict[str, Any] | None = None


@dataclass
class RunSummary:
    run_id: str
    state: str
    n_planned: int
    n_skipped: int  # already committed before this run
    n_run: int
    by_status: dict[str, int]
    bytes_read: int
    bytes_scan: int
    bytes_one_pass: int
    plan_seconds: float
    wall_seconds: float
    fit_seconds: float
    n_workers: int
    n_tasks: int
    n_split: int
    message: str = ""
    tables: dict[str, list[pa.Table]] = field(default_factory=dict)

    @property
    def fits_per_second(self) -> float:
        return self.n_run / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def overhead(self) -> float:
        """Wall time against per-fit time spread over the workers, minus one."""
        ideal = self.fit_seconds / max(self.n_workers, 1)
        return self.wall_seconds / ideal - 1.0 if ideal > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "tables"}
        d.update(fits_per_second=self.fits_per_second, overhead=self.overhead)
        return d


def local_cluster(workers: int | None = None, memory_limit: str | None = None) -> Any:
    """The embedded default: one single-threaded worker process per core, BLAS pinned."""
    from .cluster import ClusterConfig, make_cluster

    return make_cluster(ClusterConfig(kind="local", workers=workers, memory_limit=memory_limit))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if not enabled or total == 0:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("fitting"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            transient=True)
        self.bar.start()
        self.tid = self.bar.add_task("fits", total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.tid, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _Run:
    def __init__(self, plan: Plan, src: Source, store: Store | None, client: Any,
                 opts: RunOptions) -> None:
        self.plan, self.src, self.store, self.client, self.opts = plan, src, store, client, opts
        self.run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.by_status: dict[str, int] = {}
        self.bytes_read = 0
        self.fit_seconds = 0.0
        self.n_run = 0
        self.n_split = 0
        self.tables: dict[str, list[pa.Table]] = {"fits": [], "params": [], "variance": []}
        self.unit_refs: dict[int, int] = {}  # tasks of a unit not finished yet
        self.loads_seen: set[str] = set()
        self.unit_futures: dict[int, Any] = {}
        self.key_fields = [src.schema.field(c) for c in plan.split_by]
        self.store_failures: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self.started = _now()

    # -- payloads and submission
    def payload(self, task: Task) -> TaskPayload:
        return TaskPayload(
            task=task,
            keys={it.slice: self.plan.slices[it.slice].key for it in task.items},
            specs={it.spec: self.plan.specs[it.spec] for it in task.items},
            split_by=self.plan.split_by, key_fields=self.key_fields, run_id=self.run_id,
            timeout=self.opts.timeout, engine=self.opts.engine)

    def unit_data(self, unit: int) -> Any:
        if unit in self.unit_futures:
            return self.unit_futures[unit]
        u = self.plan.units[unit]
        keys = [self.plan.slices[i].key for i in u.slices]
        if self.src.frame is not None:
            df, _ = self.src.read(self.plan.columns)
            from .worker import Loaded, _restrict

            data = Loaded(_restrict(df, self.plan.split_by, keys), 0)
            fut = self.client.scatter(data, hash=False)
        elif self.plan.shuffle:
            fut = [self.client.submit(piece, p, unit, pure=False) for p in self.partitions]
        else:
            rgs = [self.src.row_groups[i] for i in u.row_groups]
            fut = self.client.submit(load_unit, self.src, rgs, self.plan.columns,
                                     self.plan.split_by, keys, pure=False,
                                     key=f"mixedscale-load-{self.run_id}-{unit}")
        self.unit_futures[unit] = fut
        return fut

    def submit(self, task: Task) -> Any:
        data = self.unit_data(task.unit)
        return self.client.submit(run_task, self.payload(task), data, self.store, pure=False,
                                  key=f"mixedscale-fit-{task.key}-{uuid.uuid4().hex[:6]}")

    def expect(self, tasks: list[Task]) -> None:
        for t in tasks:
            self.unit_refs[t.unit] = self.unit_refs.get(t.unit, 0) + 1

    def release(self, task: Task) -> None:
        """Drop a unit's loaded data once its last task is done, so workers free it."""
        self.unit_refs[task.unit] -= 1
        if self.unit_refs[task.unit] == 0:
            self.unit_futures.pop(task.unit, None)

    def start_shuffle(self) -> None:
        key_unit = {self.plan.slices[i].key: u.index for u in self.plan.units for i in u.slices}
        batches: list[list[Any]] = [[]]
        size = 0
        for rg in self.src.row_groups:
            if batches[-1] and size + rg.nbytes > _PARTITION_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(rg)
            size += rg.nbytes
        self.partitions = [
            self.client.submit(partition, self.src, b, self.plan.columns, self.plan.split_by,
                               key_unit, pure=False) for b in batches if b]

    # -- outcomes
    def commit_failure(self, task: Task, etype: str, msg: str) -> None:
        tables = failure_tables(self.payload(task), etype, msg)
        if self.store is not None:
            self.store.publish(task.key, tables)
        else:
            for k, t in tables.items():
                self.tables[k].append(t)
        self.account_status({"error": len(task.items)}, len(task.items))

    def account_status(self, by_status: dict[str, int], n: int) -> None:
        for k, v in by_status.items():
            self.by_status[k] = self.by_status.get(k, 0) + v
        self.n_run += n

    def oom_marker(self, task: Task) -> bool:
        if self.store is None:
            return False
        return bool(self.store.fs.exists(self.store.path("_runs", f"{self.run_id}.oom",
                                                         task.key)))

    def manifest(self, state: str, plan_info: dict[str, Any], message: str = "",
                 n_skipped: int = 0) -> None:
        if self.store is None:
            return
        self.store.write_manifest(self.run_id, {
            "run_id": self.run_id, "state": state, "started": self.started,
            "ended": _now() if state != "running" else None, "job": self.opts.job,
            "versions": versions(), "plan": plan_info, "n_planned": self.plan.n_fits,
            "n_skipped": n_skipped, "n_run": self.n_run, "by_status": self.by_status,
            "bytes_read": self.bytes_read + self.plan.bytes_scan,
            "wall_seconds": time.perf_counter() - self.t0, "message": message,
            "pid": os.getpid(),
        })


def pending(plan: Plan, store: Store | None) -> tuple[list[Task], int]:
    """Tasks still to run; committed ones are skipped, split ones resume split."""
    if store is None:
        return list(plan.tasks), 0
    done = store.committed_parts()
    todo: list[Task] = []
    skipped = 0
    for t in plan.tasks:
        if t.key in done:
            skipped += len(t.items)
            continue
        if any(d.startswith(t.key + "-f") for d in done):
            for it in t.items:
                s = t.single(it)
                if s.key in done:
                    skipped += 1
                else:
                    todo.append(s)
            continue
        todo.append(t)
    return todo, skipped


def execute(plan: Plan, src: Source, store: Store | None, client: Any, opts: RunOptions
            ) -> RunSummary:
    """Run every pending task of ``plan`` on ``client``; raise RunIncomplete if cut short."""
    from distributed import as_completed
    from distributed.client import FutureCancelledError

    run = _Run(plan, src, store, client, opts)
    if store is not None:
        store.init()
    todo, n_skipped = pending(plan, store)
    info = plan.describe()
    run.manifest("running", info, n_skipped=n_skipped)
    n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {}))) \
        if client is not None else 0
    window = max(8 * n_workers, 32)
    enabled = sys.stderr.isatty() if opts.progress is None else opts.progress
    bar = _Progress(sum(len(t.items) for t in todo), enabled)
    queue = list(reversed(todo))
    run.expect(todo)
    inflight: dict[Any, Task] = {}
    ac = as_completed(loop=client.loop) if todo else None
    state, message = "complete", ""
    if plan.shuffle and todo:
        run.start_shuffle()
    try:
        while queue or inflight:
            if opts.stop.is_set():
                raise RunIncomplete("interrupted: stopped submitting on request; "
                                    "rerun the job to resume")
            while queue and len(inflight) < window:
                task = queue.pop()
                fut = run.submit(task)
                inflight[fut] = task
                if ac is not None:
                    ac.add(fut)
            batch = ac.next_batch(block=False) if ac is not None else []
            if not batch:
                if client.status not in ("running", "connecting"):
                    raise RunIncomplete(f"lost the Dask scheduler (client {client.status}); "
                                        "rerun the job against a live scheduler to resume")
                time.sleep(0.01)
                continue
            for fut in batch:
                task = inflight.pop(fut)
                _handle(run, fut, task, queue, bar, FutureCancelledError)
                run.release(task)
                del fut
    except RunIncomplete as exc:
        state, message = ("interrupted" if opts.stop.is_set() else "failed"), str(exc)
        for fut in inflight:
            fut.cancel()
        raise
    except (OSError, TimeoutError) as exc:
        state = "failed"
        message = f"infrastructure failure: {type(exc).__name__}: {exc}"
        raise RunIncomplete(message) from exc
    except KeyboardInterrupt:
        state, message = "interrupted", "interrupted by the user"
        raise RunIncomplete(message) from None
    finally:
        bar.close()
        run.manifest(state, info, message, n_skipped=n_skipped)
    return RunSummary(
        run_id=run.run_id, state=state, n_planned=plan.n_fits, n_skipped=n_skipped,
        n_run=run.n_run, by_status=run.by_status, bytes_read=run.bytes_read + plan.bytes_scan,
        bytes_scan=plan.bytes_scan, bytes_one_pass=plan.bytes_one_pass,
        plan_seconds=plan.plan_seconds, wall_seconds=time.perf_counter() - run.t0,
        fit_seconds=run.fit_seconds, n_workers=n_workers, n_tasks=len(todo),
        n_split=run.n_split, message=message, tables=run.tables)


def _handle(run: _Run, fut: Any, task: Task, queue: list[Task], bar: _Progress,
            cancelled: type[BaseException]) -> None:
    from distributed import KilledWorker

    if fut.status == "finished":
        out: TaskOutcome = fut.result()
        run.account_status(out.by_status, out.n_fits)
        run.fit_seconds += out.fit_seconds
        for token, nb in out.loads.items():
            if token not in run.loads_seen:
                run.loads_seen.add(token)
                run.bytes_read += nb
        if out.tables is not None:
            for k, t in out.tables.items():
                run.tables[k].append(t)
        if out.timed_out and out.worker:
            _restart(run.client, out.worker)
        bar.advance(out.n_fits)
        return
    if fut.status == "cancelled":
        raise RunIncomplete("tasks were cancelled: the Dask scheduler was lost or restarted; "
                            "rerun the job to resume")
    exc = fut.exception()
    if isinstance(exc, cancelled):
        raise RunIncomplete(f"tasks were cancelled ({exc}); rerun the job to resume")
    if isinstance(exc, KilledWorker):
        if len(task.items) > 1:
            log.warning("task %s lost its worker repeatedly; retrying its %d fits one by one",
                        task.key, len(task.items))
            run.n_split += 1
            singles = [task.single(it) for it in task.items]
            run.expect(singles)
            queue.extend(singles)
            return
        if run.oom_marker(task):
            run.commit_failure(task, "MemoryLimit", "the fit exceeded the worker's memory "
                               "limit and the worker was restarted")
        else:
            run.commit_failure(task, "WorkerCrash", "the worker died on every attempt at "
                               f"this fit ({exc})")
        bar.advance(len(task.items))
        return
    if isinstance(exc, DataError):
        run.commit_failure(task, "DataError", str(exc))
        bar.advance(len(task.items))
        return
    if isinstance(exc, (StoreError, OSError)):
        n = run.store_failures.get(task.key, 0) + 1
        run.store_failures[task.key] = n
        if n <= _STORE_RETRIES:
            log.warning("store write for task %s failed (%s); retrying", task.key, exc)
            run.expect([task])
            queue.append(task)
            return
        raise RunIncomplete(f"store writes keep failing: {exc}")
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise RunIncomplete(f"worker interrupted: {exc}")
    # An unexpected exception is a bug in mixedscale; keep the run going and say so.
    log.error("task %s raised %s: %s", task.key, type(exc).__name__, exc)
    run.commit_failure(task, f"InternalError.{type(exc).__name__}", str(exc))
    bar.advance(len(task.items))


def _restart(client: Any, worker: str) -> None:
    """Reclaim a worker whose abandoned (timed-out) fit thread may still be running."""
    try:
        client.restart_workers([worker], timeout=60, raise_for_error=False)
    except (OSError, TimeoutError, ValueError) as exc:
        log.warning("could not restart worker %s: %s", worker, exc)


Callback = Callable[[TaskOutcome], None]
