"""The ``mixedscale`` command line.

Exit codes: 0 the run is complete (whatever the models' statuses); 1 ``--fail-on``
matched; 2 the job or the data is invalid; 3 the run is incomplete
(infrastructure failure, lost scheduler, or interrupted).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import MixedscaleError, RunIncomplete, SpecError, StoreError

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fit linear mixed models by the thousand on Dask, into a Parquet store.")

EXIT_OK, EXIT_FAIL_ON, EXIT_INVALID, EXIT_INCOMPLETE = 0, 1, 2, 3


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"mixedscale {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="print the version and exit")] = False) -> None:
    """Fit linear mixed models by the thousand on Dask, into a Parquet store."""


class FailOn(StrEnum):
    not_converged = "not_converged"
    error = "error"


class Table(StrEnum):
    fits = "fits"
    params = "params"
    variance = "variance"
    specs = "specs"


class Fmt(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class ClusterKind(StrEnum):
    local = "local"
    slurm = "slurm"
    pbs = "pbs"


def _err(msg: str, code: int) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def _exit_for(exc: MixedscaleError) -> typer.Exit:
    return _err(str(exc), EXIT_INCOMPLETE if isinstance(exc, RunIncomplete) else exc.exit_code)


class _SyncCancelRace(logging.Filter):
    """Drops distributed's own error when Ctrl-C lands just as ``distributed.utils.sync``
    starts a call: its cancel callback reads a variable not set yet (a NameError) and
    tornado logs the traceback. The run still ends as interrupted, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NameError) and "sync.<locals>.cancel" in record.getMessage())


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import distributed  # noqa: F401 - it configures its loggers on import; quiet them after

    for noisy in ("distributed", "tornado", "asyncio", "bokeh"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    tornado_app = logging.getLogger("tornado.application")
    if not any(isinstance(f, _SyncCancelRace) for f in tornado_app.filters):
        tornado_app.addFilter(_SyncCancelRace())
    # A lost scheduler makes the client log reconnect tracebacks; the run ends with
    # its own one-line error (exit 3) instead.
    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)


def _print_summary(result: Any, stderr: bool = False, title: str = "run") -> None:
    from rich.console import Console
    from rich.table import Table as RTable
    from rich.text import Text

    s = result.summary()
    t = RTable(title=Text(f"mixedscale {title} {s['run_id']} ({s['state']})"),
               show_header=False)
    for k in ("n_planned", "n_fitted_this_run", "n_resumed", "by_status", "fits_per_second",
              "wall_seconds", "plan_seconds", "overhead", "bytes_read", "bytes_one_pass",
              "n_workers", "store"):
        t.add_row(k, Text(str(s[k])))  # Text: rich would read "[...]" in values as markup
    Console(stderr=stderr).print(t)


def _require_store(job: Any, flag: bool = True) -> None:
    if job.store is None:
        how = ("add 'store: PATH' to the job file or pass --store PATH" if flag else
               "add 'store: PATH' to the job file (`run` also takes --store PATH)")
        raise SpecError("the job has no store, so its results would be lost when the run "
                        f"ends; {how}; got (store=None)")


def _fail_on(result: Any, fail_on: FailOn | None) -> int:
    if fail_on is None:
        return EXIT_OK
    counts = result.status_counts()  # the status column only: a job may hold 10^6 fits
    bad = sum(n for st, n in counts.items()
              if (st == "error" if fail_on is FailOn.error else st != "ok"))
    if bad:
        typer.echo(f"--fail-on {fail_on.value}: {bad} fits matched", err=True)
        return EXIT_FAIL_ON
    return EXIT_OK


def _security(ca: Path | None, cert: Path | None, key: Path | None, config: Any) -> Any:
    if ca or cert or key:
        if not (ca and cert and key):
            raise SpecError("TLS needs --tls-ca-file, --tls-cert and --tls-key together; "
                            f"got (tls-ca-file={ca}, tls-cert={cert}, tls-key={key})")
        from .cluster import TLSConfig, make_security

        return make_security(TLSConfig(ca_file=str(ca), cert=str(cert), key=str(key)))
    if config is not None and getattr(config, "tls", None) is not None:
        from .cluster import make_security

        return make_security(config.tls)
    return None


def _install_sigterm(stop: Any) -> None:
    def handler(signum: int, frame: Any) -> None:
        logging.getLogger("mixedscale").warning("SIGTERM: stopping; rerun the job to resume")
        stop.set()

    signal.signal(signal.SIGTERM, handler)


