"""Reading a suite's data: training and test records (JSONL/CSV, hub datasets, data overrides) and their rendering.

A record renders to ``{"prompt", "completion"}`` through the task's ``prompt`` / ``target``
templates (``str.format``, the ``columns`` mapping applied); training and the validator's
comparison with lm-eval both use :func:`render`, so the two cannot drift apart. Selections
(``per_class``, ``limit``) use :data:`FIXED_DATA_SEED`: every run of a suite sees the same examples.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from harness.errors import SuiteError
from harness.suites.locations import display

# `task` arguments are harness.suites.schema.TaskSpec objects; schema imports this module (TaskSpec's methods
# delegate here), so the name is only written in annotations, never imported (no import cycle).

DATA_EXTS = (".jsonl", ".csv")
FIXED_DATA_SEED = 0  # per_class / limit selection: the same examples for every run of a suite
VALIDATION_SEED = "validation-0"  # with the task name: which training records a task's validation split holds
# Keys that would pull other files or tasks into a task YAML: the suite could no longer vouch for it.
_UNSUPPORTED_YAML_KEYS = ("include", "group", "tag", "task_list", "class")


# ============================================================================ templates
def template_fields(template: str) -> list[str]:
    """Field names of a str.format template; raises ValueError for anything but plain {name}."""
    fields = []
    for _lit, field, spec, conv in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier():
            raise ValueError(
                f"template field {{{field}}}: use plain names like {{text}} (no index, attribute or positional fields)"
            )
        if spec or conv:
            raise ValueError(f"template field {{{field}}}: format specs and conversions are not supported")
        fields.append(field)
    return fields


def label_index(task: "TaskSpec", value: Any) -> int:
    """Index into choices of a record's label (int index, choice name or int string)."""
    assert task.choices is not None
    if isinstance(value, bool):  # bool is an int subclass: True would silently mean choice 1
        raise ValueError(f"label {value!r}: not an index or a choice name")
    if isinstance(value, int):
        if 0 <= value < len(task.choices):
            return value
        raise ValueError(f"label {value}: index out of range for {len(task.choices)} choices")
    if isinstance(value, str):
        if value in task.choices:
            return task.choices.index(value)
        if re.fullmatch(r"-?\d+", value.strip()):  # CSV files hold int labels as text
            return label_index(task, int(value))
    raise ValueError(f"label {value!r}: not in choices {task.choices}")


def _field(task: "TaskSpec", record: dict, field: str) -> Any:
    col = task.train.columns.get(field, field)
    if col not in record:
        raise ValueError(
            f"record has no column {col!r}"
            + (f" (field {field!r})" if col != field else "")
            + f"; columns: {sorted(record)}"
        )
    return record[col]


def render(task: "TaskSpec", record: dict) -> dict[str, str]:
    """{"prompt", "completion"} of one raw record (columns mapping applied)."""
    values = {f: _field(task, record, f) for f in template_fields(task.prompt)}
    prompt = task.prompt.format(**values)
    if task.kind == "multiple_choice":
        answer = task.choices[label_index(task, _field(task, record, "label"))]
        completion = task.target.format(answer=answer)
    else:
        tv = {f: _field(task, record, f) for f in template_fields(task.target)}
        completion = task.target.format(**tv)
    return {"prompt": prompt, "completion": completion}


# ============================================================================ files
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


def read_lm_eval_yaml(task: "TaskSpec") -> dict:
    """The task's lm-eval YAML as written (cached); it also names where a local suite's test data is."""
    if "lm_eval_raw" in task._cache:
        return task._cache["lm_eval_raw"]
    path = task.lm_eval_path
    if not path.is_file():
        raise SuiteError(f"{task.where}.lm_eval: file {task.lm_eval} does not exist (looked for {path})")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SuiteError(
            f"{display(path)}: not plain YAML (no !function or other tags; "
            f"callables are generated from suite.yaml): {e}"
        ) from None
    if not isinstance(cfg, dict):
        raise SuiteError(f"{display(path)}: expected a mapping of lm-eval task config keys")
    for key in _UNSUPPORTED_YAML_KEYS:
        if key in cfg:
            raise SuiteError(f"{display(path)}: {key}: not supported in a suite task YAML (write the task out in full)")
    task._cache["lm_eval_raw"] = cfg
    return cfg


