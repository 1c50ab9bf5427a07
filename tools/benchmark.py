"""The frozen benchmark: recipes x method variants x seeds, each run one `debias train`, resumable, then one report.

    python tools/benchmark.py --out runs/bench                                   # everything, one run at a time
    python tools/benchmark.py --jobs 2 --out runs/bench                          # 2 runs at a time
    python tools/benchmark.py --recipes textured_digits --methods erm concept_graft --seeds 0 --out runs/b1
    python tools/benchmark.py --scratch --set train.device=cuda --out runs/bench # also from scratch, on a GPU
    python tools/benchmark.py --launcher submitit --slurm-partition gpu --slurm-time 120 \\
        --slurm-gpus-per-node 1 --slurm-cpus-per-task 8 --set train.device=cuda --out runs/bench
    python tools/benchmark.py --report-only --out runs/bench                     # the report again, no run

Runs land in ``OUT/runs/<recipe>/<variant>/<row>/seed<S>`` (``row``: ``finetuned``, from the recipe's
``model.checkpoint``, or ``scratch``; a recipe without a checkpoint has the scratch row only), their output in
``OUT/logs/<recipe>/<variant>/<row>/seed<S>.log``. A finished run (its ``done`` marker) is skipped; an unfinished one
resumes from its checkpoint (``debias train`` on the same directory), so the same command continues a stopped
benchmark. The report (``benchmark.json``, ``benchmark.md``, ``<recipe>.png``) is written from every finished run
under ``OUT/runs``; docs/BENCHMARK.md states the protocol. The variants, the nuisance-aware transforms and the goals
are tables in ``debias/benchmark/plan.py``.

Launchers: ``local`` (``--jobs N`` worker processes, ``cores // N`` torch threads each: tools/sweep.py's workers;
Ctrl-C or SIGTERM to the benchmark stops the runs in progress after their current step with a checkpoint written,
and the benchmark exits 130 or 143), ``submitit`` (each run a SLURM job through ``submitit.AutoExecutor``;
``--jobs N`` caps the jobs running at once, the array's parallelism), ``submitit-local`` (submitit's
``LocalExecutor``: the same path on this machine, ``--jobs`` jobs at a time). The submitted jobs are recorded in
``OUT/submitit/jobs.json``: a relaunch waits for a recorded job still queued or running instead of submitting its
run twice.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import sweep  # tools/sweep.py, beside this file: its worker processes run the local pool's runs

from debias import io
from debias.benchmark.jobs import train_job
from debias.benchmark.plan import DEFAULT_RECIPES, DEFAULT_SEEDS, GOALS, VARIANTS, Run, plan_runs
from debias.benchmark.report import git_commit, write_report
from debias.errors import DebiasError

SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED"}
"""SLURM job states of a job that may still write its run directory."""


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line per finished run: its key, exit code and time, the benchmark's elapsed time and an ETA (the mean
    time per finished run so far times the runs left)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def finished(self, run: Run, code: int, seconds: float | None, log: Path) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        took = f" in {seconds:.0f} s" if seconds is not None else ""
        status = "ok" if code == 0 else f"exit {code} (log: {log})"
        print(f"[{self.done}/{self.total}] {run.key}: {status}{took}; elapsed {_clock(elapsed)}, ETA {_clock(eta)}",
              flush=True)


def log_path(out: Path, run: Run) -> Path:
    path = out / "logs" / run.recipe / run.variant / run.row / f"seed{run.seed}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_local(todo: list[Run], jobs: int, out: Path, progress: Progress) -> list[str]:
    """The runs on ``jobs`` worker processes (tools/sweep.py's: torch imported once per worker, a run stopped after
    its current step when the benchmark is interrupted or killed). Returns the keys of the failed runs; Ctrl-C
    raises KeyboardInterrupt once the runs in progress have stopped."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the workers' OpenMP at start
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    failed = []
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=sweep._init_worker,
                             initargs=(threads, os.getpid(), stop)) as pool:
        futures = {pool.submit(sweep._run_logged, run.command(), str(log_path(out, run))): run for run in todo}
        try:
            for future in as_completed(futures):
                run = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # the worker itself died (killed, out of memory)
                    print(f"{run.key}: worker process failed ({type(exc).__name__}: {exc})", file=sys.stderr)
                    result = (1, None)
                if result is None:  # not started: the benchmark is stopping
                    continue
                code, seconds = result
                progress.finished(run, code, seconds, log_path(out, run))
                if code != 0:
                    failed.append(run.key)
        except KeyboardInterrupt:
            stop.set()
            print("benchmark interrupted: the runs in progress stop after their current step (checkpoints written), "
                  "no other run starts; the same command resumes them", file=sys.stderr, flush=True)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return failed