@app.command()
def run(
    job_file: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="the job file")],
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Dask scheduler "
                                                  "address; default: an embedded cluster")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1,
                                                help="embedded cluster size")] = None,
    store: Annotated[str | None, typer.Option("--store", help="results store (overrides "
                                              "the job's)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar, no "
                                        "summary")] = False,
    fail_on: Annotated[FailOn | None, typer.Option("--fail-on", help="exit 1 if any fit "
                                                   "has this status or worse")] = None,
    cluster: Annotated[ClusterKind | None, typer.Option("--cluster", help="local, or a "
                                                        "batch system via dask-jobqueue")] = None,
    cluster_config: Annotated[Path | None, typer.Option("--cluster-config",
                                                        help="cluster YAML")] = None,
    tls_ca_file: Annotated[Path | None, typer.Option(
        "--tls-ca-file", help="CA certificate (PEM) of a TLS scheduler; with the two next")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        "--tls-cert", help="this client's certificate (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        "--tls-key", help="this client's private key (PEM)")] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="auto, fast or "
                                               "statsmodels, for every model")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="per-fit timeout, "
                                                  "seconds")] = None,
    retry_errors: Annotated[bool, typer.Option(
        "--retry-errors", help="also refit the store's fits that failed for the run's "
        "sake: FitTimeout, WorkerCrash, MemoryLimit, DataError (an unreadable input "
        "file)")] = False,
    output: Annotated[Fmt, typer.Option(
        "--format", help="the run summary as a terminal table, or as one JSON object "
        "(for pipelines)")] = Fmt.table,
) -> None:
    """Run a job file: plan, fit on Dask, stream results into the store."""
    _setup_logging(quiet)
    from .api import fit_many
    from .executor import RunOptions
    from .job import load_job

    opts = RunOptions()
    _install_sigterm(opts.stop)
    try:
        if output is Fmt.csv:
            raise SpecError("run --format takes table or json (a run's summary is one "
                            "record); got (format=csv)")
        if timeout is not None and not timeout > 0:  # also NaN
            raise SpecError(f"--timeout must be a positive number of seconds; "
                            f"got (timeout={timeout!r})")
        job = load_job(job_file, {"store": store})
        _require_store(job)
        _check_workers(workers, scheduler or job.cluster.address)
        kind, ccfg = _cluster_of(job, cluster, cluster_config, scheduler)
        security = _security(tls_ca_file, tls_cert, tls_key, ccfg)
        opts.job = job.model_dump(mode="json")
        opts.read_back = False  # the summary and --fail-on need the status counts alone
        opts.progress = False if quiet else None
        client = None
        jq = None
        if ccfg is not None and not (scheduler or job.cluster.address) and (
                kind in ("slurm", "pbs") or ccfg.kind == "local"):
            from distributed import Client

            from .cluster import close_quietly, make_cluster, with_overrides

            if ccfg.kind == "local":
                # Built from its config, so every key holds (threads_per_worker,
                # local_directory, tls), not only workers and memory_limit; --workers
                # and the job's size override as for the embedded cluster.
                ccfg = with_overrides(ccfg, "--workers", workers=workers or ccfg.workers
                                      or job.cluster.workers, memory_limit=ccfg.memory_limit
                                      or job.cluster.memory_limit)
                opts.no_workers_timeout = 120.0  # as fit_many's embedded cluster
            jq = make_cluster(ccfg, security)
            client = Client(jq, security=security)
        address = scheduler or job.cluster.address
        # The job's size is for the embedded cluster; a --workers with a scheduler was
        # refused above.
        embedded = client is None and address is None
        try:
            result = fit_many(
                job.data.path, job.specs(), split_by=job.data.split_by, store=job.store,
                client=client, filter=job.data.filter, scheduler=address,
                workers=workers or job.cluster.workers if embedded else None,
                engine=engine if engine is not None else job.fit.engine,
                timeout=timeout if timeout is not None else job.fit.timeout, security=security,
                memory_limit=job.cluster.memory_limit if embedded else None, options=opts,
                retry_errors=retry_errors)
        finally:
            if client is not None:
                client.close()
            if jq is not None:
                close_quietly(jq)
        # The summary and --fail-on read the store: an unreadable part is a StoreError.
        if output is Fmt.json:
            typer.echo(_json(result.summary()))
        elif not quiet:
            _print_summary(result)
        code = _fail_on(result, fail_on)
    except MixedscaleError as exc:
        raise _exit_for(exc) from None
    raise typer.Exit(code)


