"""Task suites: a named sequence of tasks for continual learning, their data and their lm-eval tasks.

A suite is a folder ``task_suites/<name>/`` holding ``suite.yaml``, one lm-eval task YAML per task,
and (for local suites) the data files. ``load_suite("default")`` finds it; a path to the folder or
to its ``suite.yaml`` works too. ``HARNESS_SUITES_DIR`` replaces the folder that names resolve in.

suite.yaml
==========
Every key, with its meaning (``yaml.safe_load`` only: no ``!function`` or other tags)::

    name: default                 # [a-z0-9_-]+ ; prefixes the lm-eval task names (<suite>__<task>)
    description: >                # one paragraph: what the tasks are, where the data comes from
      ...
    recommended_model: smollm2-135m   # optional: the model the suite was calibrated for
    budget:                       # recommended training budget per task (a task's own `budget:`
      epochs: 2                   #   overrides single keys). epochs > 0 (may be fractional)
      batch_size: 8               #   >= 1
      max_seq_len: 96             #   optional: truncate prompt+completion to this many tokens
      lr: {lora: 1.0e-3, lori-s: 1.0e-2}   # optional: recommended learning rate per method
    orders:                       # one or more task orders (lists of task names); order 0 is the
      - [a, b, c, d]              #   default; an order may use a subset, never a name twice
    tasks:
      - name: a                   # [a-z0-9_]+ , unique in the suite
        description: ...          # optional, one line
        kind: multiple_choice     # multiple_choice (scored by log-likelihood of each choice) or
                                  #   generate (greedy generation, exact match)
        train:                    # where training examples come from: exactly one of path / hf
          path: data/a.train.jsonl      # JSONL (one object per line) or CSV with a header row,
                                        #   relative to the suite folder
          hf: {path: fancyzhx/dbpedia_14, name: null, split: train, revision: null}
                                        # a Hugging Face dataset (needs the hub; `datasets`)
          columns: {text: content}      # optional: template field -> source column. Fields not
                                        #   listed are read from the column of the same name;
                                        #   `label` (multiple_choice) and `answer` (generate)
                                        #   may be mapped the same way.
          per_class: 1000               # optional (multiple_choice): keep at most this many
                                        #   examples per label (seeded, stratified)
          limit: 1000                   # optional: keep at most this many examples: the first N
                                        #   after a shuffle with a fixed seed (0): the same
                                        #   examples for every run of the suite
        prompt: "Review: {text}\\nStars:"   # str.format template over the (mapped) record; only
                                        #   plain fields ({name}), no format specs/conversions
        target: " {answer}"             # completion template. multiple_choice: {answer} is the
                                        #   label's choice name (the only field allowed); generate:
                                        #   any record fields, {answer} is the record's answer.
                                        #   Training sees exactly prompt + target; end a generate
                                        #   target with the stop string (" {answer}\\n") so the
                                        #   trained model stops there.
        choices: [positive, negative]   # multiple_choice: the label names, in index order. A
                                        #   record's `label` is an int index, a choice name, or
                                        #   (CSV) a string holding an int index.
        lm_eval: a.yaml                 # the lm-eval task YAML, beside suite.yaml (see below)
        metric: acc                     # the primary metric in lm-eval's results; the filter is
                                        #   added for you ("acc" -> "acc,none"; "exact_match" with
                                        #   one filter named strip -> "exact_match,strip"), or
                                        #   give it in full: "exact_match,strip"
        sizes: {train: 300, test: 100}  # example counts. Local data: checked against the files
                                        #   (train after per_class/limit). Hub data: what
                                        #   per_class/limit/test_limit yield (informational).
        test_limit: 5000                # optional, hub suites: evaluate a seeded sample of at
        test_per_class: 500             #   most this many test documents (in all / per label)
                                        #   instead of the whole split (lm-eval process_docs)
        budget: {epochs: 3}             # optional: overrides of the suite budget for this task

The lm-eval task YAML
=====================
A normal lm-eval (0.4.13) task config *without* ``task:`` (set to ``<suite>__<task>``) and, usually,
without ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` / ``target_delimiter``: those are
generated from ``prompt`` / ``target`` / ``choices`` (as Jinja over the raw dataset row, the
``columns`` mapping applied), so evaluation sees byte-for-byte the prompt that training used.
If the YAML sets them itself, ``validate_suite`` checks on every test document that lm-eval
renders the same prompt and gold answer as the suite. It must give the data (``dataset_path:
json`` + ``dataset_kwargs: {data_files: {test: data/a.test.jsonl}}`` with paths relative to the
YAML, made absolute for you; or a hub id for hub suites), ``test_split``, ``output_type``
(``multiple_choice`` for kind multiple_choice, ``generate_until`` for generate) and
``metric_list``. Generate tasks should strip the leading space of the answer with a filter::

    generation_kwargs: {until: ["\\n"], max_gen_toks: 8, do_sample: false}
    filter_list: [{name: strip, filter: [{function: remove_whitespace}, {function: take_first}]}]
    metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]

Local data overrides (hub suites without the hub)
=================================================
``load_suite(name, data_overrides=...)`` or the environment variable ``HARNESS_DATA_OVERRIDES``
replace a task's data with local files of the same schema (same columns, same label encoding):
either a folder holding ``<task>.train.jsonl`` / ``<task>.test.jsonl`` (or ``.csv``; a task with
no file there keeps its source), or a mapping ``{task: {"train": path, "test": path}}`` (a bare
path means train only). An overridden test file turns that task's lm-eval config into a local
``json``/``csv`` dataset, so the whole suite validates and runs offline.

Python API
==========
``load_suite(name_or_path, data_overrides=None) -> Suite``, ``validate_suite(name_or_path,
data_overrides=None) -> Suite``, ``list_suites() -> list[dict]``; ``Suite.task(name)``,
``Suite.lm_eval_task_configs() -> {task: lm-eval config dict}`` (pass the dicts to
``lm_eval.simple_evaluate(tasks=[...], task_manager=TaskManager(include_defaults=False))``),
``TaskSpec.train_examples(limit=None, seed=0) -> [{"prompt", "completion"}]``,
``TaskSpec.metric_key``, ``TaskSpec.budget_for(suite) -> Budget``.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from harness.errors import SuiteError

log = logging.getLogger(__name__)

SUITE_FILE = "suite.yaml"
TASK_NAME_RE = re.compile(r"^[a-z0-9_]+$")
SUITE_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
DATA_EXTS = (".jsonl", ".csv")
FIXED_DATA_SEED = 0  # per_class / limit selection: the same examples for every run of a suite
_OUTPUT_TYPE = {"multiple_choice": "multiple_choice", "generate": "generate_until"}
_GENERATED_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter")


# ============================================================================ locations
def suites_dir() -> Path:
    """Folder that suite names resolve in: $HARNESS_SUITES_DIR, else <repo>/task_suites."""
    env = os.environ.get("HARNESS_SUITES_DIR")
    if env:
        return Path(env).expanduser().resolve()
    import harness

    return Path(harness.__file__).resolve().parent.parent / "task_suites"


def _display(path: Path) -> str:
    """A path as short as possible for messages (relative to the cwd when inside it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _resolve_suite_file(name_or_path: str | Path) -> Path:
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        if (p / SUITE_FILE).is_file():
            return (p / SUITE_FILE).resolve()
        raise SuiteError(f"{_display(p)}: no {SUITE_FILE} in this folder")
    name = str(name_or_path)
    if SUITE_NAME_RE.match(name):
        cand = suites_dir() / name / SUITE_FILE
        if cand.is_file():
            return cand.resolve()
    known = ", ".join(sorted(d.name for d in suites_dir().glob("*") if (d / SUITE_FILE).is_file())) or "none"
    raise SuiteError(f"suite {name!r}: not a suite name in {_display(suites_dir())} (known: {known}) "
                     f"nor a path to a suite folder or {SUITE_FILE}")


# ============================================================================ templates
def template_fields(template: str) -> list[str]:
    """Field names of a str.format template; raises ValueError for anything but plain {name}."""
    fields = []
    for _lit, field, spec, conv in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier():
            raise ValueError(f"template field {{{field}}}: use plain names like {{text}} (no index, attribute or positional fields)")
        if spec or conv:
            raise ValueError(f"template field {{{field}}}: format specs and conversions are not supported")
        fields.append(field)
    return fields


def _jinja_literal(text: str) -> str:
    # Only "{{", "{%" and "{#" open Jinja syntax: emitting every literal "{" as an expression
    # keeps literal text literal, however the format parser split it.
    return text.replace("{", '{{ "{" }}')


def format_to_jinja(template: str, columns: dict[str, str]) -> str:
    """The Jinja template (lm-eval's doc_to_text syntax) that renders like ``template.format``
    over the mapped record, reading the raw dataset row."""
    out = []
    for lit, field, _spec, _conv in string.Formatter().parse(template):
        out.append(_jinja_literal(lit))
        if field is not None:
            out.append("{{ " + columns.get(field, field) + " }}")
    return "".join(out)


class _Subsample:
    """lm-eval process_docs for hub suites: a seeded sample of the test documents, at most
    ``per_class`` per label (``label_column``) and at most ``n`` in all."""

    def __init__(self, n: int | None, per_class: int | None = None, label_column: str = "label",
                 seed: int = FIXED_DATA_SEED):
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
        return (f"harness.suites._Subsample(n={self.n}, per_class={self.per_class}, "
                f"label_column={self.label_column!r}, seed={self.seed})")


class _LocalDataset:
    """lm-eval custom_dataset for local test files: read with the same reader as training data
    (Python json/csv), so values keep their exact text. datasets' own json/csv builders let
    pyarrow infer types and turn e.g. "1966-02-12" into a timestamp ("1966-02-12 00:00:00")."""

    def __init__(self, path: Path, split: str):
        self.path, self.split = Path(path), split

    def __call__(self, **_ignored):
        import datasets

        return datasets.DatasetDict({self.split: datasets.Dataset.from_list(read_records(self.path))})

    def __repr__(self) -> str:
        return f"harness.suites._LocalDataset({str(self.path)!r}, split={self.split!r})"


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval warns on every task with a custom_dataset that kwargs can be passed via --metadata;
    for our local test files that is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def _quiet_custom_dataset_hint() -> None:
    lg = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropCustomDatasetHint) for f in lg.filters):
        lg.addFilter(_DropCustomDatasetHint())