# ============================================================================ training data
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


def train_file(task: "TaskSpec") -> Path | None:
    """The local training file (an override wins), or None for hub data."""
    if task._train_override is not None:
        return task._train_override
    if task.train.path is not None:
        return (task._suite_dir / task.train.path).resolve()
    return None


def _load_hf_train(task: "TaskSpec") -> list[dict]:
    hf = task.train.hf
    assert hf is not None
    try:
        import datasets  # lazy: HF datasets loads in ~0.5 s; only hub-sourced tasks need it

        ds = datasets.load_dataset(hf.path, hf.name, split=hf.split, revision=hf.revision)
    except Exception as e:  # noqa: BLE001 - anything from the hub becomes a suite error
        raise SuiteError(
            f"{task.where}.train.hf: cannot load {hf.path!r} (name={hf.name!r}, split={hf.split!r}) from the "
            f"Hugging Face hub: {type(e).__name__}: {str(e)[:300]}. Hub suites need hub access; offline, point "
            f"HARNESS_DATA_OVERRIDES at a folder of <task>.train.jsonl/<task>.test.jsonl files of the same schema."
        ) from None
    return [dict(r) for r in ds]


def _read_checked(path: Path, where: str) -> list[dict]:
    """Records of a local data file; a missing or unreadable file is a SuiteError naming where it was given."""
    if not path.is_file():
        raise SuiteError(f"{where}: file {path} does not exist")
    try:
        return read_records(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SuiteError(f"{where}: {display(path)}: {e}") from None


def _raw_train_records(task: "TaskSpec") -> list[dict]:
    if "train_raw" in task._cache:
        return task._cache["train_raw"]
    path = train_file(task)
    if path is not None:
        rows = _read_checked(path, f"{task.where}.train.path")
    else:
        rows = _load_hf_train(task)
    task._cache["train_raw"] = rows
    return rows


def selected_train_records(task: "TaskSpec") -> list[dict]:
    """Raw training records after the suite's per_class / limit selection (fixed seed), validation included."""
    if "train_selected" in task._cache:
        return task._cache["train_selected"]
    rows = _raw_train_records(task)
    if task.train.per_class is not None:
        rows = _stratified(rows, task.label_column, task.train.per_class, FIXED_DATA_SEED)
    if task.train.limit is not None:
        rows = _first_after_shuffle(rows, task.train.limit, FIXED_DATA_SEED)
    task._cache["train_selected"] = rows
    return rows


def validation_indices(task: "TaskSpec") -> list[int]:
    """Positions in selected_train_records of the task's validation split: a sample of validation.size, seeded by
    (VALIDATION_SEED, task name) alone, so it is the same for every run, method and seed. Empty without one."""
    if task.validation is None:
        return []
    rows = selected_train_records(task)
    if task.validation.size >= len(rows):
        raise SuiteError(
            f"{task.where}.validation.size: {task.validation.size}, but the task has only {len(rows)} training "
            "examples; carve fewer (the rest are trained on)"
        )
    return sorted(random.Random(f"{VALIDATION_SEED}:{task.name}").sample(range(len(rows)), task.validation.size))


def train_records(task: "TaskSpec") -> list[dict]:
    """The records trained on: the selected training records without the validation split."""
    if "train" in task._cache:
        return task._cache["train"]
    held = set(validation_indices(task))
    rows = [r for i, r in enumerate(selected_train_records(task)) if i not in held]
    task._cache["train"] = rows
    return rows


def validation_records(task: "TaskSpec") -> list[dict]:
    """The validation split's raw records (never trained on; lm-eval scores them like test documents)."""
    rows = selected_train_records(task)
    return [rows[i] for i in validation_indices(task)]


def train_examples(task: "TaskSpec", limit: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Training examples [{"prompt", "completion"}] (loss on completion only).

    All of them in file order, or with ``limit`` the first ``limit`` after a shuffle seeded with ``seed``."""
    rows = train_records(task)
    if limit is not None:
        rows = _first_after_shuffle(rows, limit, seed)
    out = []
    for i, r in enumerate(rows):
        try:
            out.append(render(task, r))
        except (ValueError, KeyError, IndexError) as e:
            raise SuiteError(f"{task.where}.train: example {i}: {e}") from None
    return out


# ============================================================================ test data
def test_file(task: "TaskSpec") -> Path | None:
    """The local test data file (lm-eval's test split), or None for hub data."""
    if task._test_override is not None:
        return task._test_override
    cfg = read_lm_eval_yaml(task)
    if cfg.get("dataset_path") not in ("json", "csv"):
        return None
    split = cfg.get("test_split") or "test"
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    f = files.get(split) if isinstance(files, dict) else files
    if isinstance(f, list):
        f = f[0] if len(f) == 1 else None
    if not isinstance(f, str):
        return None
    p = Path(f)
    return p if p.is_absolute() else (task.lm_eval_path.parent / p).resolve()


def test_records(task: "TaskSpec") -> list[dict]:
    """Raw records of the local test file (lm-eval's documents); SuiteError for hub data."""
    if "test" in task._cache:
        return task._cache["test"]
    path = test_file(task)
    if path is None:
        raise SuiteError(
            f"{task.where}: test data is not a local file ({task.lm_eval}: dataset_path "
            f"{read_lm_eval_yaml(task).get('dataset_path')!r})"
        )
    rows = _read_checked(path, f"{display(task.lm_eval_path)}: dataset_kwargs.data_files")
    task._cache["test"] = rows
    return rows


# ============================================================================ overrides
def _overrides_from_folder(folder: Path, task_names: list[str]) -> dict[str, dict[str, Path]]:
    if not folder.is_dir():
        raise SuiteError(
            f"data overrides: {folder} is not a folder (expected <task>.train.jsonl / <task>.test.jsonl files)"
        )
    out: dict[str, dict[str, Path]] = {}
    for t in task_names:
        for part in ("train", "test"):
            for ext in DATA_EXTS:
                f = folder / f"{t}.{part}{ext}"
                if f.is_file():
                    out.setdefault(t, {})[part] = f.resolve()
                    break
    return out


def resolve_data_overrides(
    data_overrides: str | Path | dict | None, task_names: list[str]
) -> dict[str, dict[str, Path]]:
    """{task: {"train"/"test": file}} from a folder, a mapping or (when None) $HARNESS_DATA_OVERRIDES.

    A folder contributes only the files it has; a mapping's bare path means train only."""
    if data_overrides is None:
        data_overrides = os.environ.get("HARNESS_DATA_OVERRIDES") or None
    if data_overrides is None:
        return {}
    if isinstance(data_overrides, (str, Path)):
        return _overrides_from_folder(Path(data_overrides).expanduser(), task_names)
    if not isinstance(data_overrides, dict):
        raise SuiteError(f"data overrides: expected a folder or a mapping, got {type(data_overrides).__name__}")
    out: dict[str, dict[str, Path]] = {}
    for t, v in data_overrides.items():
        if t not in task_names:
            raise SuiteError(f"data overrides: no task {t!r} in the suite (tasks: {', '.join(task_names)})")
        if isinstance(v, (str, Path)):
            v = {"train": v}
        if not isinstance(v, dict) or not set(v) <= {"train", "test"}:
            raise SuiteError(f"data overrides: {t}: expected a path or {{'train': path, 'test': path}}")
        out[t] = {k: Path(p).expanduser().resolve() for k, p in v.items() if p is not None}
    return out