def _check_workers(workers: int | None, address: str | None) -> None:
    """fit_many's refusal, in the CLI's own words."""
    if workers is not None and address:
        raise SpecError("--workers sizes the embedded cluster; with a scheduler address the "
                        "cluster is already there, sized by whoever started it; drop "
                        f"--workers; got (--scheduler/cluster.address={address!r}, "
                        f"--workers={workers})")


def _cluster_of(job: Any, cluster: Any, cluster_config: Path | None, scheduler: str | None
                ) -> tuple[str, Any]:
    """The cluster kind and its config (None: none given and none needed), checked as
    ``run`` uses them; a slurm or pbs kind without an address needs its config's keys."""
    from .cluster import load_cluster_config, parse_cluster_config, with_overrides

    kind = cluster.value if cluster else job.cluster.kind
    cfg_path = cluster_config or (Path(job.cluster.config) if job.cluster.config else None)
    ccfg = None
    if cfg_path is not None:
        ccfg = load_cluster_config(str(cfg_path))
        kind = cluster.value if cluster else ccfg.kind
    if kind in ("slurm", "pbs") and not (scheduler or job.cluster.address):
        where = "--cluster" if cluster else f"job file cluster.kind ({kind})"
        ccfg = ccfg or parse_cluster_config({"kind": kind}, where)
        ccfg = with_overrides(ccfg, where, kind=kind)
    return kind, ccfg


@app.command()
def validate(job_file: Annotated[Path, typer.Argument(metavar="JOB.yaml",
                                                     help="the job file")]) -> None:
    """Every plan-time check of a job (files, schema, formulas, columns); no fitting."""
    _setup_logging(True)
    from .api import prepare
    from .job import load_job

    try:
        job = load_job(job_file)
        _require_store(job, flag=False)
        # `run` reads the cluster config (and its TLS files) before any work: so must
        # validate, as well as the store's earlier fits' split column types.
        _, ccfg = _cluster_of(job, None, None, None)
        _security(None, None, None, ccfg)
        _, plan = prepare(job.data.path, job.specs(), job.data.split_by, job.data.filter,
                          job.fit.engine, job.store)
        from .store import Store

        st = Store(str(job.store))
        names = sorted(st.committed_parts())
        bad: dict[str, str] = {}  # damaged parts: a run sets them aside
        st.part_schemas(names, unreadable=bad)
        st.check_split_types(plan.key_fields, [n for n in names if n not in bad])
    except MixedscaleError as exc:
        raise _exit_for(exc) from None
    d = plan.describe()
    typer.echo(f"ok: {d['n_fits']} fits ({d['n_slices']} slices x {d['n_specs']} specs) in "
               f"{d['n_tasks']} tasks; columns {', '.join(d['columns'])}")
    if bad:  # valid, but not intact: say what `run` will repair
        typer.echo(f"note: {len(bad)} store part(s) cannot be read ({', '.join(sorted(bad))}); "
                   "`run` moves them to _corrupt/ and fits their fits again", err=True)