# ============================================================================ data files
def read_records(path: Path) -> list[dict]:
    """Rows of a JSONL or CSV file as dicts; ValueError naming the line on a bad row."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or suffix == ".json":
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {i}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"line {i}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return [dict(r) for r in csv.DictReader(f)]
    raise ValueError(f"unsupported data file type {suffix!r} (use .jsonl or .csv)")


def _stratified(records: list[dict], label_col: str, per_class: int, seed: int) -> list[dict]:
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    taken: Counter = Counter()
    keep = []
    for i in idx:
        lab = records[i].get(label_col)
        if taken[lab] < per_class:
            taken[lab] += 1
            keep.append(i)
    return [records[i] for i in sorted(keep)]


def _first_after_shuffle(records: list, n: int, seed: int) -> list:
    if n >= len(records):
        return list(records)
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    return [records[i] for i in idx[:n]]


# ============================================================================ models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    """Recommended training budget per task."""

    epochs: float = Field(2, gt=0)
    batch_size: int = Field(8, ge=1)
    max_seq_len: int | None = Field(None, ge=8)
    lr: dict[str, float] = Field(default_factory=dict)


class TaskBudget(_Strict):
    """A task's overrides of the suite budget (every key optional)."""

    epochs: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=8)
    lr: dict[str, float] | None = None


