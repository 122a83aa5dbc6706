"""lm-eval task configs generated from a suite: the task YAML plus what suite.yaml says.

``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` are Jinja translations of the suite's
``prompt`` / ``target`` / ``choices`` over the raw dataset row, so evaluation sees byte-for-byte the
prompt that training used. Local test files are read with the suite's own reader
(:class:`_LocalDataset`); hub test splits can be sampled (:class:`_Subsample`).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import string
from collections import Counter
from pathlib import Path

from harness.errors import SuiteError
from harness.suites.data import FIXED_DATA_SEED, read_lm_eval_yaml, read_records, test_file
from harness.suites.refusal import RefusalScore

# `task` arguments are harness.suites.schema.TaskSpec objects; schema imports this module (TaskSpec's methods
# delegate here), so the name is only written in annotations, never imported (no import cycle).

# suite kind -> lm-eval output_type
OUTPUT_TYPE = {"multiple_choice": "multiple_choice", "generate": "generate_until"}


# ============================================================================ lm-eval's task manager
def task_manager(include_path: str | None = None, *, include_defaults: bool = False):
    """lm-eval's TaskManager (no built-in tasks unless asked: indexing them costs ~11 s), with each Jinja template
    compiled once. Every lm-eval task of the harness is loaded through here.

    lm-eval compiles a template for every document and field it renders (lm_eval.utils.apply_template calls
    env.from_string each time; EleutherAI/lm-evaluation-harness#1286, open): ~2.5 ms a call, 4.3 s of a tiny model's
    5.3 s of evaluation over a 3-stage smoke sequence. The same environment's template, compiled once per template
    string, renders the same text (tests/test_suites.py)."""
    from lm_eval import utils  # lazy: lm-eval loads in ~0.6 s; config checks and --help need none of it
    from lm_eval.tasks import TaskManager  # lazy: as above

    if not getattr(utils.apply_template, "compiled_once", False):
        compiled: dict[str, object] = {}

        def apply_template(template: str, doc: dict) -> str:
            if template not in compiled:
                compiled[template] = utils.env.from_string(template)
            return compiled[template].render(**doc)

        apply_template.compiled_once = True
        utils.apply_template = apply_template
    return TaskManager(include_defaults=include_defaults, include_path=include_path)


# ============================================================================ templates
def _jinja_literal(text: str) -> str:
    # Only "{{", "{%" and "{#" open Jinja syntax: emitting every literal "{" as an expression
    # keeps literal text literal, however the format parser split it.
    return text.replace("{", '{{ "{" }}')


def format_to_jinja(template: str, columns: dict[str, str]) -> str:
    """The Jinja template (lm-eval's doc_to_text syntax) that renders like ``template.format`` over the mapped record.

    It reads the raw dataset row: a field goes through ``columns`` to its column."""
    out = []
    for lit, field, _spec, _conv in string.Formatter().parse(template):
        out.append(_jinja_literal(lit))
        if field is not None:
            out.append("{{ " + columns.get(field, field) + " }}")
    return "".join(out)


def choice_completions(task: "TaskSpec") -> list[str]:
    """multiple_choice: each choice rendered through `target` (what lm-eval scores)."""
    assert task.choices is not None
    return [task.target.format(answer=c) for c in task.choices]


# ============================================================================ lm-eval callables
class _Subsample:
    """lm-eval process_docs for hub suites: a seeded sample of the test documents.

    At most ``per_class`` per label (``label_column``) and at most ``n`` in all."""

    def __init__(
        self, n: int | None, per_class: int | None = None, label_column: str = "label", seed: int = FIXED_DATA_SEED
    ):
        self.n, self.per_class, self.label_column, self.seed = n, per_class, label_column, seed

    def __call__(self, dataset):
        order = list(range(len(dataset)))
        random.Random(self.seed).shuffle(order)
        if self.per_class is not None:
            labels = dataset[self.label_column]
            taken: Counter = Counter()
            keep = []
            for i in order:
                if taken[labels[i]] < self.per_class:
                    taken[labels[i]] += 1
                    keep.append(i)
            order = keep
        if self.n is not None:
            order = order[: self.n]
        if len(order) == len(dataset):
            return dataset
        return dataset.select(sorted(order))

    def __repr__(self) -> str:
        # lm-eval logs configs with repr: name the class where users import it from
        return (
            f"harness.suites._Subsample(n={self.n}, per_class={self.per_class}, "
            f"label_column={self.label_column!r}, seed={self.seed})"
        )


class _LocalDataset:
    """lm-eval custom_dataset for local test files, read with the same reader as training data.

    Python json/csv keep values' exact text; datasets' own json/csv builders let pyarrow infer
    types and turn e.g. "1966-02-12" into a timestamp ("1966-02-12 00:00:00")."""

    def __init__(self, path: Path, split: str):
        self.path, self.split = Path(path), split

    def __call__(self, **_ignored):
        import datasets  # lazy: HF datasets loads in ~0.5 s; only hub-sourced tasks need it

        return datasets.DatasetDict({self.split: datasets.Dataset.from_list(read_records(self.path))})

    def __repr__(self) -> str:
        return f"harness.suites._LocalDataset({str(self.path)!r}, split={self.split!r})"


class _RecordsDataset:
    """lm-eval custom_dataset holding given records (a validation split carved from the training data)."""

    def __init__(self, records: list[dict], split: str):
        self.records, self.split = records, split

    def __call__(self, **_ignored):
        import datasets  # lazy: HF datasets loads in ~0.5 s; only hub-sourced tasks need it

        return datasets.DatasetDict({self.split: datasets.Dataset.from_list(self.records)})

    def __repr__(self) -> str:
        return f"harness.suites._RecordsDataset({len(self.records)} records, split={self.split!r})"


class _DropCustomDatasetHint(logging.Filter):
    """Drops lm-eval's per-task hint that custom_dataset kwargs can go via --metadata: noise for our test files."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def _quiet_custom_dataset_hint() -> None:
    lg = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropCustomDatasetHint) for f in lg.filters):
        lg.addFilter(_DropCustomDatasetHint())


