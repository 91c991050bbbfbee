"""The benchmark harness in --quick mode: it runs end to end and reports what it promises.

No timing is asserted: only that the markdown table and the JSON carry the expected keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUN_KEYS = {
    "suite", "runner", "status", "n_fits", "fits_per_second", "wall_seconds", "overhead",
    "plan_seconds", "driver_peak_mb", "worker_peak_mb", "bytes_read", "bytes_one_pass",
    "read_ratio", "subsampled", "fit_seconds_sum", "n_workers",
}
MS_KEYS = {"exec_seconds", "prepare_seconds", "readback_seconds", "n_tasks", "by_status",
           "state", "store_publish_ms"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-out")
    data = tmp_path_factory.mktemp("bench-data")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick",
         "--suite", "genes,sites,multiverse,tiny", "--out", str(out), "--data", str(data)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| suite | runner |" in proc.stdout
    return out


@pytest.mark.cluster
@pytest.mark.slow
def test_quick_run_writes_json_and_markdown(quick_run: Path) -> None:
    doc = json.loads((quick_run / "results.json").read_text())
    assert {"meta", "calibration", "runs", "targets", "scaling"} <= set(doc)
    assert doc["meta"]["quick"] is True
    assert {"numpy", "scipy", "statsmodels", "dask"} <= set(doc["meta"]["versions"])
    runs = {(r["suite"], r["runner"]): r for r in doc["runs"]}
    assert all(r["cpu_probe_ms"] > 0 for r in runs.values())
    for suite in ("genes", "sites", "multiverse", "tiny"):
        for runner in ("mixedscale-auto-sorted", "mixedscale-auto-unsorted", "pandas-loop",
                       "process-pool", "dask-groupby", "lme4"):
            assert (suite, runner) in runs, (suite, runner)
    for key in [("genes", "mixedscale-fast-sorted"), ("genes", "mixedscale-statsmodels-sorted"),
                ("sites", "mixedscale-fast-sorted"), ("multiverse", "single-fast"),
                ("multiverse", "single-statsmodels")]:
        assert key in runs, key
    for (suite, runner), r in runs.items():
        assert set(r) >= RUN_KEYS, (suite, runner, RUN_KEYS - set(r))
        if runner == "lme4":
            assert r["status"] in ("ok", "skipped"), r["note"]
            continue
        assert r["status"] == "ok", (suite, runner, r.get("note"), r.get("traceback"))
        assert r["n_fits"] > 0 and r["fits_per_second"] > 0
        if runner.startswith("mixedscale-"):
            assert set(r) >= MS_KEYS
            assert r["state"] == "complete"
            assert r["bytes_one_pass"] > 0 and r["read_ratio"] > 0
            assert r["agreement"]["reference"] == "pandas-loop"
            assert r["agreement"]["n_fits"] > 0
            assert {"fe_max_abs_diff", "llf_max_abs_diff"} <= set(r["agreement"])
    assert runs[("genes", "pandas-loop")]["subsampled"] is True
    assert ("tiny", "mixedscale-statsmodels-sorted") not in runs  # optional: not by default
    # Shared-cluster runs carry Dask's own floor for their task layout.
    assert runs[("genes", "mixedscale-auto-sorted")]["dask_floor_overhead"] is not None
    # ...and what the targets' floor adds up: encoding results, decoding the input once.
    for key in ("encode_seconds", "decode_seconds", "key_scan_seconds"):
        assert runs[("genes", "mixedscale-auto-sorted")][key] > 0, key
    names = " ".join(t["target"] for t in doc["targets"])
    for word in ("overhead", "planning", "driver memory", "one pass", "once per worker",
                 "2,000 fits/s", "0.1 s"):
        assert word in names, word


@pytest.mark.cluster
@pytest.mark.slow
def test_quick_run_markdown_table(quick_run: Path) -> None:
    md = (quick_run / "results.md").read_text()
    header = ("| suite | runner | fits | fits/s | overhead | plan s | driver MB | worker MB "
              "| read / 1 pass | Δβ / Δllf vs loop | notes |")
    assert header in md
    for section in ("### Results", "### Targets", "### Scaling model"):
        assert section in md
    assert "| genes | mixedscale-auto-sorted |" in md
    assert "| tiny | pandas-loop |" in md
    assert "- CPU probe (" in md and "- Libraries at the last run: numpy " in md


def test_floor_adds_one_round_trip_and_the_shared_decode_and_encode() -> None:
    from benchmarks.report import _floor

    r = {"n_workers": 2, "fit_seconds_sum": 4.0, "encode_seconds": 0.1,
         "decode_seconds": 0.06, "key_scan_seconds": 0.05}
    calib = {"roundtrip_ms_serial": 20.0}
    # ideal wall 2 s; 0.02 s + (0.1 + 0.06) / 2 s = 0.1 s; the planner's scan only with plan
    assert _floor(r, calib, plan=False) == pytest.approx(0.05)
    assert _floor(r, calib, plan=True) == pytest.approx(0.075)
    # rows from before the decode was measured: encoding and the round trip only
    assert _floor({**r, "decode_seconds": None}, calib, plan=False) == pytest.approx(0.035)
    assert _floor({**r, "encode_seconds": None}, calib, plan=False) is None


def test_peer_translations() -> None:
    import mixedscale as ms
    from benchmarks.peers import lme4_formula, norm_term, sm_kwargs

    s = ms.ModelSpec("y ~ x", groups="g", re_formula="~x")
    assert lme4_formula(s) == "y ~ x + (1 + x | g)"
    assert lme4_formula(s.replace(cov_structure="diagonal")) == "y ~ x + (1 + x || g)"
    assert lme4_formula(ms.ModelSpec("y ~ x", groups="g")) == "y ~ x + (1 | g)"
    kw = sm_kwargs(s.replace(cov_structure="diagonal"))
    assert kw["re_formula"] == "1" and kw["vc_formula"] == {"re_x": "0 + x"}
    assert sm_kwargs(s)["re_formula"] == "~x"
    assert norm_term("group[T.treated]") == "grouptreated"
    assert norm_term("(Intercept)") == "Intercept"


def test_lme4_skips_cleanly_without_rscript(tmp_path: Path) -> None:
    from benchmarks import runners
    from benchmarks.suites import get_suite

    ctx = runners.Context(suite=get_suite("sites", quick=True), quick=True, paths={},
                          out=tmp_path)
    rec = runners.run_lme4(ctx, "lme4", rscript=None) if not _has_r() else None
    if rec is not None:
        assert rec["status"] == "skipped" and "Rscript" in rec["note"]


def _has_r() -> bool:
    import shutil

    return shutil.which("Rscript") is not None


def test_optional_runners_run_only_when_named() -> None:
    from benchmarks.__main__ import _runners
    from benchmarks.suites import get_suite

    tiny = get_suite("tiny", quick=True)
    assert "mixedscale-statsmodels-sorted" not in _runners(tiny, [])
    assert "mixedscale-statsmodels-sorted" not in _runners(tiny, ["mixedscale-auto"])
    assert _runners(tiny, ["mixedscale-statsmodels"]) == ["mixedscale-statsmodels-sorted"]


@pytest.mark.cluster
@pytest.mark.slow
def test_million_runs_at_a_small_size(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.million", "--slices", "300", "--tables",
           "--data", str(tmp_path)]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "run again to measure" in first.stdout
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["by_status"] == {"ok": 300}
    assert out["peak_mb_with_tables"] >= out["peak_mb_without_tables"] > 0
    assert out["with_tables_s"] >= out["with_status_s"] >= out["returned_s"] > 0


def test_repeats_run_round_by_round_and_peers_once() -> None:
    """Each round runs every repeated runner once, so a slow spell of the machine is
    shared by the runners compared, not taken by one runner's repeats."""
    from benchmarks.__main__ import schedule

    names = ["mixedscale-auto-sorted", "mixedscale-fast-sorted", "pandas-loop", "single-fast"]
    repeated = ["mixedscale-auto-sorted", "mixedscale-fast-sorted", "single-fast"]
    assert schedule(names, 3) == names + repeated + repeated
    assert schedule(names, 1) == names
    assert schedule([], 3) == []