class HFSource(_Strict):
    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None


class TrainSource(_Strict):
    path: str | None = None
    hf: HFSource | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    per_class: int | None = Field(None, ge=1)
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> TrainSource:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of `path` (local file) or `hf` (hub dataset)")
        if self.path is not None and not self.path.lower().endswith(DATA_EXTS):
            raise ValueError(f"path {self.path!r}: use a .jsonl or .csv file")
        for k, v in self.columns.items():
            if not k.isidentifier() or not str(v).isidentifier():
                raise ValueError(f"columns: {k}: {v}: field and column names must be identifiers")
        return self


class Sizes(_Strict):
    train: int = Field(ge=1)
    test: int = Field(ge=1)


class TaskSpec(_Strict):
    """One task of a suite: training data, prompt format and its lm-eval task."""

    name: str
    description: str | None = None
    kind: Literal["multiple_choice", "generate"]
    train: TrainSource
    prompt: str
    target: str = " {answer}"
    choices: list[str] | None = None
    lm_eval: str
    metric: str
    sizes: Sizes
    test_limit: int | None = Field(None, ge=1)
    test_per_class: int | None = Field(None, ge=1)
    budget: TaskBudget | None = None

    _suite_dir: Path = PrivateAttr(default=Path("."))
    _suite_name: str = PrivateAttr(default="")
    _suite_file: Path = PrivateAttr(default=Path(SUITE_FILE))
    _index: int = PrivateAttr(default=0)
    _train_override: Path | None = PrivateAttr(default=None)
    _test_override: Path | None = PrivateAttr(default=None)
    _cache: dict = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TASK_NAME_RE.match(v):
            raise ValueError(f"{v!r}: use lowercase letters, digits and _ only")
        return v

    @field_validator("prompt", "target")
    @classmethod
    def _template(cls, v: str) -> str:
        template_fields(v)
        return v

    @model_validator(mode="after")
    def _kind_rules(self) -> TaskSpec:
        if self.kind == "multiple_choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError("choices: a multiple_choice task needs at least 2 choices")
            if len(set(self.choices)) != len(self.choices):
                raise ValueError(f"choices: duplicates in {self.choices}")
            bad = [f for f in template_fields(self.target) if f != "answer"]
            if bad:
                raise ValueError(f"target: a multiple_choice target may only use {{answer}}, not {bad}")
        else:
            if self.choices is not None:
                raise ValueError("choices: only for kind multiple_choice")
            if self.train.per_class is not None or self.test_per_class is not None:
                raise ValueError("per_class / test_per_class: only for kind multiple_choice")
        return self

    # --- identity --------------------------------------------------------------------------
    @property
    def where(self) -> str:
        return f"{_display(self._suite_file)}: tasks[{self._index}]"

    @property
    def lm_eval_name(self) -> str:
        return f"{self._suite_name}__{self.name}"

    @property
    def lm_eval_path(self) -> Path:
        return (self._suite_dir / self.lm_eval).resolve()

    @property
    def is_hub(self) -> bool:
        return self.train.hf is not None and self._train_override is None

    @property
    def label_column(self) -> str:
        return self.train.columns.get("label", "label")

    @property
    def answer_column(self) -> str:
        return self.train.columns.get("answer", "answer")

    def budget_for(self, suite: Suite) -> Budget:
        """The suite budget with this task's overrides applied."""
        if self.budget is None:
            return suite.budget
        over = {k: v for k, v in self.budget.model_dump().items() if v is not None}
        return suite.budget.model_copy(update=over)

    # --- rendering -------------------------------------------------------------------------
    def label_index(self, value: Any) -> int:
        """Index into choices of a record's label (int index, choice name or int string)."""
        assert self.choices is not None
        if isinstance(value, bool):
            raise ValueError(f"label {value!r}: not an index or a choice name")
        if isinstance(value, int):
            if 0 <= value < len(self.choices):
                return value
            raise ValueError(f"label {value}: index out of range for {len(self.choices)} choices")
        if isinstance(value, str):
            if value in self.choices:
                return self.choices.index(value)
            if re.fullmatch(r"-?\d+", value.strip()):
                return self.label_index(int(value))
        raise ValueError(f"label {value!r}: not in choices {self.choices}")

    def _field(self, record: dict, field: str) -> Any:
        col = self.train.columns.get(field, field)
        if col not in record:
            raise ValueError(f"record has no column {col!r}" + (f" (field {field!r})" if col != field else "")
                             + f"; columns: {sorted(record)}")
        return record[col]

    def render(self, record: dict) -> dict[str, str]:
        """{"prompt", "completion"} of one raw record (columns mapping applied)."""
        values = {f: self._field(record, f) for f in template_fields(self.prompt)}
        prompt = self.prompt.format(**values)
        if self.kind == "multiple_choice":
            answer = self.choices[self.label_index(self._field(record, "label"))]
            completion = self.target.format(answer=answer)
        else:
            tv = {f: self._field(record, f) for f in template_fields(self.target)}
            completion = self.target.format(**tv)
        return {"prompt": prompt, "completion": completion}

    def choice_completions(self) -> list[str]:
        """multiple_choice: each choice rendered through `target` (what lm-eval scores)."""
        assert self.choices is not None
        return [self.target.format(answer=c) for c in self.choices]

    # --- data --------------------------------------------------------------------------------
    def train_file(self) -> Path | None:
        if self._train_override is not None:
            return self._train_override
        if self.train.path is not None:
            return (self._suite_dir / self.train.path).resolve()
        return None

    def _raw_train_records(self) -> list[dict]:
        if "train_raw" in self._cache:
            return self._cache["train_raw"]
        path = self.train_file()
        if path is not None:
            if not path.is_file():
                raise SuiteError(f"{self.where}.train.path: file {path} does not exist")
            try:
                rows = read_records(path)
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise SuiteError(f"{self.where}.train.path: {_display(path)}: {e}") from None
        else:
            rows = self._load_hf_train()
        self._cache["train_raw"] = rows
        return rows

    def _load_hf_train(self) -> list[dict]:
        hf = self.train.hf
        assert hf is not None
        try:
            import datasets

            ds = datasets.load_dataset(hf.path, hf.name, split=hf.split, revision=hf.revision)
        except Exception as e:  # noqa: BLE001 - anything from the hub becomes a suite error
            raise SuiteError(
                f"{self.where}.train.hf: cannot load {hf.path!r} (name={hf.name!r}, split={hf.split!r}) from the "
                f"Hugging Face hub: {type(e).__name__}: {str(e)[:300]}. Hub suites need hub access; offline, point "
                f"HARNESS_DATA_OVERRIDES at a folder of <task>.train.jsonl/<task>.test.jsonl files of the same schema."
            ) from None
        return [dict(r) for r in ds]

    def train_records(self) -> list[dict]:
        """Raw training records after the suite's per_class / limit selection (fixed seed)."""
        if "train" in self._cache:
            return self._cache["train"]
        rows = self._raw_train_records()
        if self.train.per_class is not None:
            rows = _stratified(rows, self.label_column, self.train.per_class, FIXED_DATA_SEED)
        if self.train.limit is not None:
            rows = _first_after_shuffle(rows, self.train.limit, FIXED_DATA_SEED)
        self._cache["train"] = rows
        return rows

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[dict[str, str]]:
        """Training examples [{"prompt": str, "completion": str}] (loss on completion only).

        All of them in file order, or with ``limit`` the first ``limit`` after a shuffle seeded
        with ``seed``."""
        rows = self.train_records()
        if limit is not None:
            rows = _first_after_shuffle(rows, limit, seed)
        out = []
        for i, r in enumerate(rows):
            try:
                out.append(self.render(r))
            except (ValueError, KeyError, IndexError) as e:
                raise SuiteError(f"{self.where}.train: example {i}: {e}") from None
        return out

    def test_file(self) -> Path | None:
        """The local test data file (lm-eval's test split), or None for hub data."""
        if self._test_override is not None:
            return self._test_override
        cfg = self._raw_lm_eval_config()
        if cfg.get("dataset_path") not in ("json", "csv"):
            return None
        split = cfg.get("test_split") or "test"
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            f = files.get(split)
        else:
            f = files
        if isinstance(f, list):
            f = f[0] if len(f) == 1 else None
        if not isinstance(f, str):
            return None
        p = Path(f)
        return p if p.is_absolute() else (self.lm_eval_path.parent / p).resolve()

    def test_records(self) -> list[dict]:
        """Raw records of the local test file (lm-eval's documents); SuiteError for hub data."""
        if "test" in self._cache:
            return self._cache["test"]
        path = self.test_file()
        if path is None:
            raise SuiteError(f"{self.where}: test data is not a local file ({self.lm_eval}: dataset_path "
                             f"{self._raw_lm_eval_config().get('dataset_path')!r})")
        if not path.is_file():
            raise SuiteError(f"{_display(self.lm_eval_path)}: dataset_kwargs.data_files: file {path} does not exist")
        try:
            rows = read_records(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise SuiteError(f"{_display(self.lm_eval_path)}: dataset_kwargs.data_files: {_display(path)}: {e}") from None
        self._cache["test"] = rows
        return rows

    # --- lm-eval -----------------------------------------------------------------------------
    @property
    def metric_key(self) -> str:
        """The key of the primary metric in lm-eval's results[task], e.g. "acc,none"."""
        if "," in self.metric:
            return self.metric
        try:
            filters = self._raw_lm_eval_config().get("filter_list") or []
        except SuiteError:
            filters = []
        if not filters:
            return f"{self.metric},none"
        if len(filters) == 1 and isinstance(filters[0], dict) and "name" in filters[0]:
            return f"{self.metric},{filters[0]['name']}"
        raise SuiteError(f"{self.where}.metric: {self.lm_eval} has {len(filters)} filters; "
                         f"write the metric key in full, e.g. {self.metric},<filter name>")

    def _raw_lm_eval_config(self) -> dict:
        if "lm_eval_raw" in self._cache:
            return self._cache["lm_eval_raw"]
        path = self.lm_eval_path
        if not path.is_file():
            raise SuiteError(f"{self.where}.lm_eval: file {self.lm_eval} does not exist (looked for {path})")
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise SuiteError(f"{_display(path)}: not plain YAML (no !function or other tags; "
                             f"callables are generated from suite.yaml): {e}") from None
        if not isinstance(cfg, dict):
            raise SuiteError(f"{_display(path)}: expected a mapping of lm-eval task config keys")
        for key in ("include", "group", "tag", "task_list", "class"):
            if key in cfg:
                raise SuiteError(f"{_display(path)}: {key}: not supported in a suite task YAML (write the task out in full)")
        self._cache["lm_eval_raw"] = cfg
        return cfg

    def lm_eval_config(self) -> dict:
        """The fully resolved lm-eval task config dict (see the module docstring)."""
        cfg = copy.deepcopy(self._raw_lm_eval_config())
        cfg["task"] = self.lm_eval_name
        if "task_alias" not in cfg:
            cfg["task_alias"] = self.name
        cols = self.train.columns
        if "doc_to_text" not in cfg:
            cfg["doc_to_text"] = format_to_jinja(self.prompt, cols)
        if self.kind == "multiple_choice":
            if "doc_to_choice" not in cfg:
                cfg["doc_to_choice"] = self.choice_completions()
            if "target_delimiter" not in cfg:
                cfg["target_delimiter"] = ""
            if "doc_to_target" not in cfg:
                lab = self.label_column
                cfg["doc_to_target"] = (
                    "{% set c = " + json.dumps(self.choices, ensure_ascii=False) + " %}"
                    "{{ c.index(" + lab + ") if " + lab + " in c else " + lab + " | int }}"
                )
        else:
            if "target_delimiter" not in cfg:
                cfg["target_delimiter"] = ""
            if "doc_to_target" not in cfg:
                # gold = the rendered target without surrounding whitespace / stop string; the
                # generation is compared after the YAML's strip filter.
                cfg["doc_to_target"] = "{% filter trim %}" + format_to_jinja(self.target, cols) + "{% endfilter %}"
        cfg.setdefault("metadata", {})
        if isinstance(cfg["metadata"], dict):
            cfg["metadata"].setdefault("version", 1.0)
        if self._test_override is not None:
            split = cfg.get("test_split") or "test"
            cfg["test_split"] = split
            cfg["dataset_path"] = "csv" if self._test_override.suffix.lower() == ".csv" else "json"
            cfg.pop("dataset_name", None)
            cfg["dataset_kwargs"] = {"data_files": {split: str(self._test_override)}}
            for k in ("validation_split", "training_split", "fewshot_split"):
                cfg.pop(k, None)
        elif cfg.get("dataset_path") in ("json", "csv"):
            kw = cfg.get("dataset_kwargs") or {}
            files = kw.get("data_files")
            base = self.lm_eval_path.parent

            def absolute(f):
                if isinstance(f, list):
                    return [absolute(x) for x in f]
                return str((base / f).resolve()) if isinstance(f, str) and not Path(f).is_absolute() else f

            if isinstance(files, dict):
                kw["data_files"] = {k: absolute(v) for k, v in files.items()}
            elif files is not None:
                kw["data_files"] = absolute(files)
            cfg["dataset_kwargs"] = kw
        test_file = self.test_file()
        if test_file is not None and "custom_dataset" not in cfg:
            cfg["custom_dataset"] = _LocalDataset(test_file, cfg.get("test_split") or "test")
            _quiet_custom_dataset_hint()
        if (self.test_limit or self.test_per_class) and self._test_override is None and "process_docs" not in cfg:
            cfg["process_docs"] = _Subsample(self.test_limit, self.test_per_class, self.label_column)
        return cfg


class Suite(_Strict):
    """A task suite (suite.yaml) with its folder."""

    name: str
    description: str = ""
    recommended_model: str | None = None
    budget: Budget = Field(default_factory=Budget)
    orders: list[list[str]]
    tasks: list[TaskSpec]

    _path: Path = PrivateAttr(default=Path("."))
    _file: Path = PrivateAttr(default=Path(SUITE_FILE))
    _notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SUITE_NAME_RE.match(v):
            raise ValueError(f"{v!r}: use lowercase letters, digits, _ and - only")
        return v

    @field_validator("orders")
    @classmethod
    def _orders_nonempty(cls, v: list[list[str]]) -> list[list[str]]:
        if not v:
            raise ValueError("give at least one task order")
        return v

    @property
    def path(self) -> Path:
        """The suite folder."""
        return self._path

    @property
    def file(self) -> Path:
        return self._file

    @property
    def validation_notes(self) -> list[str]:
        """What validate_suite could not check (hub data), one line each."""
        return self._notes

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SuiteError(f"{_display(self._file)}: no task {name!r} (tasks: {', '.join(self.task_names)})")

    def lm_eval_task_configs(self) -> dict[str, dict]:
        """task name -> resolved lm-eval task config dict (task: '<suite>__<task>')."""
        return {t.name: t.lm_eval_config() for t in self.tasks}

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": " ".join(self.description.split()),
            "recommended_model": self.recommended_model,
            "n_tasks": len(self.tasks),
            "n_orders": len(self.orders),
            "tasks": self.task_names,
            "kinds": {t.name: t.kind for t in self.tasks},
            "train_sizes": {t.name: t.sizes.train for t in self.tasks},
            "test_sizes": {t.name: t.sizes.test for t in self.tasks},
            "hub": any(t.is_hub for t in self.tasks),
            "path": str(self.path),
        }


