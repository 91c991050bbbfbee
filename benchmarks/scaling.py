"""A wall-time model for more workers, fits and data, from the measured per-fit and
per-task costs of the mixedscale runs and the planner's own packing rule.

    T        = max(TASK_MIN_TASKS, est_total_ms / TASK_TARGET_MS)   planner's task count
    task     = fits_per_task * (c_fit + c_out) + c_publish           one task's worker time
    wall(W)  = prepare(S) + max(ceil(T / W) * task, T * c_central) + readback(F)

``c_fit`` is the measured per-fit time, ``c_out`` the measured worker time per fit
outside the fits (output tables, gathering rows, loading), ``c_central`` the cluster's
measured per-task cost (no-op tasks) plus the driver's CPU per task. ``prepare``
(footer scan + plan on the driver) and ``readback`` (fit_many reading the store
back into the driver) do not shrink with W. Packing is independent of the cluster
size, so no more than T workers are ever busy.
"""

from __future__ import annotations

import math
from typing import Any

WORKERS = (1, 2, 10, 100, 1000)


def constants(r: dict[str, Any], calib: dict[str, Any]) -> dict[str, float]:
    w = max(r.get("n_workers") or 1, 1)
    n_fits = max(r["n_fits"], 1)
    n_tasks = max(r.get("n_tasks") or 1, 1)
    fit_sum = r["fit_seconds_sum"] or 0.0
    publish = (r.get("store_publish_ms") or 0.0) / 1000
    c_out = max(0.0, r["exec_seconds"] * w - fit_sum - n_tasks * publish) / n_fits
    # The cluster's per-task cost: measured no-op task throughput (the scheduler
    # process's CPU during a run is mostly heartbeats and polling, not tasks).
    c_sched = 1.0 / max(calib.get("noop_tasks_per_second") or 1.0, 1.0)
    # Driver CPU of fit_many's execute phase per task: an upper bound, since the
    # executor's 10 ms polling loop costs CPU in proportion to time as well.
    c_driver = (r.get("driver_cpu_exec_seconds") or 0.0) / n_tasks
    return {
        "c_fit": fit_sum / n_fits, "c_out": c_out, "c_publish": publish,
        "c_sched": c_sched, "c_driver": c_driver,
        "prepare_per_slice": (r.get("prepare_seconds") or r.get("plan_seconds") or 0.0)
        / max(r["n_slices_total"], 1),
        "readback_per_fit": (r.get("readback_seconds") or 0.0) / n_fits,
    }


def planned_tasks(est_ms_per_fit: float, n_fits: float) -> int:
    """The planner's task count for a job (its packing rule, ignoring load-unit breaks)."""
    try:
        from mixedscale.plan import TASK_MIN_MS, TASK_MIN_TASKS, TASK_TARGET_MS
    except ImportError:
        TASK_MIN_MS, TASK_MIN_TASKS, TASK_TARGET_MS = 50.0, 4, 2000.0
    total = est_ms_per_fit * n_fits
    target = min(TASK_TARGET_MS, max(total / TASK_MIN_TASKS, TASK_MIN_MS))
    return max(1, math.ceil(total / target))


def predict(k: dict[str, float], n_fits: float, n_slices: float, est_ms: float,
            workers: int) -> dict[str, Any]:
    tasks = planned_tasks(est_ms, n_fits)
    per_task = n_fits / tasks * (k["c_fit"] + k["c_out"]) + k["c_publish"]
    prepare = k["prepare_per_slice"] * n_slices
    readback = k["readback_per_fit"] * n_fits
    parallel = math.ceil(tasks / workers) * per_task
    central = tasks * (k["c_sched"] + k["c_driver"])
    terms = {"fits (parallel)": parallel, "scheduler/driver loop": central,
             "planner scan": prepare, "store read-back": readback}
    wall = prepare + max(parallel, central) + readback
    limit = max(terms, key=lambda t: terms[t])
    if limit == "fits (parallel)" and tasks < workers:
        limit = f"task count ({tasks} tasks)"
    return {"workers": workers, "tasks": tasks, "task_seconds": per_task, "wall": wall,
            "fits_per_second": n_fits / wall, "limit": limit, **terms}


def _fmt_s(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    if x >= 60:
        return f"{x / 60:.1f} min"
    return f"{x:.1f} s"


def section(runs: list[dict[str, Any]], calib: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The markdown section and its numbers, from whichever base runs are present."""
    base = {}
    for suite in ("genes", "tiny"):
        cand = [r for r in runs if r["suite"] == suite and r["status"] == "ok"
                and r["runner"] == "mixedscale-auto-sorted" and r.get("n_tasks")]
        if cand:
            base[suite] = cand[0]
    if not base:
        return "", {}
    workloads = []
    est = {name: _est_ms(name) for name in base}
    if "genes" in base:
        workloads += [
            ("genes x10: 20,000 genes x 3 specs (120 rows)", "genes", 60_000, 20_000),
            ("genes x100: 200,000 slices x 3 specs (120 rows)", "genes", 600_000, 200_000),
        ]
    if "tiny" in base:
        workloads.append(("tiny x10: 1,000,000 slices x 1 spec (20 rows)", "tiny", 1_000_000,
                          1_000_000))
    lines = ["### Scaling model (from the measured constants)", ""]
    data: dict[str, Any] = {"constants": {}, "predictions": {}}
    for name, suite, n_fits, n_slices in workloads:
        r = base[suite]
        k = constants(r, calib)
        data["constants"][suite] = {**k, "est_ms_per_fit": est[suite]}
        preds = [predict(k, n_fits, n_slices, est[suite], w) for w in WORKERS]
        data["predictions"][name] = preds
        lines += [
            f"**{name}** — measured on `{suite}`: per fit {1000 * k['c_fit']:.2f} ms (planner "
            f"estimate {est[suite]:.2f} ms), worker time outside fits "
            f"{1000 * k['c_out']:.2f} ms per fit, publish {1000 * k['c_publish']:.0f} ms per "
            f"task, cluster {1000 * k['c_sched']:.2f} ms + driver {1000 * k['c_driver']:.1f} "
            f"ms per task, planning {1e6 * k['prepare_per_slice']:.0f} µs per slice, "
            f"read-back {1e6 * k['readback_per_fit']:.0f} µs per fit; "
            f"{preds[0]['tasks']} tasks of {preds[0]['task_seconds']:.1f} s.", "",
            "| workers | predicted wall | fits/s | fits (parallel) | scheduler/driver | "
            "planner scan | store read-back | limit |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for p in preds:
            lines.append(
                f"| {p['workers']:,} | {_fmt_s(p['wall'])} | {p['fits_per_second']:,.0f} | "
                f"{_fmt_s(p['fits (parallel)'])} | {_fmt_s(p['scheduler/driver loop'])} | "
                f"{_fmt_s(p['planner scan'])} | {_fmt_s(p['store read-back'])} | "
                f"{p['limit']} |")
        lines.append("")
    return "\n".join(lines), data


def _est_ms(suite: str) -> float:
    """The planner's estimated ms per fit for a suite's specs and slice size."""
    from mixedscale.plan import spec_cost_ms

    from .suites import get_suite

    s = get_suite(suite)
    return sum(spec_cost_ms(sp, s.rows_per_slice) for sp in s.specs) / len(s.specs)