# ============================================================================ configs
def metric_key(task: "TaskSpec") -> str:
    """The key of the primary metric in lm-eval's results[task], e.g. "acc,none"."""
    if "," in task.metric:
        return task.metric
    try:
        filters = read_lm_eval_yaml(task).get("filter_list") or []
    except SuiteError:
        filters = []  # a broken YAML is reported where the config is built; the key is still knowable
    if not filters:
        return f"{task.metric},none"
    if len(filters) == 1 and isinstance(filters[0], dict) and "name" in filters[0]:
        return f"{task.metric},{filters[0]['name']}"
    raise SuiteError(
        f"{task.where}.metric: {task.lm_eval} has {len(filters)} filters; "
        f"write the metric key in full, e.g. {task.metric},<filter name>"
    )


def _doc_to_target(task: "TaskSpec") -> str:
    if task.kind == "multiple_choice":
        lab = task.label_column
        # the record's label is a choice name or an int index (CSV: as text)
        return (
            "{% set c = " + json.dumps(task.choices, ensure_ascii=False) + " %}"
            "{{ c.index(" + lab + ") if " + lab + " in c else " + lab + " | int }}"
        )
    # gold = the rendered target without surrounding whitespace / stop string; the
    # generation is compared after the YAML's strip filter.
    return "{% filter trim %}" + format_to_jinja(task.target, task.train.columns) + "{% endfilter %}"


def _add_rendering(task: "TaskSpec", cfg: dict) -> None:
    """Fill doc_to_text / doc_to_choice / target_delimiter / doc_to_target where the YAML leaves them out."""
    if "doc_to_text" not in cfg:
        cfg["doc_to_text"] = format_to_jinja(task.prompt, task.train.columns)
    if task.kind == "multiple_choice" and "doc_to_choice" not in cfg:
        cfg["doc_to_choice"] = choice_completions(task)
    if "target_delimiter" not in cfg:
        cfg["target_delimiter"] = ""  # the suite's targets carry their own leading space
    if "doc_to_target" not in cfg:
        cfg["doc_to_target"] = _doc_to_target(task)