# ============================================================================ loading
def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _normalise_overrides(data_overrides, task_names: list[str]) -> dict[str, dict[str, Path]]:
    if data_overrides is None:
        env = os.environ.get("HARNESS_DATA_OVERRIDES")
        data_overrides = env if env else None
    if data_overrides is None:
        return {}
    out: dict[str, dict[str, Path]] = {}
    if isinstance(data_overrides, (str, Path)):
        folder = Path(data_overrides).expanduser()
        if not folder.is_dir():
            raise SuiteError(f"data overrides: {folder} is not a folder (expected <task>.train.jsonl / <task>.test.jsonl files)")
        for t in task_names:
            for part in ("train", "test"):
                for ext in DATA_EXTS:
                    f = folder / f"{t}.{part}{ext}"
                    if f.is_file():
                        out.setdefault(t, {})[part] = f.resolve()
                        break
        return out
    if isinstance(data_overrides, dict):
        for t, v in data_overrides.items():
            if t not in task_names:
                raise SuiteError(f"data overrides: no task {t!r} in the suite (tasks: {', '.join(task_names)})")
            if isinstance(v, (str, Path)):
                v = {"train": v}
            if not isinstance(v, dict) or not set(v) <= {"train", "test"}:
                raise SuiteError(f"data overrides: {t}: expected a path or {{'train': path, 'test': path}}")
            out[t] = {k: Path(p).expanduser().resolve() for k, p in v.items() if p is not None}
        return out
    raise SuiteError(f"data overrides: expected a folder or a mapping, got {type(data_overrides).__name__}")