@app.command("fit")
def fit_cmd(
    data: Annotated[str, typer.Argument(help="Parquet file, folder, glob or URL")],
    formula: Annotated[str, typer.Option("--formula", help="e.g. 'y ~ x'")],
    groups: Annotated[str | None, typer.Option(
        "--groups", help="the grouping column of the random effects (needed: fit takes "
        "no variance components; a job file does)")] = None,
    re_formula: Annotated[str | None, typer.Option(
        "--re-formula", help="random effects, e.g. '~x' (default: an intercept)")] = None,
    split_by: Annotated[list[str] | None, typer.Option(
        "--split-by", help="fit one model per value of this column (repeatable)")] = None,
    store: Annotated[str | None, typer.Option(
        "--store", help="results store folder or URL (default: results are printed only)")
        ] = None,
    ml: Annotated[bool, typer.Option("--ml", help="maximum likelihood instead of "
                                     "REML")] = False,
    cov_structure: Annotated[str, typer.Option(
        "--cov-structure", help="unstructured or diagonal")] = "unstructured",
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="Dask scheduler address; default: an embedded cluster")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="embedded cluster size")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar, no "
                                        "summary (the results are still printed)")] = False,
    output: Annotated[Fmt, typer.Option("--format", help="the fixed effects as a table, "
                                        "or csv/json on stdout alone")] = Fmt.table,
    engine: Annotated[str | None, typer.Option("--engine", help="auto, fast or "
                                               "statsmodels")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="per-fit timeout, "
                                                  "seconds")] = None,
    fail_on: Annotated[FailOn | None, typer.Option("--fail-on", help="exit 1 if any fit "
                                                   "has this status or worse")] = None,
) -> None:
    """Fit one model, optionally per slice, without a job file."""
    _setup_logging(quiet)
    from .api import fit_many
    from .executor import RunOptions
    from .spec import ModelSpec

    opts = RunOptions()
    _install_sigterm(opts.stop)  # as `run`: exit 3, the manifest "interrupted"
    try:
        _check_workers(workers, scheduler)
        # Unnamed: spec_name is then the model in lme4's notation (ModelSpec.describe).
        spec = ModelSpec(formula=formula, groups=groups, re_formula=re_formula, reml=not ml,
                         cov_structure=cov_structure)  # type: ignore[arg-type]
        result = fit_many(data, [spec], split_by=split_by or None, store=store,
                          scheduler=scheduler, workers=workers, engine=engine,
                          timeout=timeout, progress=False if quiet else None,
                          options=opts)
        machine = output is not Fmt.table  # stdout holds the data alone
        _emit(result.params, output)
        _report_failed(result.fits)
        if not quiet:
            _print_summary(result, stderr=machine, title="fit")
        code = _fail_on(result, fail_on)
    except MixedscaleError as exc:
        raise _exit_for(exc) from None
    raise typer.Exit(code)


def _report_failed(fits: Any) -> None:
    """One stderr line per fit that is not ok: its params may be missing or doubtful."""
    if fits.empty:
        return
    keys = [c for c in fits.columns[: list(fits.columns).index("spec_id")] if c != "fit_id"]
    for row in fits[fits["status"] != "ok"].to_dict("records"):
        where = ", ".join(f"{k}={row[k]}" for k in keys)
        # "fit error", not "error:": that prefix is the CLI's own fatal errors'.
        typer.echo(f"fit {row['status']}{f' ({where})' if where else ''}: "
                   f"{row.get('error_message') or row.get('error_type') or ''}", err=True)


def _emit(df: Any, fmt: Fmt, limit: int | None = None) -> None:
    if limit is not None:
        df = df.head(limit)
    if fmt is Fmt.csv:
        typer.echo(df.to_csv(index=False), nl=False)
    elif fmt is Fmt.json:
        typer.echo(_json_records(df))
    else:
        from rich.console import Console
        from rich.table import Table as RTable
        from rich.text import Text

        t = RTable()
        for c in df.columns:
            t.add_column(Text(str(c)))
        for row in df.itertuples(index=False):
            # Text, not str: rich reads "[...]" as markup, which cut grid names
            # ("sleep[reml=False]") and factor terms ("group[T.b]"), or raised on "[/x]".
            t.add_row(*(Text(_cell(v)) for v in row))
        Console(width=200).print(t)


def _json_records(df: Any) -> str:
    """Rows as a JSON array: floats exact (pandas' to_json rounds to 10 decimals, so a
    p-value of 3e-11 read 0.0), dates and times ISO 8601, missing and non-finite values
    null."""
    import pyarrow as pa

    return _json(pa.Table.from_pandas(df, preserve_index=False).to_pylist())


def _json(value: Any) -> str:
    """Strict JSON (non-finite floats null), dates ISO 8601, anything else as text."""
    import datetime as dt
    import math

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    def other(v: Any) -> Any:
        if isinstance(v, (dt.date, dt.time)):  # datetime too
            return v.isoformat()
        if isinstance(v, dt.timedelta):
            return v.total_seconds()
        if hasattr(v, "item"):  # a numpy scalar
            return clean(v.item())
        return str(v)

    return json.dumps(clean(value), default=other, allow_nan=False)


def _cell(v: Any) -> str:
    import pandas as pd  # loaded by then: the table came from pandas

    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)) or (hasattr(v, "__len__") and not isinstance(v, str)):
        return f"[{len(v)} items]"
    return "" if v is None else str(v)


