"""Task suites: named sequences of continual-learning tasks, their data and their lm-eval tasks.

The suite format is documented in :mod:`harness.suites.schema`. This package re-exports the
names the rest of the harness uses; ``_Subsample`` / ``_LocalDataset`` are here because
lm-eval configs show them as ``harness.suites._Subsample(...)``.
"""

from harness.suites.data import read_records, template_fields
from harness.suites.lm_eval_configs import _LocalDataset, _Subsample, format_to_jinja
from harness.suites.loading import list_suites, load_suite
from harness.suites.locations import SUITE_FILE, suites_dir
from harness.suites.schema import Budget, HFSource, Sizes, Suite, TaskBudget, TaskSpec, TrainSource
from harness.suites.validation import validate_suite

__all__ = [
    "SUITE_FILE",
    "Budget",
    "HFSource",
    "Sizes",
    "Suite",
    "TaskBudget",
    "TaskSpec",
    "TrainSource",
    "_LocalDataset",
    "_Subsample",
    "format_to_jinja",
    "list_suites",
    "load_suite",
    "read_records",
    "suites_dir",
    "template_fields",
    "validate_suite",
]
