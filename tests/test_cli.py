"""The `mixedscale` command line, run as a subprocess (issue "Batch runs", §6–§7, §9):
the shipped job files, exit codes 0/1/2/3, `show` in every format, `schema`, `fit`."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

import mixedscale as ms

from .clusterutil import (
    check_invariant,
    faults_env,
    flip_column,
    free_port,
    invoke,
    manifests,
    planned,
    run_cli,
    write_genes,
    write_job,
)
from .conftest import ROOT, make_genes

pytestmark = pytest.mark.cluster

JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
# statsmodels' engine fits one slice at a time: a small job still has several tasks.
SM = {"name": "sm", "formula": "y ~ time", "groups": "subject", "engine": "statsmodels"}
SMALL_JOBS = {"nba": 1, "sleepstudy": 6}  # job -> fits (8 grid points, 6 models)


@pytest.fixture(scope="module")
def address(cluster_client: Any) -> str:
    """The session's multi-process LocalCluster, for CLI runs with --scheduler."""
    return str(cluster_client.scheduler.address)


@pytest.fixture(scope="module")
def errjob(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job in which one slice cannot be fitted (a constant response): an error row."""
    d = tmp_path_factory.mktemp("errjob")
    df = make_genes(n_genes=4)
    df.loc[df["gene"] == "g002", "y"] = 1.0
    df.to_parquet(d / "data.parquet", index=False)
    return write_job(d / "job.yaml", d / "data.parquet", d / "store")


@pytest.fixture(scope="module")
def store(errjob: Path, address: str) -> Iterator[Path]:
    r = run_cli(["run", str(errjob)], cwd=errjob.parent, scheduler=address)
    assert r.returncode == 0, r.stderr
    yield errjob.parent / "store"


def test_job_files_exist() -> None:
    assert {p.stem for p in JOBS} >= {"genes", "nba", "sleepstudy"}


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_every_job_file_validates(job: Path, tmp_path: Path) -> None:
    r = run_cli(["validate", str(job)], cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: ")


@pytest.mark.parametrize("name", sorted(SMALL_JOBS))
def test_small_job_files_run(name: str, tmp_path: Path, address: str) -> None:
    out = tmp_path / "store"
    job = ROOT / "jobs" / f"{name}.yaml"
    r = run_cli(["run", str(job), "--store", str(out)], cwd=tmp_path, scheduler=address)
    assert r.returncode == 0, r.stderr
    assert "n_planned" in r.stdout  # the summary table
    rep = check_invariant(out, planned(job).fit_ids())
    assert len(rep["fits"]) == SMALL_JOBS[name]
    assert rep["by_status"].get("ok", 0) == SMALL_JOBS[name], rep["by_status"]
    assert manifests(out)[-1]["state"] == "complete"


def test_exit_0_complete_with_errors_and_1_with_fail_on(errjob: Path, store: Path,
                                                        address: str) -> None:
    fits = check_invariant(store, planned(errjob).fit_ids())["fits"]
    assert fits.loc[fits["gene"] == "g002", "status"].item() == "error"
    for fail_on in ("error", "not_converged"):
        r = run_cli(["run", str(errjob), "--quiet", "--fail-on", fail_on], cwd=errjob.parent,
                    scheduler=address)
        assert r.returncode == 1, (fail_on, r.stderr)
        assert f"--fail-on {fail_on}" in r.stderr
    # complete job, nothing refitted
    assert all(m["n_run"] == 0 for m in manifests(store)[1:])


def _job(tmp_path: Path, **changes: Any) -> Path:
    data = tmp_path / "data.parquet"
    make_genes(n_genes=2).to_parquet(data, index=False)
    doc: dict[str, Any] = {"data": {"path": str(data), "split_by": ["gene"]},
                           "models": [{"formula": "y ~ time", "groups": "subject"}],
                           "store": str(tmp_path / "store")}
    doc.update(changes)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("case", ["bad_key", "bad_nested_key", "bad_column", "bad_split",
                                  "bad_formula", "python_tag", "not_a_mapping", "bad_type"])
def test_exit_2_invalid_job_with_a_suggestion(case: str, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    expect = ""
    if case == "bad_key":
        job = _job(tmp_path, modles=[{"formula": "y ~ time"}])
        expect = "did you mean 'models'"
    elif case == "bad_nested_key":
        job = _job(tmp_path, fit={"timout": 5})
        expect = "did you mean 'timeout'"
    elif case == "bad_column":
        job = _job(tmp_path, models=[{"formula": "Y ~ time", "groups": "subject"}])
        expect = "did you mean 'y'"
    elif case == "bad_split":
        job = _job(tmp_path, data={"path": str(tmp_path / "data.parquet"), "split_by": "Gene"})
        expect = "did you mean 'gene'"
    elif case == "bad_formula":
        job = _job(tmp_path, models=[{"formula": "y ~ time.__class__", "groups": "subject"}])
        expect = "__class__"
    elif case == "python_tag":
        job = _job(tmp_path)
        job.write_text(job.read_text() + f'name: !!python/object/apply:os.system ["touch '
                       f'{canary}"]\n')
        expect = "python"
    elif case == "not_a_mapping":
        job = tmp_path / "job.yaml"
        job.write_text("- just\n- a list\n")
        expect = "must be a mapping"
    else:
        job = _job(tmp_path, fit={"timeout": "soon"})
        expect = "fit.timeout"
    for cmd in (["validate", str(job)], ["run", str(job), "--scheduler", "tcp://127.0.0.1:1"]):
        code, _, err = invoke(cmd)
        assert code == 2, (cmd, err)
        assert err.startswith("error: ") and expect in err, err
    assert not canary.exists()
    assert not (tmp_path / "store").exists()


def test_exit_2_as_a_process_python_tag_runs_nothing(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    job = _job(tmp_path)
    job.write_text(job.read_text() + 'name: !!python/object/apply:os.system ["touch CANARY"]\n')
    r = run_cli(["run", str(job), "--scheduler", "tcp://127.0.0.1:1"], cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: job file") and "Traceback" not in r.stderr
    assert not canary.exists()


def test_exit_2_missing_data(tmp_path: Path) -> None:
    job = _job(tmp_path, data={"path": str(tmp_path / "nope"), "split_by": ["gene"]})
    code, _, err = invoke(["validate", str(job)])
    assert code == 2 and "no such file or folder" in err, err


def test_exit_3_unreachable_scheduler(tmp_path: Path) -> None:
    # The job's cluster size is for the embedded cluster: with --scheduler it is unused,
    # not a contradiction; an explicit --workers beside --scheduler is one (exit 2).
    job = _job(tmp_path, cluster={"workers": 2, "memory_limit": "2GB"})
    code, _, err = invoke(["run", str(job), "--scheduler", "tcp://127.0.0.1:1",
                           "--workers", "3"])
    assert code == 2 and "--workers sizes the embedded cluster" in err, err
    assert "--workers=3" in err and "scheduler=" not in err.replace("--scheduler", ""), err
    port = free_port()  # nothing listens there
    r = run_cli(["run", str(job), "--scheduler", f"tcp://127.0.0.1:{port}"], cwd=tmp_path,
                timeout=90, env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    assert r.returncode == 3, r.stderr
    assert f"cannot reach the Dask scheduler at 'tcp://127.0.0.1:{port}'" in r.stderr
    assert "Traceback" not in r.stderr


def test_retry_errors_keeps_model_errors(store: Path, errjob: Path, address: str) -> None:
    """The errjob's one error is a model error (a constant response): deterministic,
    so --retry-errors fits nothing again and moves nothing."""
    before = pd.read_parquet(store / "fits")
    r = run_cli(["run", str(errjob), "--retry-errors", "--fail-on", "error"],
                cwd=errjob.parent, scheduler=address)
    assert r.returncode == 1 and "--fail-on error: 1 fits matched" in r.stderr, r.stderr
    assert "│ n_fitted_this_run │ 0" in r.stdout, r.stdout
    assert not (store / "_retried").exists()
    after = pd.read_parquet(store / "fits")
    assert sorted(after["fit_id"]) == sorted(before["fit_id"])


def test_show_formats(store: Path, tmp_path: Path) -> None:
    n = len(check_invariant(store, planned(store.parent / "job.yaml").fit_ids())["fits"])
    r = run_cli(["show", str(store)], cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"{n} fits" in r.stdout and "slowest fits" in r.stdout
    assert "worst diagnostics" in r.stdout
    worst = r.stdout.split("worst diagnostics:")[1]
    assert "┃ gene ┃" in worst and "│ g002 │" in worst, worst  # names the slice

    r = run_cli(["show", str(store), "--format", "json"], cwd=tmp_path, timeout=60)
    info = json.loads(r.stdout)
    assert info["n_fits"] == n and info["last_run_state"] == "complete"
    r = run_cli(["show", str(store), "--format", "json", "--latest"], cwd=tmp_path, timeout=60)
    assert json.loads(r.stdout)["n_fits"] == n  # one fit per slice and spec already
    assert info["by_status"].get("error") == 1

    for table, cols in (("fits", {"fit_id", "gene", "spec_id", "status"}),
                        ("params", {"fit_id", "gene", "term", "estimate", "p_value"}),
                        ("variance", {"fit_id", "gene", "group", "kind", "estimate"}),
                        ("specs", {"spec_id", "spec_name", "formula", "re_formula", "reml"})):
        code, out, err = invoke(["show", str(store), "--table", table, "--format", "csv"])
        assert code == 0, err
        df = pd.read_csv(io.StringIO(out))
        assert cols <= set(df.columns)
        if table == "fits":
            assert len(df) == n and "attempts" in df.columns  # csv has every column
        code, out, _ = invoke(["show", str(store), "--table", table, "--format", "json",
                               "--limit", "2"])
        rows = json.loads(out)
        assert code == 0 and len(rows) == min(2, len(df)) and cols <= set(rows[0])
        code, out, _ = invoke(["show", str(store), "--table", table])
        assert code == 0
        header = next(line for line in out.splitlines() if "┃" in line)
        for c in cols - {"spec_id"}:  # fits shows spec_name instead
            assert c in header, (c, header)  # readable: no column squeezed to nothing

    # JSON keeps every float exactly (pandas' to_json rounded p-values below 5e-11 to 0).
    code, out, _ = invoke(["show", str(store), "--table", "params", "--format", "json"])
    got = pd.DataFrame(json.loads(out))
    want = ms.open_store(str(store)).params()
    pd.testing.assert_series_equal(got.set_index(["fit_id", "term"])["p_value"],
                                   want.set_index(["fit_id", "term"])["p_value"].astype(float),
                                   check_exact=True)

    code, _, err = invoke(["show", str(tmp_path / "nothing-here")])
    assert code == 2 and "no results store" in err  # a wrong path: invalid input


def test_schema_is_valid_json_schema_and_accepts_the_jobs(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    r = run_cli(["schema"], cwd=tmp_path, timeout=60)
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    for job in JOBS:
        errors = list(v.iter_errors(yaml.safe_load(job.read_text())))
        assert not errors, (job.name, errors[0].message)
    assert list(v.iter_errors({"data": {"path": "x"}, "modles": []}))
    assert list(v.iter_errors({"models": []}))  # data is required
    # What load_job accepts, the schema accepts: one split column given bare.
    one = {"data": {"path": "x", "split_by": "gene"}, "store": "s",
           "models": [{"formula": "y ~ x", "groups": "g"}]}
    assert not list(v.iter_errors(one))
    assert list(v.iter_errors({k: one[k] for k in ("data", "store")}))  # no models nor grid


def test_fit_command(tmp_path: Path, address: str) -> None:
    data = tmp_path / "data.parquet"
    df = make_genes(n_genes=3)
    df.loc[df["gene"] == "g002", "y"] = 1.0  # a fit that fails: said on stderr
    df.to_parquet(data, index=False)
    out = tmp_path / "store"
    for quiet in ([], ["-q"]):
        r = run_cli(["fit", str(data), "--formula", "y ~ time", "--groups", "subject",
                     "--split-by", "gene", "--store", str(out), "--scheduler", address,
                     "--format", "csv", *quiet], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        # stdout is the csv alone (the summary goes to stderr), with or without -q
        params = pd.read_csv(io.StringIO(r.stdout))  # 2 genes x 2 terms
        assert {"term", "estimate"} <= set(params.columns) and len(params) == 4, r.stdout
        assert "fit error (gene=g002): the response is constant" in r.stderr
        assert ("mixedscale fit" in r.stderr) is not bool(quiet)
    fits = pd.read_parquet(out / "fits")
    # not the hash: the model in lme4's notation
    assert len(fits) == 3 and set(fits["spec_name"]) == {"y ~ time + (1 | subject)"}
    r = run_cli(["fit", str(data), "--formula", "y ~ time", "--groups", "subject",
                 "--split-by", "gene", "--scheduler", address, "--engine", "statsmodels",
                 "--timeout", "60", "--fail-on", "error", "-q"], cwd=tmp_path)
    assert r.returncode == 1 and "--fail-on error: 1 fits matched" in r.stderr, r.stderr
    r = run_cli(["fit", str(data), "--formula", "y ~ time", "--groups", "subject",
                 "--engine", "slow"], cwd=tmp_path)
    assert r.returncode == 2 and "engine must be one of" in r.stderr, r.stderr


def test_a_corrupt_store_part_is_set_aside_by_a_rerun_and_refitted(tmp_path: Path,
                                                                    address: str) -> None:
    """A truncated committed part: `show` exits 3 with one line saying a rerun repairs
    it; the rerun (no -q: it prints the summary) sets the task's parts aside in
    _corrupt/, refits its fits and ends with every fit in the store exactly once."""
    data = tmp_path / "data.parquet"
    make_genes(n_genes=4).to_parquet(data, index=False)
    store = tmp_path / "store"
    job = write_job(tmp_path / "job.yaml", data, store, models=[SM])  # 2 tasks
    plan = planned(job)
    assert len(plan.tasks) >= 2, "precondition: a part to damage and parts to keep"
    r = run_cli(["run", str(job), "-q"], cwd=tmp_path, scheduler=address)
    assert r.returncode == 0, r.stderr
    victim = plan.tasks[0]
    part = store / "fits" / f"part-{victim.key}.parquet"
    part.write_bytes(part.read_bytes()[:100])

    r = run_cli(["show", str(store)], cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(part) in r.stderr and "rerunning the job" in r.stderr, r.stderr
    r = run_cli(["validate", str(job)], cwd=tmp_path)  # valid, but says what run repairs
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stderr
    assert "1 store part(s) cannot be read" in r.stderr and "_corrupt/" in r.stderr, r.stderr

    r = run_cli(["run", str(job)], cwd=tmp_path, scheduler=address)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    (warning,) = [ln for ln in r.stderr.splitlines() if str(part) in ln]
    assert warning.startswith("WARNING") and "_corrupt" in warning, r.stderr
    assert "n_planned" in r.stdout  # the summary read the repaired store
    check_invariant(store, plan.fit_ids())  # every fit once, none lost
    assert manifests(store)[-1]["n_run"] == len(victim.items)
    assert sorted(p.parent.name for p in (store / "_corrupt").rglob("*.parquet")) == \
        ["fits", "params", "variance"]
    r = run_cli(["show", str(store)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    # Damage a resume does not check (another column's pages): the summary's read
    # fails with one line and exit 3, not a traceback.
    other = store / "fits" / f"part-{plan.tasks[1].key}.parquet"
    flip_column(other, "status")
    r = run_cli(["run", str(job)], cwd=tmp_path, scheduler=address)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert str(other) in line and "move it" in line, r.stderr


def test_worker_failures_stay_off_stderr(tmp_path: Path) -> None:
    """With the embedded cluster, worker processes write to the CLI's stderr: a corrupt
    input file or a fit timeout shows mixedscale's own one-line messages only, not
    the workers' tracebacks (Compute Failed) nor Dask's cancellation warnings."""
    data = write_genes(tmp_path / "data", 8, files=2)
    bad = data / "part-1.parquet"
    flip_column(bad, "y")
    r = run_cli(["fit", str(data), "--formula", "y ~ time", "--groups", "subject",
                 "--split-by", "gene", "--workers", "1", "-q"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Compute Failed" not in r.stderr, r.stderr
    assert "distributed." not in r.stderr, r.stderr
    (warning,) = [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING")]
    assert str(bad) in warning, r.stderr
    assert all(str(bad) in ln for ln in r.stderr.splitlines()), r.stderr  # its fits' rows

    job = write_job(tmp_path / "job.yaml", data.parent / "ok", tmp_path / "store",
                    models=[SM], fit={"timeout": 2})
    write_genes(data.parent / "ok", 4)
    r = run_cli(["run", str(job), "--workers", "1", "-q"], cwd=tmp_path,
                env=faults_env({"key": ["g001"], "do": "hang", "seconds": 60}))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "distributed." not in r.stderr, r.stderr
    fits = check_invariant(tmp_path / "store", planned(job).fit_ids())["fits"]
    assert fits.loc[fits["gene"] == "g001", "error_type"].item() == "FitTimeout"


# -- job-file and option validation: `validate` and `run` agree with the Python API ----


def test_a_job_without_a_store_is_refused(tmp_path: Path) -> None:
    # The CLI keeps nothing else: such a run would fit everything and lose it.
    job = _job(tmp_path)
    doc = yaml.safe_load(job.read_text())
    del doc["store"]
    job.write_text(yaml.safe_dump(doc))
    for cmd in (["validate", str(job)], ["run", str(job), "--scheduler", "tcp://127.0.0.1:1"]):
        r = run_cli(cmd, cwd=tmp_path)
        assert r.returncode == 2 and "the job has no store" in r.stderr, r.stderr
    r = run_cli(["validate", str(job)], cwd=tmp_path)
    assert "--store" in r.stderr


def test_show_csv_needs_a_table(store: Path) -> None:
    for opts in (["--format", "csv"], ["--limit", "3"]):
        r = run_cli(["show", str(store), *opts], cwd=store.parent)
        assert r.returncode == 2 and "add --table" in r.stderr, r.stderr


def test_validate_checks_the_cluster_config_file(tmp_path: Path) -> None:
    job = _job(tmp_path, cluster={"config": "no-such-cluster.yaml"})
    for cmd in (["validate", str(job)], ["run", str(job), "--scheduler", "tcp://127.0.0.1:1"]):
        code, _, err = invoke(cmd)
        assert code == 2, (cmd, err)
        assert "cluster config file not found" in err and "no-such-cluster.yaml" in err, err
    (tmp_path / "no-such-cluster.yaml").write_text("kind: local\n")
    code, out, err = invoke(["validate", str(job)])
    assert code == 0 and out.startswith("ok: "), err


def test_validate_checks_the_memory_limit_as_run_does(tmp_path: Path) -> None:
    job = _job(tmp_path, cluster={"memory_limit": "lots"})
    for cmd in (["validate", str(job)], ["run", str(job)]):
        code, _, err = invoke(cmd)
        assert code == 2, (cmd, err)
        assert err.startswith("error: ") and "cluster.memory_limit" in err, err
        assert "positive size such as '4GB'" in err and "got (memory_limit='lots')" in err, err
    for ok in ("auto", "0", "1.5GB"):
        code, out, err = invoke(["validate", str(_job(tmp_path, cluster={"memory_limit": ok}))])
        assert code == 0 and out.startswith("ok: "), (ok, err)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_run_rejects_a_non_positive_timeout(value: str, tmp_path: Path) -> None:
    job = _job(tmp_path)
    code, _, err = invoke(["run", str(job), "--timeout", value, "--scheduler",
                           "tcp://127.0.0.1:1"])
    assert code == 2, err
    assert "--timeout must be a positive number of seconds; got (timeout=" in err, err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("changes, loc", [
    ({"models": [{"formula": "y ~ time", "groups": "subject", "reml": "yes"}]},
     "models[0].reml"),
    ({"models": [{"formula": "y ~ time", "groups": "subject", "reml": 1}]}, "models[0].reml"),
    ({"models": [{"formula": "y ~ time", "groups": "subject", "maxiter": "10"}]},
     "models[0].maxiter"),
    ({"models": [], "grid": {"formula": "y ~ time", "groups": "subject", "reml": "no"}},
     "grid.reml"),
    ({"fit": {"maxiter": 10.5}}, "fit.maxiter"),
    ({"fit": {"maxiter": True}}, "fit.maxiter"),
    ({"fit": {"timeout": "5"}}, "fit.timeout"),
    ({"cluster": {"workers": "2"}}, "cluster.workers"),
    ({"cluster": {"workers": True}}, "cluster.workers"),
])
def test_job_booleans_and_numbers_are_strict(changes: dict[str, Any], loc: str,
                                             tmp_path: Path) -> None:
    code, _, err = invoke(["validate", str(_job(tmp_path, **changes))])
    assert code == 2, err
    assert f": {loc}: " in err and f"got ({loc}=" in err, err


def test_job_numbers_accept_ints_for_floats(tmp_path: Path) -> None:
    code, out, err = invoke(["validate", str(_job(tmp_path, fit={"timeout": 5}))])
    assert code == 0 and out.startswith("ok: "), err


@pytest.mark.parametrize("changes, expect", [
    ({"models": [{"groups": "subject"}]}, "models[0]: missing required field 'formula'"),
    ({"data": {"split_by": ["gene"]}}, "data: missing required field 'path'"),
    ({"grid": {"groups": "subject"}}, "grid: missing required field 'formula'"),
])
def test_missing_field_names_the_field(changes: dict[str, Any], expect: str,
                                       tmp_path: Path) -> None:
    code, _, err = invoke(["validate", str(_job(tmp_path, **changes))])
    assert code == 2 and expect in err, err
    assert "{...}" not in err, err


def test_missing_top_level_field(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"models": [{"formula": "y ~ time", "groups": "g"}]}))
    code, _, err = invoke(["validate", str(job)])
    assert code == 2 and "missing required field 'data'" in err, err


def test_yaml_syntax_error_does_not_blame_tags(tmp_path: Path) -> None:
    job = _job(tmp_path)
    job.write_text("data:\n  path: x\n    split_by: gene\n")
    code, _, err = invoke(["validate", str(job)])
    assert code == 2 and "is not valid YAML" in err and "line 3" in err, err
    assert "!!python" not in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, as every other error


def test_a_grid_with_optimizers_points_to_the_fit_section(tmp_path: Path) -> None:
    job = _job(tmp_path, models=[], grid={"formula": ["y ~ time"], "groups": "subject",
                                          "maxiter": 50})
    code, _, err = invoke(["validate", str(job)])
    assert code == 2 and "unknown key 'grid.maxiter'" in err and "(fit.maxiter)" in err, err


@pytest.mark.parametrize(("cmd", "expect"), [
    (["show", "foo://x"], "cannot open store 'foo://x': Protocol not known: foo"),
    (["fit", "foo://d.parquet", "--formula", "y ~ x", "--groups", "g"],
     "cannot open 'foo://d.parquet'"),
    (["fit", "ftp://127.0.0.1:1/d.parquet", "--formula", "y ~ x", "--groups", "g"],
     "ConnectionRefusedError"),
])
def test_an_unusable_url_is_one_line_and_exit_2(cmd: list[str], expect: str) -> None:
    """An unknown protocol or a missing backend is a configuration error (exit 2, which
    a cluster's job controller does not retry), never a traceback."""
    code, _, err = invoke(cmd)
    assert code == 2, err
    assert err.startswith("error: ") and expect in err and "Traceback" not in err, err


@pytest.mark.parametrize(("text", "expect"), [
    (b'data: {path: "\xff\xfe"}\n', "is not UTF-8 text"),
    (b"store: a\nstore: b\n", "gives key 'store' twice (at line 2); keep one"),
])
def test_job_and_cluster_files_share_one_strict_yaml_reader(tmp_path: Path, text: bytes,
                                                            expect: str) -> None:
    """A non-UTF-8 job file was a traceback; a key given twice was taken silently."""
    for cmd, name in ((["validate"], "job.yaml"), (["run", "--cluster-config"], "c.yaml")):
        f = tmp_path / name
        f.write_bytes(text)
        args = [*cmd, str(f)] if name == "job.yaml" else [
            "run", str(_job(tmp_path)), "--cluster-config", str(f)]
        code, _, err = invoke(args)
        assert code == 2 and err.startswith("error: ") and expect in err, err


def test_validate_checks_the_cluster_kind_as_run_does(tmp_path: Path) -> None:
    """cluster.kind slurm with no config: run refused it (exit 2), validate said ok; the
    error names the job file's key, not a --cluster flag nobody gave."""
    job = _job(tmp_path, cluster={"kind": "slurm"})
    for cmd in (["validate", str(job)], ["run", str(job), "-q"]):
        code, _, err = invoke(cmd)
        assert code == 2 and "job file cluster.kind (slurm)" in err and "cores" in err, err


def test_a_local_cluster_config_sizes_the_embedded_cluster(tmp_path: Path) -> None:
    """Every key of a local cluster config holds (threads_per_worker and local_directory
    were dropped: only workers and memory_limit reached the embedded cluster)."""
    cfg = tmp_path / "local.yaml"
    cfg.write_text("kind: local\nworkers: 1\nmemory_limit: 1GB\nthreads_per_worker: 2\n"
                   "local_directory: scratch\n")
    job = _job(tmp_path)
    code, out, err = invoke(["run", str(job), "--cluster-config", str(cfg)])
    assert code == 0, err
    assert re.search(r"n_workers\s*│\s*1\s", out), out
    assert any((tmp_path / "scratch").iterdir())  # the workers' scratch space
    # For pipelines: the run's summary as one JSON object on stdout (the rerun resumes).
    code, out, err = invoke(["run", str(job), "--format", "json"])
    summary = json.loads(out)
    assert code == 0 and summary["state"] == "complete", err
    assert summary["n_resumed"] == summary["n_planned"] > 0 and summary["run_id"]


def test_python_m_mixedscale_is_the_cli() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mixedscale", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "validate" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "mixedscale", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"mixedscale {ms.__version__}"


def test_job_paths_expand_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    from mixedscale.job import load_job

    monkeypatch.setenv("HOME", str(tmp_path))
    job = _job(tmp_path, store="~/results")
    assert load_job(job).store == str(tmp_path / "results")


def test_a_job_without_models_names_its_file(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(f"data: {{path: {str(tmp_path / 'd.parquet')!r}}}\nmodels: []\n"
                   "store: s\n")
    code, _, err = invoke(["validate", str(job)])
    assert code == 2 and f"job file {str(job)!r}: a job needs `models` or `grid`" in err, err


def test_tables_print_square_brackets_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    # rich reads "[...]" as markup: grid names and factor terms lost their brackets, and
    # a name like "ri [/old]" raised MarkupError with a traceback.
    from mixedscale.cli import Fmt, _emit

    names = ["sleep[re_formula=~Days,reml=False]", "ri [/old]", "group[T.treated]"]
    _emit(pd.DataFrame({"spec_name": names, "n[obs]": [1, 2, 3]}), Fmt.table)
    out = capsys.readouterr().out
    for text in [*names, "n[obs]"]:
        assert text in out, out


def test_json_output_is_exact_iso_dated_and_valid() -> None:
    import datetime as dt

    from mixedscale.cli import _json_records

    df = pd.DataFrame({
        "p": [2.598566123456789e-11, 0.1, np.inf, np.nan],
        "day": [dt.date(2024, 1, 1), dt.date(2024, 1, 2), dt.date(2024, 1, 3), None],
        "at": pd.to_datetime(["2024-01-01 10:30"] * 4),
        "theta": [[1.1234567891234, 2.0]] * 4,
        "n": pd.array([1, None, 3, 4], dtype="Int64"),
    })
    rows = json.loads(_json_records(df))  # strict JSON: no NaN or Infinity tokens
    assert [r["p"] for r in rows] == [2.598566123456789e-11, 0.1, None, None]
    assert [r["day"] for r in rows] == ["2024-01-01", "2024-01-02", "2024-01-03", None]
    assert rows[0]["at"] == "2024-01-01T10:30:00" and rows[0]["theta"] == [1.1234567891234, 2.0]
    assert [r["n"] for r in rows] == [1, None, 3, 4]


def test_the_progress_bar_draws_on_stderr() -> None:
    """Enabled when stderr is a terminal; drawn on stdout it went into `fit --format csv
    > file` unseen, leaving a blank first line in the data."""
    from mixedscale.executor import _Progress

    bar = _Progress(10, True)
    try:
        assert bar.bar is not None and bar.bar.console.stderr
    finally:
        bar.close()


def test_distributeds_sync_cancel_race_on_ctrl_c_is_not_logged() -> None:
    """distributed.utils.sync's cancel callback raises NameError when Ctrl-C lands before
    its call started; tornado logs that traceback. The CLI's logging drops it, only it."""
    import functools
    import logging

    from mixedscale import cli as cli_mod

    cli_mod._setup_logging(True)
    logger = logging.getLogger("tornado.application")

    def sync() -> functools.partial[None]:
        def cancel() -> None:
            raise NameError("cannot access free variable 'future'")
        return functools.partial(cancel)

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        for exc in (NameError("cannot access free variable 'future'"), ValueError("other")):
            try:
                raise exc
            except Exception:
                logger.error("Exception in callback %r", sync(), exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert [type(r.exc_info[1]) for r in seen if r.exc_info] == [ValueError]


def test_embedded_workers_drop_only_the_lost_heartbeat_error() -> None:
    import logging

    from mixedscale._workerlogs import _LostHeartbeat

    f = _LostHeartbeat()
    rec = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                            "Failed to communicate with scheduler during heartbeat.", None, None)
    other = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                              "Compute Failed", None, None)
    assert not f.filter(rec) and f.filter(other)


def test_worker_log_setup_installs_its_filter_once() -> None:
    import logging
    import signal
    import warnings

    from mixedscale._workerlogs import QuietWorkerLogs, _LostHeartbeat

    log = logging.getLogger("distributed.worker")
    saved, level = list(log.filters), logging.getLogger("distributed").level
    sigint = signal.getsignal(signal.SIGINT)  # setup ignores Ctrl-C, as in a worker
    try:
        with warnings.catch_warnings():
            for _ in range(3):
                QuietWorkerLogs().setup(None)
        assert sum(isinstance(f, _LostHeartbeat) for f in log.filters) == 1
    finally:
        log.filters[:] = saved
        logging.getLogger("distributed").setLevel(level)
        signal.signal(signal.SIGINT, sigint)