def test_repeats_keep_the_median_run_and_the_targets_show_the_range() -> None:
    from benchmarks.__main__ import _median_run
    from benchmarks.report import spread, targets

    def run(overhead: float, fps: float) -> dict[str, object]:
        return {"suite": "genes", "runner": "mixedscale-fast-sorted", "status": "ok",
                "overhead": overhead, "fits_per_second": fps, "n_workers": 2}

    rows = [run(0.30, 1000.0), run(0.10, 3000.0), run(0.20, 2000.0)]
    row = _median_run(rows)
    assert row["overhead"] == 0.20 and [r["overhead"] for r in row["repeats"]] == [0.3, 0.1, 0.2]
    assert spread(row, lambda x: x["overhead"]) == " (10.0%-30.0%, 3 runs)"
    assert spread(rows[0], lambda x: x["overhead"]) == ""  # one run: no range
    (t,) = [t for t in targets([row]) if t["target"].startswith("orchestration")]
    assert t["measured"] == "genes/fast-sorted 20.0% (10.0%-30.0%, 3 runs)" and not t["holds"]
    failed = {**run(0.05, 9000.0), "status": "failed"}
    assert _median_run([failed, rows[0]])["overhead"] == 0.30  # a failed run is no median


def test_the_fits_per_second_target_reads_the_median_fits_per_second() -> None:
    """A row is the run of median overhead; the fits/s target takes the median of the
    runs' fits/s, which that run need not have."""
    from benchmarks.__main__ import _median_run
    from benchmarks.report import median_of, targets

    def run(overhead: float, fps: float) -> dict[str, object]:
        return {"suite": "genes", "runner": "mixedscale-fast-sorted", "status": "ok",
                "overhead": overhead, "fits_per_second": fps, "n_workers": 2}

    row = _median_run([run(0.20, 1900.0), run(0.10, 2100.0), run(0.30, 2200.0)])
    assert row["fits_per_second"] == 1900.0 and median_of(row, "fits_per_second") == 2100.0
    (t,) = [t for t in targets([row]) if t["target"].startswith("genes (2,000")]
    assert t["measured"] == "fast-sorted 2100 (1900-2200, 3 runs)" and t["holds"]
    alone = run(0.1, 1999.0)
    assert median_of(alone, "fits_per_second") == 1999.0
    (t,) = [t for t in targets([alone]) if t["target"].startswith("genes (2,000")]
    assert not t["holds"]