def load_suite(name_or_path: str | Path, data_overrides: str | Path | dict | None = None) -> Suite:
    """Load and check the structure of a suite (a name under the suites folder, a folder or a
    suite.yaml). Checks the schema, task names, orders, templates and that the lm-eval YAML
    files exist; data contents are checked by :func:`validate_suite`."""
    file = _resolve_suite_file(name_or_path)
    where = _display(file)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SuiteError(f"{where}: not valid YAML: {e}") from None
    except OSError as e:
        raise SuiteError(f"{where}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: expected a mapping with name, tasks, orders, ...")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {_loc(err['loc'])}: {msg}")
        raise SuiteError("\n".join(problems)) from None
    suite._path = file.parent
    suite._file = file
    problems = []
    seen = set()
    for i, t in enumerate(suite.tasks):
        t._suite_dir, t._suite_name, t._suite_file, t._index = file.parent, suite.name, file, i
        if t.name in seen:
            problems.append(f"{where}: tasks[{i}].name: duplicate task name {t.name!r}")
        seen.add(t.name)
        if not (file.parent / t.lm_eval).is_file():
            problems.append(f"{where}: tasks[{i}].lm_eval: file {t.lm_eval} does not exist")
    names = suite.task_names
    for k, order in enumerate(suite.orders):
        if not order:
            problems.append(f"{where}: orders[{k}]: empty order")
        for j, n in enumerate(order):
            if n not in names:
                problems.append(f"{where}: orders[{k}][{j}]: unknown task {n!r} (tasks: {', '.join(names)})")
        dup = sorted(n for n, c in Counter(order).items() if c > 1)
        if dup:
            problems.append(f"{where}: orders[{k}]: task(s) listed twice: {', '.join(dup)}")
    if problems:
        raise SuiteError("\n".join(problems))
    for t_name, parts in _normalise_overrides(data_overrides, names).items():
        t = suite.task(t_name)
        t._train_override = parts.get("train")
        t._test_override = parts.get("test")
    return suite


