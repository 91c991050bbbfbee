"""Cluster configs: a validated YAML file -> a Dask cluster (local, SLURM or PBS).

A ``ClusterConfig`` is frozen and validated on construction; ``load_cluster_config``
turns every validation failure into a ``SpecError`` that names the file and the
bad key. ``make_security`` builds mutual-TLS settings, ``make_jobqueue_cluster``
a dask-jobqueue cluster (imported lazily: ``pip install mixedscale[cluster]``),
``job_script`` the batch script such a cluster submits, and ``make_cluster`` a
started cluster of any kind, scaled to the configured size.

Workers always pin BLAS to one thread (``BLAS_ENV``): each worker thread runs
one fit, and a multi-threaded BLAS inside each would oversubscribe the cores.
Clusters mixedscale starts also run Dask's housekeeping less often
(``HOUSEKEEPING``), unless the user's Dask config already sets those keys.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError, one_line, read_yaml, suggest

if TYPE_CHECKING:
    from distributed import SpecCluster
    from distributed.security import Security

__all__ = [
    "BLAS_ENV",
    "ClusterConfig",
    "TLSConfig",
    "job_script",
    "load_cluster_config",
    "make_cluster",
    "make_jobqueue_cluster",
    "make_security",
    "parse_cluster_config",
    "with_overrides",
]

ClusterKind = Literal["local", "slurm", "pbs"]
JOBQUEUE_KINDS = ("slurm", "pbs")
# Exported in every worker job before the worker starts (one BLAS thread per worker thread).
BLAS_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# Dask's defaults suit interactive use: an event-loop health check every 20 ms in every
# process, a statistical profiler sampling each worker's threads every 10 ms, host
# metrics (psutil) every 500 ms in every server and each worker's memory read by it and
# its nanny every 100 ms. An idle 2-worker local cluster spent 12 % of a core on the
# first two; with those off it still took 45-100 ms of CPU per second, all processes
# together, and 8-26 with the last two slowed as well. A batch run's workers share
# their cores with that; its dashboard needs no profiles, and its tasks grow memory
# over seconds, so a memory check every 500 ms still pauses, spills and restarts
# workers in time.
HOUSEKEEPING: dict[str, Any] = {
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
}
REQUIRE_ENCRYPTION_ENV = "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"
JOB_NAME = "mixedscale-worker"
_PLACEHOLDER_ADDRESS = "<scheduler-address>:8786"
# SLURM: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; PBS: HH:MM:SS.
_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


def _check_bytes(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(value)
    except (ValueError, TypeError):
        n = -1
    if n <= 0:
        raise ValueError(
            f"{name} must be a positive size such as '4GB' or '1.5GiB'; got ({name}={value!r})"
        )
    return value


def check_memory_limit(value: str | None) -> str | None:
    """A worker memory limit: a positive size, or Dask's "auto" or "0" (no limit)."""
    if value is not None and str(value).strip().lower() in {"auto", "0"}:
        return value
    return _check_bytes("memory_limit", value)