def _executor(args: argparse.Namespace, folder: Path):
    import submitit

    if args.launcher == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        if args.slurm_time is not None:
            executor.update_parameters(timeout_min=int(args.slurm_time))
        return executor
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError as exc:
        raise DebiasError(f"--launcher submitit: {exc} (submitit found no SLURM); use --launcher local, or "
                          "submitit-local for submitit on this machine") from None
    params = {"slurm_partition": args.slurm_partition, "slurm_time": args.slurm_time,
              "slurm_gpus_per_node": args.slurm_gpus_per_node, "slurm_cpus_per_task": args.slurm_cpus_per_task,
              "slurm_array_parallelism": args.jobs}
    executor.update_parameters(name="debias-benchmark", **{k: v for k, v in params.items() if v is not None})
    return executor


def run_submitit(todo: list[Run], args: argparse.Namespace, out: Path, progress: Progress) -> list[str]:
    """The runs as submitit jobs (SLURM, or submitit's local executor), waited for. Returns the failed runs' keys."""
    import submitit

    folder = out / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "jobs.json"
    records = io.read_json(record_path) if record_path.exists() else {}
    executor = _executor(args, folder)
    local = args.launcher == "submitit-local"
    if local:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (args.jobs or 1)))
    active: dict[str, tuple[Run, object, float]] = {}
    queue = []
    for run in todo:
        job_id = records.get(run.key)
        if job_id is not None and not local:
            job = submitit.SlurmJob(folder=folder, job_id=job_id)
            if job.state in SLURM_ACTIVE:
                print(f"wait {run.key}: job {job_id} is {job.state.lower()} (submitted by an earlier launch)")
                active[run.key] = (run, job, time.perf_counter())
                continue
        queue.append(run)

    def submit(runs: list[Run]) -> None:
        if not runs:
            return
        with executor.batch():  # one array on SLURM
            jobs = [executor.submit(train_job, run.command(), str(log_path(out, run))) for run in runs]
        for run, job in zip(runs, jobs):
            records[run.key] = job.job_id
            active[run.key] = (run, job, time.perf_counter())
        io.atomic_write_json(record_path, records)

    limit = (args.jobs or 1) if local else len(queue) + len(active)
    poll = 0.5 if local else 30.0
    failed = []
    try:
        while queue or active:
            if len(active) < limit and queue:
                take = limit - len(active)
                submit(queue[:take])
                queue = queue[take:]
            for key, (run, job, started) in list(active.items()):
                if not job.done():
                    continue
                del active[key]
                try:
                    code = job.result()
                except Exception as exc:  # killed, timed out before the run could stop, failed to start
                    print(f"{key}: job {job.job_id} failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          f"submitit's logs: {folder}", file=sys.stderr)
                    code = 1
                progress.finished(run, code, time.perf_counter() - started, log_path(out, run))
                if code != 0:
                    failed.append(key)
            if active:
                time.sleep(poll)
    except KeyboardInterrupt:
        if local:
            for run, job, _ in active.values():
                job.cancel(check=False)  # SIGINT: the run stops after its current step, with a checkpoint
            print("benchmark interrupted: the jobs in progress stop after their current step; the same command "
                  "resumes them", file=sys.stderr, flush=True)
        else:
            print(f"benchmark interrupted: the submitted jobs keep running (ids in {record_path}); the same command "
                  "waits for those still queued or running and submits the rest", file=sys.stderr, flush=True)
        raise
    return failed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="variants: " + ", ".join(VARIANTS) + "; goals: " + ", ".join(GOALS))
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, metavar="NAME",
                   help="recipe file stems in recipes/ or paths (default: " + " ".join(DEFAULT_RECIPES) + ")")
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), metavar="NAME",
                   help="benchmark variants (default: all of " + " ".join(VARIANTS) + ")")
    p.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time (local and submitit-local: default 1; submitit: the SLURM array's "
                        "parallelism, default submitit's)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for every run (before the variant's own), e.g. train.device=cuda")
    p.add_argument("--scratch", action=argparse.BooleanOptionalAction, default=False,
                   help="also train every recipe with a checkpoint from scratch (model.checkpoint = \"\"), as a "
                        "second row set")
    p.add_argument("--launcher", choices=["local", "submitit", "submitit-local"], default="local")
    p.add_argument("--slurm-partition", help="submitit: slurm_partition")
    p.add_argument("--slurm-time", type=int, metavar="MINUTES",
                   help="submitit: slurm_time, a job's time limit in minutes (submitit-local: its timeout)")
    p.add_argument("--slurm-gpus-per-node", type=int, help="submitit: slurm_gpus_per_node")
    p.add_argument("--slurm-cpus-per-task", type=int, help="submitit: slurm_cpus_per_task")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the finished runs; run nothing")
    p.add_argument("--out", required=True, help="the benchmark directory")
    return p