def list_suites() -> list[dict]:
    """One summary dict per suite folder (name, description, n_tasks, n_orders, sizes, path);
    a suite that does not load is listed with an `error`."""
    rows = []
    for d in sorted(suites_dir().glob("*")):
        if not (d / SUITE_FILE).is_file():
            continue
        try:
            rows.append(load_suite(d).summary())
        except SuiteError as e:
            rows.append({"name": d.name, "description": "", "n_tasks": 0, "n_orders": 0, "path": str(d), "error": str(e)})
    return rows


# ============================================================================ validation
def _check_records(t: TaskSpec, rows: list[dict], where: str, problems: list[str]) -> list[dict]:
    """Render every record; collect problems (first 3 per file); return the rendered ones."""
    rendered, bad = [], 0
    for i, r in enumerate(rows):
        try:
            rendered.append(t.render(r))
        except (ValueError, KeyError, IndexError) as e:
            bad += 1
            if bad <= 3:
                problems.append(f"{where}: example {i}: {e}")
    if bad > 3:
        problems.append(f"{where}: ... {bad} bad examples in all")
    return rendered


def _check_lm_eval_task(t: TaskSpec, cfg: dict, test_rows: list[dict], problems: list[str]) -> None:
    """Build the task in lm-eval and compare its prompts / golds with the suite's rendering."""
    from lm_eval.tasks import TaskManager

    where = _display(t.lm_eval_path)
    try:
        tm = TaskManager(include_defaults=False)
        loaded = tm.load([cfg])
        task = loaded["tasks"][cfg["task"]]
    except Exception as e:  # noqa: BLE001 - lm-eval raises anything
        problems.append(f"{where}: lm-eval cannot build task {cfg['task']!r}: {type(e).__name__}: {e}")
        return
    if task.OUTPUT_TYPE != _OUTPUT_TYPE[t.kind]:
        problems.append(f"{where}: output_type: {task.OUTPUT_TYPE!r} but suite kind {t.kind} needs {_OUTPUT_TYPE[t.kind]!r}")
        return
    docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
    metrics = {m["metric"] for m in (cfg.get("metric_list") or []) if isinstance(m, dict)}
    base_metric = t.metric.split(",")[0]
    if base_metric not in metrics:
        problems.append(f"{where}: metric_list: has no metric {base_metric!r} (suite tasks[{t._index}].metric); has {sorted(metrics)}")
    if test_rows and len(docs) != len(test_rows):
        problems.append(f"{where}: lm-eval sees {len(docs)} test documents, the file has {len(test_rows)}")
    mismatches = 0
    for i, doc in enumerate(docs):
        try:
            # what training sees: the file's record (read by the suite's reader), not lm-eval's doc
            want = t.render(test_rows[i] if i < len(test_rows) else doc)
            got_text = task.doc_to_text(doc)
            if t.kind == "multiple_choice":
                choices = task.doc_to_choice(doc)
                gold = task.doc_to_target(doc)
                gi = choices.index(gold) if isinstance(gold, str) and gold in choices else gold
                ok = (got_text == want["prompt"] and isinstance(gi, int) and 0 <= gi < len(choices)
                      and task.config.target_delimiter + choices[gi] == want["completion"])
                got = (got_text, task.config.target_delimiter + choices[gi] if isinstance(gi, int) and 0 <= gi < len(choices) else gi)
            else:
                gold = task.doc_to_target(doc)
                ok = got_text == want["prompt"] and str(gold) == want["completion"].strip()
                got = (got_text, gold)
        except Exception as e:  # noqa: BLE001
            ok, got = False, f"{type(e).__name__}: {e}"
            want = {}
        if not ok:
            mismatches += 1
            if mismatches <= 2:
                problems.append(f"{where}: test document {i}: lm-eval renders {got!r}, the suite (training format) "
                                f"renders {(want.get('prompt'), want.get('completion'))!r}")
    if mismatches > 2:
        problems.append(f"{where}: {mismatches} of {len(docs)} test documents render differently in lm-eval")


