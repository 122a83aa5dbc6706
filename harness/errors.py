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