def _absolute_data_files(cfg: dict, base: Path) -> None:
    """Make a local dataset's data_files absolute (they are written relative to the YAML)."""
    kw = cfg.get("dataset_kwargs") or {}
    files = kw.get("data_files")

    def absolute(f):
        if isinstance(f, list):
            return [absolute(x) for x in f]
        return str((base / f).resolve()) if isinstance(f, str) and not Path(f).is_absolute() else f

    if isinstance(files, dict):
        kw["data_files"] = {k: absolute(v) for k, v in files.items()}
    elif files is not None:
        kw["data_files"] = absolute(files)
    cfg["dataset_kwargs"] = kw


def _set_test_data(task: "TaskSpec", cfg: dict) -> None:
    """Point the config at its test documents: an override file, the YAML's local files, or a hub sample."""
    if task._test_override is not None:
        split = cfg.get("test_split") or "test"
        cfg["test_split"] = split
        cfg["dataset_path"] = "csv" if task._test_override.suffix.lower() == ".csv" else "json"
        cfg.pop("dataset_name", None)
        cfg["dataset_kwargs"] = {"data_files": {split: str(task._test_override)}}
        for k in ("validation_split", "training_split", "fewshot_split"):
            cfg.pop(k, None)
    elif cfg.get("dataset_path") in ("json", "csv"):
        _absolute_data_files(cfg, task.lm_eval_path.parent)
    local = test_file(task)
    if local is not None and "custom_dataset" not in cfg:
        cfg["custom_dataset"] = _LocalDataset(local, cfg.get("test_split") or "test")
        _quiet_custom_dataset_hint()
    if (task.test_limit or task.test_per_class) and task._test_override is None and "process_docs" not in cfg:
        cfg["process_docs"] = _Subsample(task.test_limit, task.test_per_class, task.label_column)


def _add_builtin_metric(task: "TaskSpec", cfg: dict) -> None:
    """`metric: refusal_rate` (harness/suites/refusal.py): the harness's own per-document scorer and its aggregation."""
    if task.metric.partition(",")[0] == "refusal_rate":
        cfg["process_results"] = RefusalScore()
        cfg["metric_list"] = [{"metric": "refusal_rate", "aggregation": "mean", "higher_is_better": True}]


def lm_eval_config(task: "TaskSpec") -> dict:
    """The fully resolved lm-eval task config dict (task: '<suite>__<task>'); see harness.suites.schema."""
    cfg = copy.deepcopy(read_lm_eval_yaml(task))
    cfg["task"] = task.lm_eval_name
    if "task_alias" not in cfg:
        cfg["task_alias"] = task.name
    _add_rendering(task, cfg)
    _add_builtin_metric(task, cfg)
    cfg.setdefault("metadata", {})
    if isinstance(cfg["metadata"], dict):
        cfg["metadata"].setdefault("version", 1.0)
    _set_test_data(task, cfg)
    return cfg


def lm_eval_validation_config(task: "TaskSpec") -> dict | None:
    """The task's lm-eval config with its validation records as the documents (same rendering and metric), or None.

    The task name gets a "__validation" suffix, so its results never mix with the test split's."""
    if task.validation is None:
        return None
    cfg = copy.deepcopy(read_lm_eval_yaml(task))
    cfg["task"] = f"{task.lm_eval_name}__validation"
    cfg["task_alias"] = f"{task.name} (validation)"
    _add_rendering(task, cfg)
    _add_builtin_metric(task, cfg)
    cfg.setdefault("metadata", {})
    if isinstance(cfg["metadata"], dict):
        cfg["metadata"].setdefault("version", 1.0)
    for k in ("validation_split", "training_split", "fewshot_split", "process_docs", "dataset_name"):
        cfg.pop(k, None)
    cfg["test_split"] = "validation"
    cfg["dataset_path"] = "json"
    cfg["dataset_kwargs"] = {}
    cfg["custom_dataset"] = _RecordsDataset(task.validation_records(), "validation")
    _quiet_custom_dataset_hint()
    return cfg
