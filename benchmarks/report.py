"""Agreement between runners, target checks, the markdown table and the JSON report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .peers import LLF
from .suites import get_suite

REFERENCE = "pandas-loop"
SINGLE_REFERENCE = "single-smf"


def _load(out: Path, rec: dict[str, Any]) -> pd.DataFrame | None:
    if rec.get("status") != "ok" or not rec.get("results"):
        return None
    p = out / rec["results"]
    return pd.read_parquet(p) if p.exists() else None


def agreement(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, Any]:
    """Max abs differences of fixed effects and llf over the fits both runners ran."""
    cols = ["key", "spec", "term"]
    a = a[~a["term"].isin(["__error__"])].drop_duplicates(cols)
    b = b[~b["term"].isin(["__error__"])].drop_duplicates(cols)
    m = a.merge(b, on=cols, suffixes=("_a", "_b"))
    m = m[np.isfinite(m["value_a"]) & np.isfinite(m["value_b"])]
    if m.empty:
        return {"n_fits": 0}
    d = (m["value_a"] - m["value_b"]).abs()
    is_llf = m["term"] == LLF
    llf = m[is_llf]
    dl = llf["value_a"] - llf["value_b"]
    both_ok = (m["status_a"] == "ok") & (m["status_b"] == "ok")
    out = {
        "n_fits": len(llf),
        "fe_max_abs_diff": float(d[~is_llf].max()) if (~is_llf).any() else None,
        "llf_max_abs_diff": float(dl.abs().max()) if len(llf) else None,
        "n_llf_diff_gt_1e-3": int((dl.abs() > 1e-3).sum()),
        "n_llf_higher": int((dl > 1e-3).sum()),  # this runner found a higher optimum
        "n_llf_lower": int((dl < -1e-3).sum()),
        "fe_max_abs_diff_both_ok": float(d[~is_llf & both_ok].max())
        if (~is_llf & both_ok).any() else None,
        "llf_max_abs_diff_both_ok": float(d[is_llf & both_ok].max())
        if (is_llf & both_ok).any() else None,
    }
    return out


def truth_check(df: pd.DataFrame, truth: dict[str, Any]) -> dict[str, float]:
    """Mean estimate minus the true value, per fixed effect, for the first spec."""
    d = df[(df["spec"] == 0) & (df["status"] == "ok")]
    out = {}
    for term, val in truth.get("fixed", {}).items():
        from .peers import norm_term

        sel = d[d["term"] == norm_term(term)]["value"]
        if len(sel):
            out[term] = float(sel.mean() - val)
    return out


def add_agreement(out: Path, runs: list[dict[str, Any]]) -> None:
    by = {(r["suite"], r["runner"]): r for r in runs}
    cache: dict[tuple[str, str], pd.DataFrame | None] = {}

    def get(key: tuple[str, str]) -> pd.DataFrame | None:
        if key not in cache:
            cache[key] = _load(out, by[key]) if key in by else None
        return cache[key]

    for r in runs:
        key = (r["suite"], r["runner"])
        ref_name = SINGLE_REFERENCE if r["runner"].startswith("single-") else REFERENCE
        r.pop("agreement", None)
        r.pop("agreement_lme4", None)
        mine = get(key)
        if mine is None:
            continue
        # big's two layouts are separate draws from one model (not a row permutation):
        # only runs on the peers' layout are compared with them.
        if r["suite"] == "big" and r.get("layout") not in (None, "unsorted"):
            continue
        if r["runner"] != ref_name:
            ref = get((r["suite"], ref_name))
            if ref is not None:
                r["agreement"] = {"reference": ref_name, **agreement(mine, ref)}
        if r["runner"] != "lme4" and not r["runner"].startswith("single-"):
            lme = get((r["suite"], "lme4"))
            if lme is not None:
                r["agreement_lme4"] = agreement(mine, lme)
        if r["runner"].startswith("mixedscale-"):
            try:
                truth = get_suite(r["suite"], bool(r.get("quick"))).truth
                r["bias_vs_truth"] = truth_check(mine, truth)
            except SystemExit:
                pass


# -- targets -------------------------------------------------------------------------------
def _ms(runs: list[dict[str, Any]], suite: str, layout: str | None = None
        ) -> list[dict[str, Any]]:
    return [r for r in runs if r["suite"] == suite and r["runner"].startswith("mixedscale-")
            and r["status"] == "ok" and (layout is None or r.get("layout") == layout)]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def spread(r: dict[str, Any], fn: Any, fmt: Any = None) -> str:
    """`` (lo-hi, n runs)`` of ``fn`` over a row's repeats (``--repeat``), else ''."""
    reps = [x for x in r.get("repeats") or [] if x.get("status") == "ok"]
    vals = [v for v in (fn(x) for x in reps) if v is not None]
    if len(vals) < 2:
        return ""
    fmt = fmt or _pct
    return f" ({fmt(min(vals))}-{fmt(max(vals))}, {len(vals)} runs)"


