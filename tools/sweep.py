"""Sweep methods x seeds x bias on a recipe, then compare. Finished runs (a ``done`` marker) are skipped.

    python tools/sweep.py --bias 1.0 --out runs/sweep            # the 8 methods x 3 seeds at bias 1.0
    python tools/sweep.py --bias 1.0 0.99 --seeds 0 1 2 --out runs/sweep
    python tools/sweep.py --methods erm concept:graft --set concept.weight=2 --out runs/w2
    python tools/sweep.py --bias 1.0 --jobs 2 --out runs/sweep   # 2 runs at a time, 1 thread each (2 cores)
    # the compare also counts the seeds meeting a goal and pairs every method with erm seed by seed
    python tools/sweep.py --bias 1.0 --goal test=0.99 shifted=0.95 swapped=0.95 --reference erm --out runs/sweep

With ``--jobs N`` (N > 1) N worker processes (``cores // N`` torch threads each) take the runs in turn, each run's
output in ``OUT/logs`` (appended: a resumed run's log keeps its earlier attempts); a worker imports torch, timm and
open_clip once for all its runs. The small models here use a second core better as a second run than as a second
thread. Ctrl-C stops the sweep: a run in progress stops after its current step with a checkpoint written, no other
run starts, the sweep exits 130 (``--jobs 1`` too), and the same command resumes. Killing the sweep process alone
(SIGTERM, even SIGKILL) stops its workers' runs the same way.

A method ``concept:SOURCE`` is the concept method with ``concept.source = SOURCE``.

A dataset whose ``SETTING_KEYS`` lack ``bias`` (``data.name = "folder"``: Waterbirds, CelebA) takes no ``--bias``: its
images fix their own bias, so its runs are ``OUT/<method>_seed<seed>`` and the compare labels them without one.

A run deletes its ``checkpoint.pt`` (the model, optimizer and method state a killed run resumes from, the largest
file) once it has finished; the model, the selection rules' picks and the figures stay, and compare and ``debias
explain`` need no more. ``--keep-training-state`` keeps it (``debias train --keep-training-state``);
``--drop-training-state`` also deletes it from finished runs written by older versions or kept that way.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from debias.cli import main as debias_main
from debias.compare import compare_runs, parse_goal
from debias.data.registry import dataset
from debias.errors import DebiasError
from debias.recipe import load_recipe, require_same_recipe

STOPPED = (130, 143)
"""``debias train``'s exit codes for a run stopped by SIGINT or SIGTERM (checkpoint written, resumable)."""
STOP_MESSAGE = ("sweep interrupted: the runs in progress stop after their current step (checkpoints written), no other "
                "run starts; the same command resumes them")
ALL_METHODS = ["erm", "concept:graft", "concept:clip", "concept:labels", "groupdro", "jtt", "reweight", "augment"]


def run_dir(out: Path, method: str, bias: float | None, seed: int) -> Path:
    """``OUT/<method>_bias<bias>_seed<seed>``; without the bias for a folder dataset (``bias`` None), whose images
    fix their own."""
    return out / f"{method.replace(':', '-')}{'' if bias is None else f'_bias{bias}'}_seed{seed}"


def drop_training_state(d: Path) -> None:
    """Delete a finished run's resumable training state (``checkpoint.pt``); a run without ``done`` keeps it."""
    if (d / "done").exists():
        (d / "checkpoint.pt").unlink(missing_ok=True)


_worker: dict = {"busy": False, "stop": None}
"""A worker's state, shared by its runs and its watch thread (under ``_worker_lock``): whether a run is in progress,
and the sweep's event that asks the workers to stop."""
_worker_lock = threading.Lock()


def _init_worker(threads: int, sweep_pid: int, stop) -> None:
    import torch

    torch.set_num_threads(threads)
    _worker["stop"] = stop
    threading.Thread(target=_watch_sweep, args=(sweep_pid, stop), daemon=True, name="sweep-watch").start()


def _watch_sweep(sweep_pid: int, stop, poll: float = 1.0, grace: float = 300.0) -> None:
    """Stops this worker's run when the sweep is interrupted (its ``stop`` event) or gone: a sweep process killed
    alone (SIGKILL, or SIGTERM to it only) leaves its workers behind otherwise, an idle one waiting for work forever.
    A run in progress is stopped as SIGTERM stops it (after its current step, with a checkpoint written: the same
    sweep command resumes it); queued runs are not started; an orphaned worker then exits."""
    while os.getppid() == sweep_pid and not stop.wait(poll):
        pass
    with _worker_lock:
        stop.set()  # an orphan sets it itself: no queued run starts
        busy = _worker["busy"]
    if busy:
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler turns it into a stop after the current step
        deadline = time.monotonic() + grace  # a stop is honoured between steps: allow for an evaluation phase
        while _worker["busy"] and time.monotonic() < deadline:
            time.sleep(poll)
    if os.getppid() != sweep_pid:
        os._exit(1)


def _run_logged(cmd: list[str], log_path: str) -> tuple[int, float] | None:
    """One ``debias`` command in this worker process, its output (and any traceback) in ``log_path``; None when the
    sweep is stopping (the run is not started)."""
    with _worker_lock:
        if _worker["stop"].is_set():
            return None
        _worker["busy"] = True
    ts = time.perf_counter()
    try:
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            # appended, one header per attempt: a resumed run's log keeps why the earlier attempts stopped
            print(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} debias {' '.join(cmd)}", flush=True)
            try:
                code = debias_main(cmd)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # a crash fails this run only; the traceback is in its log
                traceback.print_exc()
                code = 1
    finally:
        with _worker_lock:
            _worker["busy"] = False
    return code, time.perf_counter() - ts


