"""User-facing errors: what was wrong, where, and what to do. The CLI turns them into exit 2."""


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