def median_of(r: dict[str, Any], key: str) -> Any:
    """The median of ``key`` over a row's repeats; the row's own value without any. (A
    row is the run of median overhead: its fits/s need not be the median fits/s.)"""
    vals = sorted(x[key] for x in r.get("repeats") or []
                  if x.get("status") == "ok" and x.get(key) is not None)
    return vals[(len(vals) - 1) // 2] if len(vals) > 1 else r.get(key)


def _plan_exec(r: dict[str, Any]) -> float | None:
    """(prepare + executor wall) / (sum of fit seconds / workers) - 1."""
    ideal = (r.get("fit_seconds_sum") or 0) / max(r.get("n_workers") or 1, 1)
    if not ideal or r.get("exec_seconds") is None:
        return None
    return ((r.get("prepare_seconds") or r.get("plan_seconds") or 0)
            + r["exec_seconds"]) / ideal - 1


def _target(name: str, measured: str, holds: bool | None, detail: str = "",
            floor: str = "") -> dict[str, Any]:
    return {"target": name, "measured": measured, "holds": holds, "detail": detail,
            "floor": floor}


def _floor(r: dict[str, Any], calib: dict[str, Any], plan: bool) -> float | None:
    """The overhead no orchestration could go below on this machine for this run's fits:
    one Dask round trip, decoding the needed columns of the input once and encoding its
    results as Parquet, both shared by its workers, and, with ``plan``, one scan of the
    split columns. Converting the data for fitting, more tasks, syncing to disk and every
    Python step are left out, so the true floor is higher."""
    workers = max(r.get("n_workers") or 1, 1)
    ideal = (r.get("fit_seconds_sum") or 0) / workers
    if not ideal or r.get("encode_seconds") is None or not calib.get("roundtrip_ms_serial"):
        return None
    cost = (calib["roundtrip_ms_serial"] / 1000
            + (r["encode_seconds"] + (r.get("decode_seconds") or 0.0)) / workers)
    if plan:
        cost += r.get("key_scan_seconds") or 0.0
    return cost / ideal


def _floors(rows: list[dict[str, Any]], calib: dict[str, Any], plan: bool) -> str:
    vals = [(f"{r['suite']}/{r['runner'][11:]}" if not plan else r["runner"][11:],
             _floor(r, calib, plan)) for r in rows]
    return ", ".join(f"{n} {_pct(v)}" for n, v in vals if v is not None)


def targets(runs: list[dict[str, Any]], calib: dict[str, Any] | None = None
            ) -> list[dict[str, Any]]:
    calib = calib or {}
    out = []
    rows = _ms(runs, "genes") + _ms(runs, "sites")
    if rows:
        vals = [(f"{r['suite']}/{r['runner'][11:]}", r["overhead"],
                 spread(r, lambda x: x.get("overhead"))) for r in rows]
        floors = [f"{r['suite']}/{r['runner'][11:]} {_pct(r.get('dask_floor_overhead'))}"
                  for r in rows if r.get("dask_floor_overhead") is not None]
        out.append(_target("orchestration overhead <= 5% (genes, sites)",
                           ", ".join(f"{n} {_pct(v)}{sp}" for n, v, sp in vals),
                           all(v is not None and v <= 0.05 for _, v, _ in vals),
                           "RunSummary.overhead: executor wall / (sum of fit seconds / "
                           "workers) - 1"
                           + ("; Dask's floor for the same task layout (busy tasks, no "
                              "data or writes): " + ", ".join(floors) if floors else ""),
                           floor=_floors(rows, calib, plan=False)))
    tiny = _ms(runs, "tiny")
    if tiny:
        vals = []
        for r in tiny:
            r["overhead_plan_exec"] = over = _plan_exec(r)
            vals.append((r["runner"][11:], over, spread(r, _plan_exec)))
        out.append(_target("tiny 100k: planning + scheduling + store writes <= 10% over fits",
                           ", ".join(f"{n} {_pct(v)}{sp}" for n, v, sp in vals),
                           all(v is not None and v <= 0.10 for _, v, _ in vals),
                           "(prepare + executor wall) / (sum of fit seconds / workers) - 1; "
                           "read-back of the store by fit_many excluded",
                           floor=_floors(tiny, calib, plan=True)))
        out.append(_target("tiny 100k: planning < 10 s",
                           ", ".join(f"{r['runner'][11:]} plan {r['plan_seconds']:.2f} s "
                                     f"(prepare {r['prepare_seconds'] or 0:.2f} s)"
                                     for r in tiny),
                           all((r["prepare_seconds"] or r["plan_seconds"]) < 10 for r in tiny),
                           "prepare = footer scan + plan"))
        out.append(_target("tiny 100k: driver memory < 1.5 GB",
                           ", ".join(f"{r['runner'][11:]} {r['driver_peak_mb']:.0f} MB "
                                     f"(before read-back {r['driver_peak_exec_mb']:.0f} MB)"
                                     for r in tiny),
                           all(r["driver_peak_mb"] < 1536 for r in tiny),
                           "driver RSS high-water over the whole fit_many call"))
    uns = [r for r in runs if r["runner"].startswith("mixedscale-") and r["status"] == "ok"
           and r.get("layout") == "unsorted" and r.get("read_ratio") is not None]
    if uns:
        out.append(_target("unsorted input: bytes read <= 1.5x one pass",
                           ", ".join(f"{r['suite']} {r['read_ratio']:.2f}x" for r in uns),
                           all(r["read_ratio"] <= 1.5 for r in uns),
                           "RunSummary.bytes_read / bytes_one_pass (bytes_read includes the "
                           "plan-time key scan)"))
    big = [r for r in runs if r["suite"] == "big" and r["runner"].startswith("mixedscale-")]
    if big:
        parts = []
        ok = True
        for r in big:
            et = r.get("error_types") or {}
            killed = (r.get("workers_replaced") or 0) + et.get("MemoryLimit", 0) \
                + et.get("WorkerCrash", 0) + (r.get("n_split") or 0)
            good = r["status"] == "ok" and r.get("state") == "complete" and killed == 0
            ok = ok and good
            parts.append(f"{r['runner'][11:]}: {r.get('state') or r['status']}, "
                         f"workers replaced {r.get('workers_replaced')}, split tasks "
                         f"{r.get('n_split')}, worker peak {r.get('worker_peak_mb') or 0:.0f} MB")
        out.append(_target("big (~5 GB, 2 workers x 1.5 GB): completes, no worker killed",
                           "; ".join(parts), ok))
    mv = _ms(runs, "multiverse")
    if mv:
        vals = []
        for r in mv:
            per = (r["bytes_read"] - (r["bytes_scan"] or 0)) / r["bytes_one_pass"] \
                if r.get("bytes_one_pass") else None
            vals.append((r["runner"][11:], per, r["n_workers"]))
        out.append(_target("multiverse: slice read at most once per worker",
                           ", ".join(f"{n} {v:.2f} passes" for n, v, _ in vals
                                     if v is not None),
                           all(v is not None and v <= w for _, v, w in vals),
                           "(bytes_read - bytes_scan) / bytes_one_pass <= n_workers"))
    genes = _ms(runs, "genes")
    if genes:
        fps = {id(r): median_of(r, "fits_per_second") for r in genes}
        out.append(_target("genes (2,000 x 3 specs) through fit_many >= 2,000 fits/s",
                           ", ".join(f"{r['runner'][11:]} {fps[id(r)]:.0f}"
                                     + spread(r, lambda x: x.get("fits_per_second"),
                                              "{:.0f}".format) for r in genes),
                           all(fps[id(r)] >= 2000 for r in genes
                               if r.get("engine") != "statsmodels"),
                           "end-to-end fit_many call on 2 workers; the median of each "
                           "auto/fast row's runs, both layouts"))
    single = [r for r in runs if r["suite"] == "multiverse" and r["runner"] in
              ("single-fast", "single-statsmodels") and r["status"] == "ok"]
    if single:
        out.append(_target("single 100k-row, 2,000-group random-slope fit <= 0.1 s",
                           ", ".join(f"{r['engine']} {r['single_seconds']:.3f} s "
                                     f"({r['by_status']})"
                                     + spread(r, lambda x: x.get("single_seconds"),
                                              "{:.3f} s".format) for r in single),
                           any(r["single_seconds"] <= 0.1 for r in single),
                           "mixedscale.fit(df, spec), median of repeats (statsmodels: once)"))
    return out


# -- markdown ------------------------------------------------------------------------------
def budget(r: dict[str, Any]) -> dict[str, float] | None:
    """A mixedscale row's overhead split into shares of its ideal wall time (sum of fit
    seconds / workers): the workers' time outside fits (and its store writes), the
    driver's and scheduler's CPU (they share the machine's cores with the workers), and
    the rest: load tasks, waiting at the start and the idle tail, other processes."""
    ws = r.get("worker_seconds") or {}
    n = max(r.get("n_workers") or 1, 1)
    fit = r.get("fit_seconds_sum") or 0.0
    if not r["runner"].startswith("mixedscale-") or not fit or not ws.get("task") \
            or r.get("overhead") is None:
        return None
    ideal = fit / n
    outside = (ws["task"] - fit) / n / ideal
    cpu = ((r.get("driver_cpu_exec_seconds") or 0.0)
           + (r.get("scheduler_cpu_seconds") or 0.0)) / n / ideal
    return {"overhead": r["overhead"], "outside": outside,
            "write": ws.get("write", 0.0) / n / ideal, "cpu": cpu,
            "rest": r["overhead"] - outside - cpu}


def _f(x: Any, fmt: str = "{:.1f}", none: str = "—") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def _status(r: dict[str, Any]) -> str:
    bs = r.get("by_status") or {}
    parts = [f"{v} {k}" for k, v in sorted(bs.items()) if k != "ok"]
    return ", ".join(parts)


def markdown(doc: dict[str, Any]) -> str:
    runs = doc["runs"]
    lines = [
        "| suite | runner | fits | fits/s | overhead | plan s | driver MB | worker MB "
        "| read / 1 pass | Δβ / Δllf vs loop | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in runs:
        if r["status"] != "ok":
            lines.append(f"| {r['suite']} | {r['runner']} | | | | | | | | | "
                         f"{r['status']}: {r['note']} |")
            continue
        ag = r.get("agreement") or {}
        agree = "—"
        if ag.get("n_fits"):
            agree = (f"{_f(ag.get('fe_max_abs_diff'), '{:.1e}')} / "
                     f"{_f(ag.get('llf_max_abs_diff'), '{:.1e}')} (n={ag['n_fits']}"
                     + (f", {ag['n_llf_higher']} higher, {ag['n_llf_lower']} lower"
                        if ag.get("n_llf_diff_gt_1e-3") else "") + ")")
        notes = [n for n in (r.get("note", ""), _status(r)) if n]
        if r.get("shuffle"):
            notes.append("shuffle")
        la = r.get("load_average") or []
        if la and max(la) > 2.5:
            notes.append(f"load avg {max(la):.1f} on 2 cores")
        if r.get("store_publish_ms"):
            notes.append(f"{r['n_tasks']} tasks, publish {r['store_publish_ms']:.0f} ms/task")
        ws = r.get("worker_seconds") or {}
        if ws.get("task") and r.get("fit_seconds_sum"):
            notes.append(f"worker s outside fits {ws['task'] - r['fit_seconds_sum']:.2f} "
                         f"(write {ws.get('write', 0):.2f}, data {ws.get('data', 0):.2f})")
        if r.get("dask_floor_overhead") is not None:
            notes.append(f"Dask floor {_pct(r['dask_floor_overhead'])}")
        if r.get("cpu_probe_ms"):
            notes.append(f"CPU probe {r['cpu_probe_ms']:.0f} ms")
        if r.get("git_commit"):
            notes.append(f"@{r['git_commit']}")
        fps = r["fits_per_second"]
        if r["runner"].startswith("single-"):
            fps_s = f"{r['single_seconds']:.3f} s/fit"
        else:
            fps_s = _f(fps, "{:,.0f}" if fps and fps >= 100 else "{:.1f}")
        lines.append(
            f"| {r['suite']} | {r['runner']} | {r['n_fits']:,} | {fps_s} "
            f"| {_pct(r['overhead']) if r['overhead'] is not None else '—'} "
            f"| {_f(r['plan_seconds'], '{:.2f}')} | {_f(r['driver_peak_mb'], '{:.0f}')} "
            f"| {_f(r['worker_peak_mb'], '{:.0f}')} | {_f(r['read_ratio'], '{:.2f}x')} "
            f"| {agree} | {'; '.join(notes)} |")
    out = ["### Results", "", *lines, ""]
    if doc.get("targets"):
        out += ["### Targets", "", "| target | measured | holds | floor |",
                "|---|---|---|---|"]
        for t in doc["targets"]:
            h = {True: "**yes**", False: "**no**", None: "n/a"}[t["holds"]]
            out.append(f"| {t['target']} | {t['measured']} | {h} | {t.get('floor') or ''} |")
        out += ["", "*floor*: the least overhead any orchestration could reach for the same "
                "fits on this machine: one Dask round trip (calibration below) plus "
                "decoding the needed columns of the input once (into Arrow, one thread) and "
                "encoding the run's results as Parquet in memory, both shared by its "
                "workers, plus, for `tiny`, one scan of the split column. Converting the "
                "data for fitting, more than one task, syncing to disk and all Python steps "
                "are left out, so it is a lower bound: where it is above the target, the "
                "target cannot hold for that engine here.", ""]
    shares = [(r, b) for r in runs if r["status"] == "ok" and (b := budget(r))]
    if shares:
        out += ["### Where the overhead goes", "",
                "Each row's overhead in points of its ideal wall time (sum of fit seconds "
                "/ workers), on the machine's cores that workers, driver and scheduler "
                "share.", "",
                "| suite | runner | overhead | workers outside fits (store writes) "
                "| driver + scheduler CPU | remainder: loads, start, idle tail, other |",
                "|---|---|---:|---:|---:|---:|"]
        for r, b in shares:
            out.append(f"| {r['suite']} | {r['runner']} | {_pct(b['overhead'])} "
                       f"| {_pct(b['outside'])} ({_pct(b['write'])}) | {_pct(b['cpu'])} "
                       f"| {_pct(b['rest'])} |")
        out += ["", "Driver CPU is counted while the executor runs, the scheduler's over "
                "the whole call. Both are upper bounds on what they took from the workers "
                "(some of it runs while workers wait anyway), so the remainder can come "
                "out below zero.", ""]
    cal = doc.get("calibration") or {}
    if cal:
        out += ["### Calibration", "",
                f"- Dask no-op tasks: {cal.get('noop_tasks_per_second', 0):,.0f} tasks/s "
                f"mapped at once; {cal.get('roundtrip_ms_serial', 0):.1f} ms per serial "
                "submit-and-wait round trip.", ""]
    m = doc.get("meta", {})
    probes = [r["cpu_probe_ms"] for r in doc.get("runs", []) if r.get("cpu_probe_ms")]
    if probes:
        out += [f"- CPU probe (`benchmarks.measure.cpu_probe_ms`, a fixed single-threaded "
                f"workload shaped like the fast engine's, taken before each row): "
                f"{min(probes):.0f}-{max(probes):.0f} ms over these rows. Rows compare "
                "across sessions only at similar probes.", ""]
    if m.get("versions"):
        out += ["- Libraries at the last run: "
                + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", ""]
    if doc.get("scaling"):
        out += [doc["scaling"], ""]
    out.append("Rows carry the commit they were measured at (`@commit`; `+`: uncommitted "
               "changes to mixedscale/); rows without one predate that stamp. "
               f"Last run finished {m.get('finished', '')} on {m.get('machine', '')}; "
               f"mixedscale {m.get('mixedscale_version', '')} at commit "
               f"{m.get('git_commit', '')}"
               + (" with uncommitted changes to mixedscale/" if m.get("mixedscale_modified")
                  else "") + f"; command: `{m.get('command', '')}`.")
    return "\n".join(out) + "\n"


def write(out: Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js = out / "results.json"
    js.write_text(json.dumps(doc, indent=1, default=_json_default))
    md = out / "results.md"
    md.write_text(markdown(doc))
    return js, md


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


README_BEGIN = "<!-- BENCHMARK-RESULTS:BEGIN -->"
README_END = "<!-- BENCHMARK-RESULTS:END -->"


def update_readme(readme: Path, md: str) -> bool:
    """Replace the generated block in the README; False if the markers are missing."""
    if not readme.exists():
        return False
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + md + README_END + tail)
    return True
