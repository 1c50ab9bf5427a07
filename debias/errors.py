"""The one exception type users see: a one-line message naming what is wrong, where, and what was expected."""
from __future__ import annotations

import difflib
import signal
from typing import Iterable


class DebiasError(Exception):
    """A user-facing error (bad recipe, missing file, bad checkpoint). The CLI prints it on one line, exit code 2."""


class RecipeError(DebiasError):
    """A recipe key, value or override is invalid."""


class TrainingInterrupted(DebiasError):
    """SIGINT/SIGTERM: the run stopped after a step, with a checkpoint written. ``exit_code`` is the shell's for
    that signal (130 for SIGINT, 143 for SIGTERM), so a caller tells a stopped run from bad input (exit 2)."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.exit_code = 128 + signal.Signals[signal_name].value


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean ...?)' suffix listing the nearest valid names, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