def validate_suite(name_or_path: str | Path, data_overrides: str | Path | dict | None = None) -> Suite:
    """Everything :func:`load_suite` checks, plus: data files exist and parse, every record renders,
    labels are in `choices`, sizes match (local data), train and test are disjoint by prompt
    (local data), and every lm-eval task builds in lm-eval and renders the same prompts and gold
    answers as the suite. Hub data is not downloaded (noted in ``suite.validation_notes`` and the
    log). All problems are collected into one SuiteError."""
    suite = load_suite(name_or_path, data_overrides)
    where_suite = _display(suite.file)
    problems: list[str] = []
    notes: list[str] = []
    for t in suite.tasks:
        tw = f"{where_suite}: tasks[{t._index}]"
        # --- lm-eval YAML ------------------------------------------------------------------
        try:
            raw_cfg = t._raw_lm_eval_config()
            cfg = t.lm_eval_config()
        except SuiteError as e:
            problems.append(str(e))
            continue
        ot = raw_cfg.get("output_type")
        if ot != _OUTPUT_TYPE[t.kind]:
            problems.append(f"{_display(t.lm_eval_path)}: output_type: {ot!r} but suite kind {t.kind} needs {_OUTPUT_TYPE[t.kind]!r}")
        try:
            _ = t.metric_key
        except SuiteError as e:
            problems.append(str(e))
        # --- training data ---------------------------------------------------------------------
        train_rendered: list[dict] = []
        if t.is_hub:
            notes.append(f"{t.name}: training data is the hub dataset {t.train.hf.path} (not downloaded: not checked)")
        else:
            try:
                rows = t.train_records()
                train_rendered = _check_records(t, rows, f"{tw}.train ({_display(t.train_file())})", problems)
                if t.train_file() is not None and t._train_override is None and len(rows) != t.sizes.train:
                    problems.append(f"{tw}.sizes.train: {t.sizes.train}, but {_display(t.train_file())} gives {len(rows)} examples")
                if t.kind == "multiple_choice":
                    _check_labels(t, rows, f"{tw}.train ({_display(t.train_file())})", problems)
            except SuiteError as e:
                problems.append(str(e))
        # --- test data / lm-eval -------------------------------------------------------------------
        test_file = t.test_file()
        if test_file is None:
            notes.append(f"{t.name}: test data is the hub dataset {cfg.get('dataset_path')} (not downloaded: "
                         f"lm-eval task not built; config checked only)")
            _check_config_only(t, cfg, problems)
            continue
        try:
            test_rows = t.test_records()
        except SuiteError as e:
            problems.append(str(e))
            continue
        twhere = f"{_display(t.lm_eval_path)}: test data ({_display(test_file)})"
        test_rendered = _check_records(t, test_rows, twhere, problems)
        if t.kind == "multiple_choice":
            _check_labels(t, test_rows, twhere, problems)
        if t._test_override is None and len(test_rows) != t.sizes.test:
            problems.append(f"{tw}.sizes.test: {t.sizes.test}, but {_display(test_file)} has {len(test_rows)} examples")
        if train_rendered and test_rendered:
            overlap = {r["prompt"] for r in train_rendered} & {r["prompt"] for r in test_rendered}
            if overlap:
                ex = next(iter(sorted(overlap)))
                problems.append(f"{tw}: train and test share {len(overlap)} prompt(s), e.g. {ex!r}")
        if len(test_rendered) == len(test_rows):
            _check_lm_eval_task(t, cfg, test_rows, problems)
    if problems:
        raise SuiteError(f"suite {suite.name}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    if notes:
        log.info("suite %s: not checked (hub data, not downloaded): %s", suite.name, "; ".join(notes))
    suite._notes = notes
    return suite


def _check_labels(t: TaskSpec, rows: list[dict], where: str, problems: list[str]) -> None:
    col = t.label_column
    seen = Counter()
    for r in rows:
        if col in r:
            try:
                seen[t.choices[t.label_index(r[col])]] += 1
            except ValueError:
                pass  # reported by _check_records
    missing = [c for c in t.choices if c not in seen]
    if rows and missing and t._train_override is None and t._test_override is None:
        problems.append(f"{where}: label(s) {missing} of choices never occur (labels seen: {dict(seen)})")


def _check_config_only(t: TaskSpec, cfg: dict, problems: list[str]) -> None:
    """Hub tasks: check the config constructs as an lm-eval TaskConfig without downloading."""
    try:
        from lm_eval.config.task import TaskConfig

        TaskConfig(**{k: v for k, v in cfg.items()})
    except Exception as e:  # noqa: BLE001
        problems.append(f"{_display(t.lm_eval_path)}: not a valid lm-eval task config: {type(e).__name__}: {e}")
