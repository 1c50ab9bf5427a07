"""The function a submitit job runs: one ``debias train`` command, its output appended to a log file.

It lives in the package (not in ``tools/``) so that a job process, on a SLURM node or under submitit's local
executor, imports it by name.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback


def _stop_run(signum, frame) -> None:
    """submitit's warning signal (SIGUSR2: a time limit near, or preemption) turned into the SIGTERM the trainer
    stops on: after its current step, with a checkpoint written (exit 143). Without this, submitit's own handler
    raises inside the training step and the run keeps only its last epoch's checkpoint."""
    os.kill(os.getpid(), signal.SIGTERM)


def train_job(cmd: list[str], log_path: str) -> int:
    """Run ``debias <cmd>`` in this process, stdout and stderr appended to ``log_path`` under a header line (a
    resumed run's log keeps its earlier attempts); returns the exit code (130 / 143: stopped by a signal with a
    checkpoint written, resumed by submitting the same command again). SIGUSR2, submitit's warning before a time
    limit or a preemption, stops the run as SIGTERM does."""
    from ..cli import main

    previous = signal.signal(signal.SIGUSR2, _stop_run)
    try:
        return _logged(main, cmd, log_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _logged(main, cmd: list[str], log_path: str) -> int:
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} debias {' '.join(cmd)}", flush=True)
        try:
            return main(cmd)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except Exception:  # the traceback goes to the run's log; the benchmark names the run
            traceback.print_exc()
            return 1