class TLSConfig(BaseModel):
    """Mutual TLS: one CA plus one certificate/key pair used for every role.

    The certificate must carry both the serverAuth and clientAuth extended key
    usages (``deploy/tls/make_certs.py`` makes such certificates). ``key`` may be
    omitted when ``cert`` holds the private key too. ``require`` refuses every
    unencrypted connection (``distributed.comm.require-encryption``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: str
    cert: str
    key: str | None = None
    require: bool = True


class ClusterConfig(BaseModel):
    """Where and how big: a local cluster or a SLURM/PBS cluster via dask-jobqueue.

    ``workers``, ``threads_per_worker`` and ``memory_limit`` (per worker) size a
    local cluster. For ``slurm``/``pbs`` one batch job gets ``cores`` and
    ``memory`` and runs ``processes`` workers (default ``cores //
    threads_per_worker``); ``jobs`` jobs are submitted (else enough jobs for
    ``workers`` workers, else one). Jobqueue-only keys are ignored for ``local``
    so that one file serves both ``--cluster local`` and ``--cluster slurm``.
    ``job_extra_directives`` are scheduler directives without the ``#SBATCH``/
    ``#PBS`` prefix, e.g. ``--exclusive`` or ``-l place=scatter``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClusterKind = "local"
    workers: int | None = Field(default=None, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    memory_limit: str | None = None
    # dask-jobqueue
    queue: str | None = None
    account: str | None = None
    cores: int | None = Field(default=None, ge=1)
    processes: int | None = Field(default=None, ge=1)
    memory: str | None = None
    walltime: str | None = None
    jobs: int | None = Field(default=None, ge=1)
    job_extra_directives: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    interface: str | None = None
    local_directory: str | None = None
    tls: TLSConfig | None = None

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, v: str | None) -> str | None:
        return check_memory_limit(v)

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        return _check_bytes("memory", v)

    @field_validator("walltime", mode="before")
    @classmethod
    def _walltime_type(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool):
            raise ValueError(
                "walltime must be a quoted string such as '12:00:00' (YAML reads an unquoted "
                f"12:00:00 as a number of seconds); got (walltime={v!r})"
            )
        return v

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str | None) -> str | None:
        if v is not None and not _WALLTIME.match(v):
            raise ValueError(
                "walltime must look like 'HH:MM:SS' (SLURM also takes 'D-HH:MM:SS'); "
                f"got (walltime={v!r})"
            )
        return v

    @field_validator("job_extra_directives")
    @classmethod
    def _directives(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for d in v:
            if d.lstrip().startswith("#"):
                raise ValueError(
                    "job_extra_directives take no '#SBATCH'/'#PBS' prefix, it is added; "
                    f"got (job_extra_directives={d!r})"
                )
        return v

    @model_validator(mode="after")
    def _jobqueue(self) -> ClusterConfig:
        if self.kind not in JOBQUEUE_KINDS:
            return self
        for name in ("cores", "memory"):
            if getattr(self, name) is None:
                raise ValueError(
                    f"{name} is required for kind={self.kind!r} (per batch job); "
                    f"got ({name}=None)"
                )
        assert self.cores is not None
        if self.processes is not None:
            if self.cores % self.processes:
                raise ValueError(
                    "cores must be a multiple of processes; "
                    f"got (cores={self.cores}, processes={self.processes})"
                )
            if (
                "threads_per_worker" in self.model_fields_set
                and self.processes * self.threads_per_worker != self.cores
            ):
                raise ValueError(
                    "processes * threads_per_worker must equal cores; got "
                    f"(cores={self.cores}, processes={self.processes}, "
                    f"threads_per_worker={self.threads_per_worker})"
                )
        elif self.cores % self.threads_per_worker:
            raise ValueError(
                "cores must be a multiple of threads_per_worker; "
                f"got (cores={self.cores}, threads_per_worker={self.threads_per_worker})"
            )
        return self

    @property
    def worker_processes(self) -> int:
        """Dask workers per batch job (jobqueue kinds)."""
        if self.processes is not None:
            return self.processes
        return max(1, (self.cores or 1) // self.threads_per_worker)


# -- loading


def _fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names valid at ``loc`` (the parent of the offending key)."""
    current: type[BaseModel] = model
    for part in loc:
        field = current.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field is not None else None
        sub = next(
            (a for a in getattr(ann, "__args__", (ann,))
             if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if sub is None:
            break
        current = sub
    return list(current.model_fields)


def _describe(err: Mapping[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    key = ".".join(str(p) for p in loc) or "config"
    value = err.get("input")
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        hint = suggest(str(loc[-1]), _fields(ClusterConfig, loc[:-1]))
        return f"unknown cluster config key; got ({key}={value!r}){hint}"
    if kind == "value_error":
        ctx_err = (err.get("ctx") or {}).get("error")
        return str(ctx_err) if ctx_err is not None else str(err.get("msg", ""))
    if kind == "missing":
        return f"{key} is required; got ({key}=missing)"
    msg = str(err.get("msg", "invalid value"))
    msg = msg[0].lower() + msg[1:] if msg else msg
    hint = ""
    if kind == "literal_error" and isinstance(value, str):
        expected = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        hint = suggest(value, expected)
    return f"{key}: {msg}; got ({key}={value!r}){hint}"


def parse_cluster_config(
    data: Mapping[str, Any] | None,
    source: str = "cluster config",
    base_dir: str | os.PathLike[str] | None = None,
) -> ClusterConfig:
    """Validate a mapping into a ``ClusterConfig``, raising ``SpecError`` on any problem.

    ``source`` names the origin in messages. With ``base_dir``, relative TLS
    file paths and ``local_directory`` are taken relative to it.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError(
            f"{source}: a cluster config must be a mapping of keys to values; "
            f"got (config={type(data).__name__})"
        )
    raw: dict[str, Any] = dict(data)
    if base_dir is not None:
        base = Path(base_dir)
        tls = raw.get("tls")
        if isinstance(tls, Mapping):
            tls = dict(tls)
            for k in ("ca_file", "cert", "key"):
                if isinstance(tls.get(k), str) and not os.path.isabs(tls[k]):
                    tls[k] = str(base / tls[k])
            raw["tls"] = tls
        ld = raw.get("local_directory")
        if isinstance(ld, str) and not os.path.isabs(ld) and not ld.startswith("$"):
            raw["local_directory"] = str(base / ld)
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors(include_url=False)]
    if len(problems) == 1:
        raise SpecError(f"{source}: {problems[0]}") from None
    lines = "\n".join(f"  - {p}" for p in problems)
    raise SpecError(f"{source}: {len(problems)} problems:\n{lines}") from None


def with_overrides(
    cfg: ClusterConfig, source: str = "cluster config", **changes: Any
) -> ClusterConfig:
    """``cfg`` with ``changes`` (e.g. ``kind="slurm"`` from ``--cluster``), validated again.

    Unlike ``model_copy(update=...)`` this re-checks the rules (a ``slurm`` config
    needs ``cores`` and ``memory``) and raises ``SpecError`` naming ``source``.
    ``None`` values are ignored, so CLI options left unset change nothing.
    """
    update = {k: v for k, v in changes.items() if v is not None}
    if not update:
        return cfg
    return parse_cluster_config({**cfg.model_dump(exclude_unset=True), **update}, source=source)


def load_cluster_config(path: str) -> ClusterConfig:
    """Read a YAML cluster config; relative paths inside are relative to the file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"cluster config file not found; got (path={str(path)!r})")
    data = read_yaml(p, str(path))
    # Absolute: a PBS job starts in $HOME, not where the driver ran, and its script
    # passes these paths (TLS files, local_directory) to every worker as written.
    return parse_cluster_config(data, source=str(path), base_dir=p.resolve().parent)


# -- security


def make_security(tls: TLSConfig | None) -> Security | None:
    """Mutual-TLS ``Security`` for client, scheduler and worker, or None without TLS.

    The files are checked now (exist, parse, key matches cert) so that a bad path
    fails before any cluster work, with a ``SpecError`` naming the file.
    """
    if tls is None:
        return None
    from distributed.security import Security

    files = {"ca_file": tls.ca_file, "cert": tls.cert}
    if tls.key is not None:
        files["key"] = tls.key
    for name, path in files.items():
        if not os.path.isfile(path):
            raise SpecError(f"TLS {name} file not found; got (tls.{name}={path!r})")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise SpecError(
            f"TLS ca_file is not a PEM CA certificate ({exc}); got (tls.ca_file={tls.ca_file!r})"
        ) from None
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise SpecError(
            f"TLS cert and key must be a matching PEM certificate and private key ({exc}); "
            f"got (tls.cert={tls.cert!r}, tls.key={tls.key!r})"
        ) from None
    return Security(
        tls_ca_file=tls.ca_file,
        tls_client_cert=tls.cert,
        tls_client_key=tls.key,
        tls_scheduler_cert=tls.cert,
        tls_scheduler_key=tls.key,
        tls_worker_cert=tls.cert,
        tls_worker_key=tls.key,
        require_encryption=tls.require,
    )


# -- dask-jobqueue


def _jobqueue_module() -> Any:
    # dask_jobqueue's runner module sets, on import, a SIGINT handler that calls
    # sys.exit(): Ctrl-C then ended a run as SystemExit(None), exit status 0, as if
    # complete. The interpreter's handler (KeyboardInterrupt, exit 3) is put back.
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        import dask_jobqueue
    except ImportError:
        raise SpecError(
            "SLURM and PBS clusters need dask-jobqueue: pip install mixedscale[cluster]; "
            "got (dask_jobqueue=not installed)"
        ) from None
    finally:
        if main and before is not None and signal.getsignal(signal.SIGINT) is not before:
            signal.signal(signal.SIGINT, before)
    return dask_jobqueue


def _require_jobqueue(cfg: ClusterConfig) -> None:
    if cfg.kind not in JOBQUEUE_KINDS:
        raise SpecError(
            f"a batch-queue cluster needs kind 'slurm' or 'pbs'; got (kind={cfg.kind!r})"
        )


def housekeeping() -> dict[str, Any]:
    """``HOUSEKEEPING``, less the keys the user sets: in a Dask config file or a DASK_*
    variable (to any value), or with ``dask.config.set`` (to a value not Dask's default)."""
    import dask
    import distributed  # noqa: F401  (its defaults join dask.config.defaults on import)

    stock = dask.config.merge(*dask.config.defaults)
    user = dask.config.collect()  # files and environment only, no defaults
    missing = object()
    return {k: v for k, v in HOUSEKEEPING.items()
            if dask.config.get(k, missing, config=user) is missing
            and dask.config.get(k, None) == dask.config.get(k, None, config=stock)}


def _dask_env(config: Mapping[str, Any]) -> dict[str, str]:
    """``config`` as the DASK_* environment variables a worker's Dask reads at start."""
    return {"DASK_" + k.upper().replace(".", "__").replace("-", "_"): str(v)
            for k, v in config.items()}


def _prologue(cfg: ClusterConfig, security: Security | None) -> list[str]:
    lines = [f"export {k}={v}" for k, v in {**BLAS_ENV, **_dask_env(housekeeping())}.items()]
    if security is not None and security.require_encryption:
        lines.append(f"export {REQUIRE_ENCRYPTION_ENV}=True")
    return lines + list(cfg.job_script_prologue)


def _job_kwargs(cfg: ClusterConfig, security: Security | None) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "cores": cfg.cores,
        "processes": cfg.worker_processes,
        "memory": cfg.memory,
        "queue": cfg.queue,
        "account": cfg.account,
        "walltime": cfg.walltime,
        "job_extra_directives": list(cfg.job_extra_directives),
        "job_script_prologue": _prologue(cfg, security),
        "local_directory": cfg.local_directory,
        "job_name": JOB_NAME,
    }
    return kw


def _security_for(cfg: ClusterConfig, security: Security | None) -> Security | None:
    return security if security is not None else make_security(cfg.tls)


def make_jobqueue_cluster(
    cfg: ClusterConfig,
    security: Security | None = None,
    *,
    scheduler_options: Mapping[str, Any] | None = None,
) -> Any:
    """A ``SLURMCluster``/``PBSCluster`` from ``cfg``, with no jobs submitted yet.

    Its scheduler starts in this process (on ``cfg.interface`` if given); pass
    ``scheduler_options`` such as ``{"host": "127.0.0.1"}`` to override. Without
    ``security``, ``cfg.tls`` is used. Scale with ``cluster.scale(jobs=N)`` or use
    ``make_cluster``. The caller closes the cluster.
    """
    _require_jobqueue(cfg)
    jq = _jobqueue_module()
    security = _security_for(cfg, security)
    cls = jq.SLURMCluster if cfg.kind == "slurm" else jq.PBSCluster
    kwargs = _job_kwargs(cfg, security)
    if cfg.interface is not None:
        kwargs["interface"] = cfg.interface
    if security is not None:
        kwargs["security"] = security
        kwargs["protocol"] = "tls://"
    if scheduler_options is not None:
        kwargs["scheduler_options"] = dict(scheduler_options)
    import dask

    try:
        with dask.config.set(housekeeping()):  # the scheduler, started in this process
            return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"dask-jobqueue rejected the cluster config: {exc}; got (kind={cfg.kind!r})"
                        ) from None


