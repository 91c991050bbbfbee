"""``python -m benchmarks run --suite genes,sites,multiverse,tiny [--quick] [--out DIR]``.

See benchmarks/README.md. Everything that starts a Dask cluster sits under the
``__main__`` guard (workers are spawned, and re-import this module).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _repo() -> Path:
    """The checkout mixedscale is imported from (for the commit id)."""
    import mixedscale

    return Path(mixedscale.__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="mixedscale benchmarks against peers")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="generate data, run suites, write results.json/.md")
    r.add_argument("--suite", default="genes,sites,multiverse,tiny",
                   help="comma-separated: genes, sites, multiverse, tiny, big (big is opt-in)")
    r.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    r.add_argument("--out", default=str(HERE / "out"), help="results folder")
    r.add_argument("--data", default=str(HERE / "data"), help="generated Parquet folder")
    r.add_argument("--runners", default="",
                   help="comma-separated runner names or prefixes to run (default: all)")
    r.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each runner in a fresh process and restart the workers between "
                   "runs, for clean memory peaks (default: on, off with --quick)")
    r.add_argument("--fresh", action="store_true",
                   help="drop earlier results in OUT instead of merging by (suite, runner)")
    r.add_argument("--readme", action="store_true",
                   help="also write the table into benchmarks/README.md")
    r.add_argument("--keep-stores", action="store_true", help="keep the results stores")
    r.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run each mixedscale and single-fit runner N times; the row is the "
                   "median run, the targets show the range (peers run once)")
    rep = sub.add_parser("report", help="re-render results.md from results.json")
    rep.add_argument("--out", default=str(HERE / "out"))
    rep.add_argument("--readme", action="store_true")
    c = sub.add_parser("_child", help=argparse.SUPPRESS)
    c.add_argument("job")
    return p


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_repo(),
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _dirty() -> bool:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "mixedscale"], cwd=_repo(),
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(out.strip())


def _machine() -> str:
    import psutil

    mem = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} "
            f"{platform.machine()}, Python {platform.python_version()}")


class _Cluster:
    """The shared 2-worker LocalCluster; workers are restarted between runs, and the
    cluster is rebuilt if a restart does not bring them back."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cluster: Any = None
        self.client: Any = None
        self.start()

    def start(self) -> None:
        from distributed import Client

        from mixedscale.executor import local_cluster

        self.cluster = local_cluster(self.n)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(self.n, timeout=120)

    def close(self) -> None:
        for obj in (self.client, self.cluster):
            try:
                obj.close()
            except Exception as exc:
                print(f"[cluster] close: {exc}", file=sys.stderr)

    def reset(self) -> None:
        try:
            self.client.restart(timeout=90, wait_for_workers=True)
            return
        except Exception as exc:
            print(f"[cluster] restart failed ({type(exc).__name__}); rebuilding the cluster",
                  file=sys.stderr, flush=True)
        self.close()
        self.start()


# What each repeat keeps for the targets' ranges (see report.spread).
REPEAT_KEYS = ("overhead", "fits_per_second", "single_seconds", "prepare_seconds",
               "plan_seconds", "exec_seconds", "fit_seconds_sum", "n_workers", "cpu_probe_ms",
               "driver_peak_mb", "status")


def _repeats(runner: str, n: int) -> int:
    return max(1, n) if runner.startswith(("mixedscale-", "single-")) else 1