def _run_parallel(todo: list[tuple[Path, list[str]]], jobs: int, logs: Path, drop: bool = False) -> list[str]:
    """Run ``debias`` commands on ``jobs`` worker processes, each with its share of the cores. Ctrl-C (or SIGINT to
    the sweep) stops the runs in progress after their current step, starts no other and raises KeyboardInterrupt."""
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the workers' OpenMP at start
    failed = []
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, os.getpid(), stop)) as pool:
        futures = {pool.submit(_run_logged, cmd, str(logs / f"{d.name}.log")): d for d, cmd in todo}
        try:
            for future in as_completed(futures):
                d = futures[future]
                try:
                    result = future.result()
                    if result is None:  # not started: the sweep is stopping
                        continue
                    code, seconds = result
                except Exception as exc:  # the worker itself died (killed, out of memory): the pool is gone
                    code, seconds = 1, 0.0
                    print(f"{d.name}: worker process failed ({type(exc).__name__}: {exc})", file=sys.stderr)
                print(f"{d.name}: exit {code} in {seconds:.0f} s"
                      + ("" if code == 0 else f" (log: {logs / d.name}.log)"), flush=True)
                if code != 0:
                    failed.append(d.name)
                elif drop:
                    drop_training_state(d)
        except KeyboardInterrupt:
            stop.set()
            print(STOP_MESSAGE, file=sys.stderr, flush=True)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/colored_digits.toml")
    p.add_argument("--methods", nargs="+", default=ALL_METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bias", type=float, nargs="+", default=None,
                   help="data.bias values (default 1.0); not for a folder dataset, whose images fix their own bias")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1, in this process)")
    p.add_argument("--keep-training-state", action="store_true",
                   help="keep each finished run's checkpoint.pt (its resume state, the largest file; deleted by default)")
    p.add_argument("--drop-training-state", action="store_true",
                   help="also delete the checkpoint.pt of finished runs kept by older versions (the default otherwise)")
    p.add_argument("--goal", nargs="+", default=[], metavar="SPLIT=MIN", help="passed to the compare (debias compare)")
    p.add_argument("--reference", metavar="SETTING", help="passed to the compare (debias compare)")
    args = p.parse_args(argv)
    try:
        goal = parse_goal(args.goal)  # a bad goal is named now, not after the runs
    except DebiasError as e:
        p.error(str(e))
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: expected at least 1 run at a time")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {str(out)!r}: exists and is not a directory")
    try:
        data_name = load_recipe(args.recipe, args.overrides).data.name
    except DebiasError as e:
        p.error(str(e))
    fixed_bias = "bias" not in dataset(data_name).SETTING_KEYS  # a folder dataset's images fix their own bias
    if fixed_bias and args.bias is not None:
        p.error(f"--bias {' '.join(map(str, args.bias))}: {args.recipe} is a {data_name} dataset (data.name = "
                f"'{data_name}'), whose images fix the bias; data.bias is not read, so drop --bias")
    runs, todo, t0 = [], [], time.perf_counter()
    for bias in [None] if fixed_bias else (args.bias or [1.0]):
        for method in args.methods:
            for seed in args.seeds:
                d = run_dir(out, method, bias, seed)
                if d in runs:  # --seeds 0 0, --bias 1 1.0: one run directory, counted once
                    continue
                runs.append(d)
                name, _, source = method.partition(":")
                sets = args.overrides + [f"seed={seed}"] + ([] if bias is None else [f"data.bias={bias}"])
                if source:
                    sets.append(f"concept.source={source}")
                try:  # every run's recipe is checked before the first run starts
                    recipe = load_recipe(args.recipe, sets + [f"train.method={name}"])
                    if (d / "done").exists():  # a finished run of another recipe (other --set) is not this sweep's
                        require_same_recipe(d, recipe, "its run directory")
                except DebiasError as e:
                    p.error(f"{d.name}: {e}")
                if (d / "done").exists():
                    print(f"skip {d} (done)")
                    continue
                todo.append((d, ["train", args.recipe, "--method", name, "--out", str(d), "--no-progress",
                                 *(["--keep-training-state"] if args.keep_training_state else []), "--set", *sets]))
    if args.jobs <= 1:
        for d, cmd in todo:
            ts = time.perf_counter()
            code = debias_main(cmd)
            print(f"{d.name}: exit {code} in {time.perf_counter() - ts:.0f} s", flush=True)
            if code in STOPPED:
                print(STOP_MESSAGE, file=sys.stderr, flush=True)
            if code != 0:
                return code  # 130 / 143 for a stop: the signal's own code
            if args.drop_training_state:
                drop_training_state(d)
    else:
        try:
            failed = _run_parallel(todo, args.jobs, out / "logs", args.drop_training_state)
        except KeyboardInterrupt:
            return 130
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}; no compare written", file=sys.stderr)
            return 1
    print(f"sweep wall time {time.perf_counter() - t0:.0f} s for {len(runs)} runs")
    try:
        compare_runs(runs, out / "compare", reference=args.reference, goal=goal)
    except DebiasError as e:
        print(f"sweep: the runs finished, the compare did not: {e}; compare them again with `debias compare "
              f"{out}/*_seed* --out {out / 'compare'}` and other options", file=sys.stderr)
        return 2
    print((out / "compare" / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