@app.command()
def show(
    store: Annotated[str, typer.Argument(metavar="STORE", help="results store folder or URL")],
    table: Annotated[Table | None, typer.Option(
        "--table", help="print this table instead of the summary (specs: one row per "
        "model, to join on spec_id)")] = None,
    output: Annotated[Fmt, typer.Option(
        "--format", help="a terminal table (headline columns), or csv/json (all)")
        ] = Fmt.table,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="print at most this many rows of --table")] = None,
    latest: Annotated[bool, typer.Option(
        "--latest", help="per slice and model, only the fit committed last (after the "
        "data changed, older fits stay in the store)")] = False,
) -> None:
    """Summarize a results store, or print one of its tables."""
    from .store import open_store

    try:
        if table is None and (output is Fmt.csv or limit is not None):
            raise SpecError("--format csv and --limit apply to a table; add --table fits "
                            f"(or params, variance); got (format={output.value}, "
                            f"limit={limit})")
        try:
            st = open_store(store)
        except StoreError as exc:  # no store there: a wrong path, not a failed run
            raise SpecError(str(exc)) from None
        if table is not None:
            df = st.specs() if table is Table.specs else getattr(st, table.value)(
                latest=latest)
            if output is Fmt.table and len(df.columns):
                df = df[_table_columns(df, table)]
            _emit(df, output, limit)
            return
        fits = st.fits(latest=latest)
    except MixedscaleError as exc:
        raise _exit_for(exc) from None
    _store_summary(st, fits, output)


# What fits a terminal: the key columns (fit_id, split columns, spec_id) and, for fits,
# the headline diagnostics; csv and json give every column.
_FITS_TABLE = ("spec_name", "status", "llf", "aic", "singular", "n_obs", "n_groups",
               "grad_max", "engine", "error_type", "fit_seconds")
_DROP_TABLE = ("attempts", "theta", "warnings", "run_id", "mixedscale_version",
               "statsmodels_version", "numpy_version", "scipy_version")


def _table_columns(df: Any, table: Table) -> list[str]:
    cols = [str(c) for c in df.columns]
    if table is not Table.fits or "spec_id" not in cols:
        return [c for c in cols if c not in _DROP_TABLE]
    head = cols[: cols.index("spec_id")]  # fit_id and the split columns
    return head + [c for c in _FITS_TABLE if c in cols]


def _store_summary(st: Any, fits: Any, fmt: Fmt) -> None:
    counts = fits["status"].value_counts().to_dict() if len(fits) else {}
    runs = st.runs()
    info: dict[str, Any] = {
        "store": st.url, "n_fits": len(fits), "by_status": {str(k): int(v) for k, v in
                                                            counts.items()},
        "n_runs": len(runs),
        "last_run_state": str(runs["state"].iloc[-1]) if len(runs)
        else None,
    }
    if fmt is Fmt.json:
        typer.echo(json.dumps(info))
        return
    runs_ = "run" if info["n_runs"] == 1 else "runs"
    typer.echo(f"store {info['store']}: {info['n_fits']} fits, by status "
               f"{info['by_status']}; {info['n_runs']} {runs_} (last: "
               f"{info['last_run_state']})")
    if len(fits):
        # fit_id and the split columns, so each row names its slice.
        keys = [str(c) for c in fits.columns[: list(fits.columns).index("spec_id")]] \
            if "spec_id" in fits else ["fit_id"]
        cols = [*keys, *(c for c in ("spec_name", "status", "method", "fit_seconds")
                         if c in fits)]
        # A batch (method newton-batch/-multistart) shares its time evenly among its fits.
        typer.echo("slowest fits (fits made in one batch share its time evenly):")
        _emit(fits.sort_values("fit_seconds", ascending=False)[cols], Fmt.table, 5)
        import numpy as np

        # Sorted by position: a helper column could clash with a split column's name.
        by_grad = fits.iloc[np.argsort(-fits["grad_max"].fillna(float("inf")).to_numpy(),
                                       kind="stable")]
        bad = by_grad["status"] != "ok"
        worst = by_grad[bad] if bad.any() else by_grad
        cols = [*keys, *(c for c in ("spec_name", "status", "grad_max", "hessian_pd",
                                     "singular", "error_message") if c in fits)]
        typer.echo("worst diagnostics:")
        _emit(worst[cols], Fmt.table, 5)


@app.command()
def schema() -> None:
    """Print the job file's JSON Schema."""
    from .job import job_schema

    typer.echo(json.dumps(job_schema(), indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