def _launch(args: argparse.Namespace, out: Path) -> int:
    t0 = time.perf_counter()
    runs, notes = plan_runs(args.recipes, args.methods, args.seeds, args.overrides, args.scratch, out)
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(out / "plan.json", {
        "recipes": list(dict.fromkeys(r.recipe for r in runs)) or [Path(r).stem for r in args.recipes],
        "runs": [str(r.dir.relative_to(out)) for r in runs], "notes": notes,
        "methods": args.methods, "seeds": args.seeds, "sets": args.overrides, "scratch": args.scratch})
    for note in notes:
        print(note)
    todo = []
    for run in runs:
        if (run.dir / "done").exists():
            print(f"skip {run.key} (done)")
        else:
            todo.append(run)
    launch = {"commit": git_commit(), "argv": sys.argv[1:], "launcher": args.launcher,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs_planned": len(runs), "runs_started": len(todo)}
    print(f"{len(runs)} runs planned, {len(runs) - len(todo)} finished before, {len(todo)} to run "
          f"({args.launcher} launcher)", flush=True)
    progress = Progress(len(todo))
    code = 0
    stopped_by = []

    def on_sigterm(signum, frame):  # as Ctrl-C: the runs in progress stop after their current step, resumable
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if todo and args.launcher == "local":
            failed = run_local(todo, args.jobs or 1, out, progress)
        elif todo:
            failed = run_submitit(todo, args, out, progress)
        else:
            failed = []
    except KeyboardInterrupt:
        failed, code = None, 143 if stopped_by else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    launch.update(wall_s=time.perf_counter() - t0, failed=failed, interrupted=code != 0)
    with open(out / "launches.jsonl", "a") as f:
        f.write(json.dumps(launch) + "\n")
    if code:
        return code
    wall = time.perf_counter() - t0
    write_report(out, wall)
    print((out / "benchmark.md").read_text())
    print(f"benchmark wall time {wall:.0f} s for {len(todo)} runs; report in {out / 'benchmark.md'}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; the report holds the others", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise DebiasError(f"--out {str(out)!r}: exists and is not a directory")
        if args.jobs is not None and args.jobs < 1:
            raise DebiasError(f"--jobs {args.jobs}: expected at least 1 run at a time")
        if args.launcher != "local" and not args.report_only:
            try:
                import submitit  # noqa: F401
            except ImportError:
                raise DebiasError(f"--launcher {args.launcher}: submitit is not installed; pip install submitit "
                                  "(or pip install -e '.[cluster]')") from None
            if args.launcher == "submitit" and shutil.which("srun") is None:
                raise DebiasError("--launcher submitit: no SLURM here (srun not found); use --launcher local, or "
                                  "submitit-local for submitit on this machine")
        if args.report_only:
            if not any((out / "runs").glob("*/*/*/seed*/done")):
                raise DebiasError(f"--report-only: no finished run under {out / 'runs'}")
            write_report(out)
            print(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.json'} and the PNGs")
            return 0
        return _launch(args, out)
    except DebiasError as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