def job_script(cfg: ClusterConfig, security: Security | None = None) -> str:
    """The batch script one job of ``cfg`` would run; no scheduler is started.

    The scheduler address in it is a placeholder: the real one is known only
    once ``make_jobqueue_cluster`` has started the scheduler.
    """
    _require_jobqueue(cfg)
    jq = _jobqueue_module()
    security = _security_for(cfg, security)
    job_cls = jq.SLURMCluster.job_cls if cfg.kind == "slurm" else jq.PBSCluster.job_cls
    protocol = "tls://" if security is not None else None
    kwargs = _job_kwargs(cfg, security)
    kwargs.update(protocol=protocol, security=security, interface=cfg.interface)
    try:
        job = job_cls((protocol or "tcp://") + _PLACEHOLDER_ADDRESS, name="dummy-name", **kwargs)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"dask-jobqueue rejected the cluster config: {exc}; got (kind={cfg.kind!r})"
                        ) from None
    return str(job.job_script())


# -- any kind


def _nanny_cluster() -> type:
    """``LocalCluster`` that leaves crashed workers to their nannies.

    SpecCluster closes a worker's nanny for good when no worker of that name is back
    ``distributed.deploy.lost-worker-timeout`` (15 s) after a removal. A fit that
    kills its worker on every attempt makes the nanny restart it over and over, and
    one check landing mid-restart closed the nanny: the run then waited forever with
    no workers. The nanny restarts its worker itself; nothing here needs closing."""
    from distributed import LocalCluster
    from distributed.deploy.cluster import Cluster

    class NannyCluster(LocalCluster):  # type: ignore[misc]
        def _update_worker_status(self, op: str, msg: Any) -> None:
            if op == "remove":
                Cluster._update_worker_status(self, op, msg)
                return
            super()._update_worker_status(op, msg)

    return NannyCluster