def schedule(runners: list[str], n: int) -> list[str]:
    """The runs in order: round by round, every runner once per round, so a slow spell
    of the shared machine falls on all of a suite's runners alike, not on one runner's
    repeats. (Identical runs alternated in one fixed order differed by 10 % in their
    median fit seconds here.)"""
    return [name for k in range(max((_repeats(r, n) for r in runners), default=0))
            for name in runners if k < _repeats(name, n)]


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median time (overhead; seconds per fit for single-fit runners) among
    ``runs`` of one runner, carrying every run's summary in ``repeats``."""
    key = "single_seconds" if runs[0]["runner"].startswith("single-") else "overhead"
    done = [r for r in runs if r.get("status") == "ok" and r.get(key) is not None]
    pick = sorted(done, key=lambda r: r[key])[(len(done) - 1) // 2] if done else runs[-1]
    return {**pick, "repeats": [{k: r.get(k) for k in REPEAT_KEYS} for r in runs]}


def _uses_cluster(suite: Any, runner: str) -> bool:
    if runner == "dask-groupby":
        return True
    return runner.startswith("mixedscale-") and not suite.cluster


def _selected(runner: str, wanted: list[str]) -> bool:
    return not wanted or any(runner == w or runner.startswith(w) for w in wanted)


def _runners(suite: Any, wanted: list[str]) -> list[str]:
    """The suite's runners selected by --runners; optional ones only when named."""
    optional = [r for r in suite.optional_runners if wanted and _selected(r, wanted)]
    return [r for r in suite.runners if _selected(r, wanted)] + optional


def _run_child(job: dict[str, Any], out: Path, timeout: float) -> dict[str, Any]:
    jobs = out / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    stem = f"{job['suite']}-{job['runner']}"
    job_path, res_path = jobs / f"{stem}.json", jobs / f"{stem}.result.json"
    res_path.unlink(missing_ok=True)
    job["result"] = str(res_path)
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "_child", str(job_path)],
                              cwd=ROOT, env=env, timeout=timeout, stdout=subprocess.PIPE,
                              stderr=None, text=True)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if res_path.exists():
        return dict(json.loads(res_path.read_text()))
    return {"suite": job["suite"], "runner": job["runner"], "status": "failed",
            "note": f"runner process ended without a result (exit {rc})", "quick": job["quick"]}


def _child(job_path: str) -> int:
    from . import runners
    from .suites import get_suite

    job = json.loads(Path(job_path).read_text())
    suite = get_suite(job["suite"], job["quick"])
    client = None
    if job.get("scheduler"):
        from distributed import Client

        client = Client(job["scheduler"], timeout=60)
    ctx = runners.Context(suite=suite, quick=job["quick"],
                          paths={k: Path(v) for k, v in job["paths"].items()},
                          out=Path(job["out"]), client=client,
                          keep_stores=job.get("keep_stores", False))
    try:
        rec = runners.run_one(ctx, job["runner"])
    finally:
        if client is not None:
            client.close()
    rec["isolated"] = True
    Path(job["result"]).write_text(json.dumps(rec, default=str))
    return 0


def _load_previous(js: Path, quick: bool) -> list[dict[str, Any]]:
    if not js.exists():
        return []
    try:
        doc = json.loads(js.read_text())
    except ValueError:
        return []
    if bool(doc.get("meta", {}).get("quick")) != quick:
        return []
    return list(doc.get("runs", []))


def _finalize(out: Path, runs: list[dict[str, Any]], meta: dict[str, Any],
              calib: dict[str, Any], readme: bool) -> tuple[Path, Path]:
    from . import report, scaling

    order = ["genes", "sites", "multiverse", "tiny", "big"]
    runs.sort(key=lambda r: (order.index(r["suite"]) if r["suite"] in order else 99,
                             r.get("_order", 0)))
    report.add_agreement(out, runs)
    doc: dict[str, Any] = {"meta": meta, "calibration": calib, "runs": runs}
    doc["targets"] = report.targets(runs, calib)
    text, data = scaling.section(runs, calib)
    doc["scaling"] = text
    doc["scaling_data"] = data
    js, md = report.write(out, doc)
    if readme:
        ok = report.update_readme(HERE / "README.md", md.read_text())
        print("[report] README updated" if ok else "[report] README markers not found",
              file=sys.stderr)
    return js, md


