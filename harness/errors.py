"""User-facing errors: what was wrong, where, and what to do. The CLI turns them into exit 2."""

import shlex
from pathlib import Path


class HarnessError(Exception):
    """An error caused by input the user can fix (config, suite, model, paths). Exit code 2."""

    exit_code = 2


class ConfigError(HarnessError):
    """An invalid experiment configuration (file, key, problem)."""


class SuiteError(HarnessError):
    """An invalid or missing task suite."""


class ModelUnavailableError(HarnessError):
    """A model that cannot be loaded here (offline, missing, gated)."""


class CapacityError(HarnessError):
    """A mask allocation that cannot fit the requested sequence."""


class TrackingError(HarnessError):
    """A tracking store that cannot be reached or written."""


class DiskFullError(HarnessError):
    """No space left where a file that matters was being written (nothing was committed half-way)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run, with the folder `harness resume` continues (the CLI prints the command)."""

    def __init__(self, why: str, resume_dir=None):
        super().__init__(why)
        self.why, self.resume_dir = why, resume_dir
        self.experiment_dir = None  # set when the experiment has other sequences too


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when below it, quoted for the shell."""
    path = Path(path).resolve()
    try:
        path = path.relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return shlex.quote(str(path))


def interrupted_message(exc: KeyboardInterrupt) -> str:
    """What was kept and the exact command that continues: the sequence's folder (and the experiment's, if it has more)."""
    why = getattr(exc, "why", None) or str(exc) or "Ctrl-C"
    where = getattr(exc, "resume_dir", None)
    if where is None:
        return f"interrupted ({why}): finished stages are kept; run the same command again to continue (finished work is skipped)"
    msg = f"interrupted ({why}): finished stages are kept; continue with `harness resume {_shown(where)}`"
    if getattr(exc, "experiment_dir", None) is not None:
        msg += f" (every sequence of the experiment: `harness resume {_shown(exc.experiment_dir)}`)"
    return msg