def test_the_overhead_split_adds_up_to_the_overhead() -> None:
    """Worker time outside fits and driver + scheduler CPU, each over the ideal wall
    (fit seconds / workers); the remainder is what is left of the overhead."""
    from benchmarks.report import budget, markdown

    row = {"suite": "genes", "runner": "mixedscale-fast-sorted", "status": "ok",
           "n_workers": 2, "fit_seconds_sum": 4.0, "overhead": 0.25,
           "worker_seconds": {"task": 4.4, "write": 0.2},
           "driver_cpu_exec_seconds": 0.1, "scheduler_cpu_seconds": 0.1,
           "n_fits": 100, "fits_per_second": 40.0, "plan_seconds": 0.1, "note": "",
           "driver_peak_mb": 1.0, "worker_peak_mb": 1.0, "read_ratio": 1.0}
    b = budget(row)
    assert b is not None
    assert b["outside"] == pytest.approx(0.1) and b["write"] == pytest.approx(0.05)
    assert b["cpu"] == pytest.approx(0.05) and b["rest"] == pytest.approx(0.10)
    assert budget({**row, "runner": "pandas-loop"}) is None  # peers have no split
    assert "| genes | mixedscale-fast-sorted | 25.0% | 10.0% (5.0%) | 5.0% | 10.0% |" in \
        markdown({"runs": [row]})