def run(args: argparse.Namespace) -> int:
    from . import data as data_mod
    from . import measure, runners
    from .suites import DEFAULT_SUITES, get_suite

    quick = bool(args.quick)
    isolate = (not quick) if args.isolate is None else bool(args.isolate)
    names = [s.strip() for s in args.suite.split(",") if s.strip()] or list(DEFAULT_SUITES)
    wanted = [w.strip() for w in args.runners.split(",") if w.strip()]
    out, data_root = Path(args.out).resolve(), Path(args.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    suites = [get_suite(n, quick) for n in names]
    paths = {s.name: data_mod.generate(s, data_root, quick) for s in suites}
    js = out / "results.json"
    prev = [] if args.fresh else _load_previous(js, quick)
    prev_doc = json.loads(js.read_text()) if (js.exists() and prev) else {}
    t_start = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    meta: dict[str, Any] = {
            "started": t_start, "quick": quick, "isolated": isolate, "suites": names,
            "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
            "machine": _machine(), "git_commit": _git_commit(),
            "mixedscale_modified": _dirty()}
    import mixedscale

    meta["mixedscale_version"] = mixedscale.__version__
    meta["versions"] = measure.versions()
    need_cluster = any(_uses_cluster(s, r) for s in suites for r in _runners(s, wanted))
    shared: _Cluster | None = None
    calib: dict[str, Any] = dict(prev_doc.get("calibration") or {})
    if need_cluster:
        shared = _Cluster(runners.N_WORKERS)
        calib = runners.calibrate_dask(shared.client, 200 if quick else 2000)
        print(f"[calibration] {calib}", file=sys.stderr, flush=True)
    done = {(s.name, r) for s in suites for r in _runners(s, wanted)}
    runs = [r for r in prev if (r["suite"], r["runner"]) not in done]
    tried: dict[tuple[str, str], list[dict[str, Any]]] = {}  # --repeat: every run so far
    try:
        for s in suites:
            for r in schedule(_runners(s, wanted), args.repeat):
                load0 = os.getloadavg()[0]
                probe = measure.cpu_probe_ms()
                if isolate:
                    if shared is not None and _uses_cluster(s, r):
                        shared.reset()
                    job = {"suite": s.name, "quick": quick, "runner": r, "out": str(out),
                           "paths": {k: str(v) for k, v in paths[s.name].items()},
                           "scheduler": shared.cluster.scheduler_address
                           if shared is not None and _uses_cluster(s, r) else None,
                           "keep_stores": args.keep_stores}
                    rec = _run_child(job, out, timeout=600 if quick else 4 * 3600)
                    print(f"[{s.name}] {r}: {rec.get('status')} "
                          f"({rec.get('runner_seconds', 0):.0f} s)", file=sys.stderr,
                          flush=True)
                else:
                    ctx = runners.Context(suite=s, quick=quick, paths=paths[s.name], out=out,
                                          client=shared.client if shared else None,
                                          keep_stores=args.keep_stores)
                    rec = runners.run_one(ctx, r)
                rec["_order"] = (*s.runners, *s.optional_runners).index(r)
                # Rows from earlier invocations are kept: each names its own code.
                rec["git_commit"] = meta["git_commit"] + ("+" if meta["mixedscale_modified"]
                                                          else "")
                rec["load_average"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
                rec["cpu_probe_ms"] = round(probe, 1)
                if args.repeat > 1:  # the row: the median of this runner's runs so far
                    tried.setdefault((s.name, r), []).append(rec)
                    rec = _median_run(tried[(s.name, r)])
                    runs = [x for x in runs if (x["suite"], x["runner"]) != (s.name, r)]
                runs.append(rec)
                meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
                _finalize(out, list(runs), meta, calib, readme=False)
    finally:
        if shared is not None:
            shared.close()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    js, md = _finalize(out, runs, meta, calib, readme=args.readme)
    print(md.read_text())
    print(f"wrote {js} and {md}", file=sys.stderr)
    return 0


def report_cmd(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    doc = json.loads((out / "results.json").read_text())
    _, md = _finalize(out, doc["runs"], doc["meta"], doc.get("calibration") or {},
                       readme=args.readme)
    print(md.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "run":
        return run(args)
    if args.cmd == "report":
        return report_cmd(args)
    return _child(args.job)


if __name__ == "__main__":
    sys.exit(main())