def make_cluster(
    cfg: ClusterConfig,
    security: Security | None = None,
    *,
    scheduler_options: Mapping[str, Any] | None = None,
) -> SpecCluster:
    """A started cluster of ``cfg.kind``, scaled to the configured size; the caller closes it.

    ``local``: ``workers`` worker processes (default: one per ``threads_per_worker``
    cores) of ``threads_per_worker`` threads. ``slurm``/``pbs``: ``jobs`` batch jobs,
    else enough for ``workers`` workers, else one job.
    """
    security = _security_for(cfg, security)
    if cfg.kind == "local":

        n = cfg.workers or max(1, (os.cpu_count() or 1) // cfg.threads_per_worker)
        opts: dict[str, Any] = dict(scheduler_options or {})
        kwargs: dict[str, Any] = {
            "n_workers": n,
            "threads_per_worker": cfg.threads_per_worker,
            "processes": True,
            "memory_limit": cfg.memory_limit or "auto",
            "local_directory": cfg.local_directory,
            "host": opts.pop("host", "127.0.0.1"),
            # Loopback only: a dashboard on 0.0.0.0 would expose the cluster.
            "dashboard_address": opts.pop("dashboard_address", "127.0.0.1:0"),
            "worker_dashboard_address": "127.0.0.1:0",
        }
        if opts:
            kwargs["scheduler_kwargs"] = opts
        if security is not None:
            kwargs.update(security=security, protocol="tls://")
        from ._workerlogs import QuietWorkerLogs

        # Worker processes share this process's stderr: errors only (see _workerlogs).
        kwargs["plugins"] = (QuietWorkerLogs(),)
        import dask

        # Environment set before each worker process starts, so BLAS reads it at import;
        # the scheduler and the nannies (which pass it on to their workers) read the
        # config as they are built. It replaces Dask's, whose MALLOC_TRIM_THRESHOLD_
        # slows fits (see _malloc, which undoes it on other clusters' workers).
        with dask.config.set({"distributed.nanny.pre-spawn-environ": BLAS_ENV,
                              **housekeeping()}):
            return _nanny_cluster()(**kwargs)
    cluster = make_jobqueue_cluster(cfg, security, scheduler_options=scheduler_options)
    if cfg.jobs is not None:
        cluster.scale(jobs=cfg.jobs)
    elif cfg.workers is not None:
        cluster.scale(n=cfg.workers)
    else:
        cluster.scale(jobs=1)
    # Wait for the submissions (not for the jobs to start): a refused sbatch/qsub was
    # only logged by the event loop, and the run then waited for workers forever. The
    # wait joins (or follows, under the cluster's lock) the one scale() scheduled; a job
    # whose submission failed is left in state "created".
    why = ""
    try:
        cluster.sync(cluster._correct_state)
    except Exception as exc:
        text = str(exc)
        why = one_line(text.split("stderr:", 1)[1]) if "stderr:" in text else one_line(exc)
        why = why or type(exc).__name__
    from distributed.core import Status

    refused = [w for w in cluster.workers.values()
               if getattr(w, "status", None) == Status.created]
    if why or refused:
        close_quietly(cluster)
        cmd = "sbatch" if cfg.kind == "slurm" else "qsub"
        raise SpecError(
            f"the batch system refused the worker jobs: {why or f'{cmd} failed (see above)'}"
            f"; check the cluster config (queue, account, walltime, memory) and that {cmd} "
            f"works where the driver runs (a login node); got (kind={cfg.kind!r})") from None
    return cluster  # type: ignore[no-any-return]


def close_quietly(cluster: Any) -> None:
    """Close a cluster whose failure is being reported: an error from closing it (a
    jobqueue cluster that never started raises AssertionError) must not replace that."""
    try:
        cluster.close()
    except Exception as exc:  # reported already: this is cleanup
        import logging

        logging.getLogger(__name__).debug("closing the cluster failed: %s", exc)
