"""Loading suites: ``load_suite`` (structure only, no data read) and ``list_suites``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml
from pydantic import ValidationError

from harness.errors import SuiteError
from harness.suites.data import resolve_data_overrides
from harness.suites.locations import SUITE_FILE, display, resolve_suite_file, suites_dir
from harness.suites.schema import Suite


def _loc(loc: tuple) -> str:
    """A pydantic error location as the suite.yaml key path, e.g. tasks[1].kind."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _parse(file: Path) -> Suite:
    """suite.yaml -> Suite, every schema problem named by file and key in one SuiteError."""
    where = display(file)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SuiteError(f"{where}: not valid YAML: {e}") from None
    except OSError as e:
        raise SuiteError(f"{where}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: expected a mapping with name, tasks, orders, ...")
    try:
        return Suite.model_validate(raw)
    except ValidationError as e:
        problems = [f"{where}: {_loc(err['loc'])}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise SuiteError("\n".join(problems)) from None


def _structure_problems(suite: Suite, where: str) -> list[str]:
    """Duplicate task names, missing lm-eval YAMLs and bad orders (what the schema alone cannot see)."""
    problems = []
    seen = set()
    for i, t in enumerate(suite.tasks):
        if t.name in seen:
            problems.append(f"{where}: tasks[{i}].name: duplicate task name {t.name!r}")
        seen.add(t.name)
        if not (suite.path / t.lm_eval).is_file():
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
    return problems


def load_suite(name_or_path: str | Path, data_overrides: str | Path | dict | None = None) -> Suite:
    """Load and check the structure of a suite (a name under the suites folder, a folder or a suite.yaml).

    Checks the schema, task names, orders, templates and that the lm-eval YAML files exist; data
    contents are checked by ``validate_suite``. ``data_overrides`` (else $HARNESS_DATA_OVERRIDES)
    replaces tasks' data with local files."""
    file = resolve_suite_file(name_or_path)
    suite = _parse(file)
    suite._path = file.parent
    suite._file = file
    for i, t in enumerate(suite.tasks):
        t._suite_dir, t._suite_name, t._suite_file, t._index = file.parent, suite.name, file, i
    problems = _structure_problems(suite, display(file))
    if problems:
        raise SuiteError("\n".join(problems))
    for t_name, parts in resolve_data_overrides(data_overrides, suite.task_names).items():
        t = suite.task(t_name)
        t._train_override = parts.get("train")
        t._test_override = parts.get("test")
    return suite


def list_suites() -> list[dict]:
    """One summary dict per suite folder (name, description, n_tasks, n_orders, sizes, path).

    A suite that does not load is listed with an `error`."""
    rows = []
    for d in sorted(suites_dir().glob("*")):
        if not (d / SUITE_FILE).is_file():
            continue
        try:
            rows.append(load_suite(d).summary())
        except SuiteError as e:
            rows.append(
                {"name": d.name, "description": "", "n_tasks": 0, "n_orders": 0, "path": str(d), "error": str(e)}
            )
    return rows
