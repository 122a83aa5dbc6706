"""Thorough suite checks (``validate_suite``): data files, labels, sizes, train/test overlap, and lm-eval itself.

Every problem is collected and raised as one SuiteError, so a suite author sees all of them at
once. Hub data is not downloaded: what could not be checked becomes ``Suite.validation_notes``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from harness.errors import SuiteError
from harness.suites import data
from harness.suites.lm_eval_configs import OUTPUT_TYPE, task_manager
from harness.suites.loading import load_suite
from harness.suites.locations import display
from harness.suites.schema import Suite, TaskSpec

# the package's logger: the name users see (and filter on) stays "harness.suites"
log = logging.getLogger("harness.suites")


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


def _check_labels(t: TaskSpec, rows: list[dict], where: str, problems: list[str]) -> None:
    """Every choice occurs as a label (suite's own data only: an override may be a small sample)."""
    col = t.label_column
    seen = Counter()
    for r in rows:
        if col in r:
            try:
                seen[t.choices[data.label_index(t, r[col])]] += 1
            except ValueError:
                pass  # reported by _check_records
    missing = [c for c in t.choices if c not in seen]
    if rows and missing and t._train_override is None and t._test_override is None:
        problems.append(f"{where}: label(s) {missing} of choices never occur (labels seen: {dict(seen)})")


def _check_config_only(t: TaskSpec, cfg: dict, problems: list[str]) -> None:
    """Hub tasks: check the config constructs as an lm-eval TaskConfig without downloading."""
    try:
        from lm_eval.config.task import (
            TaskConfig,  # lazy: lm-eval loads in ~0.6 s; config checks and --help need none of it
        )

        TaskConfig(**{k: v for k, v in cfg.items()})
    except Exception as e:  # noqa: BLE001
        problems.append(f"{display(t.lm_eval_path)}: not a valid lm-eval task config: {type(e).__name__}: {e}")


def _compare_doc(t: TaskSpec, task, doc, record) -> tuple[bool, object, dict]:
    """(same?, what lm-eval renders, what the suite renders) for one test document."""
    # what training sees: the file's record (read by the suite's reader), not lm-eval's doc
    want = t.render(record)
    got_text = task.doc_to_text(doc)
    if t.kind != "multiple_choice":
        gold = task.doc_to_target(doc)
        return got_text == want["prompt"] and str(gold) == want["completion"].strip(), (got_text, gold), want
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_target(doc)
    gi = choices.index(gold) if isinstance(gold, str) and gold in choices else gold
    valid = isinstance(gi, int) and 0 <= gi < len(choices)
    got_completion = task.config.target_delimiter + choices[gi] if valid else gi
    ok = got_text == want["prompt"] and valid and got_completion == want["completion"]
    return ok, (got_text, got_completion), want


def _check_lm_eval_task(t: TaskSpec, cfg: dict, test_rows: list[dict], problems: list[str]) -> None:
    """Build the task in lm-eval and compare its prompts / golds with the suite's rendering."""
    where = display(t.lm_eval_path)
    try:
        task = task_manager().load([cfg])["tasks"][cfg["task"]]
    except Exception as e:  # noqa: BLE001 - lm-eval raises anything
        problems.append(f"{where}: lm-eval cannot build task {cfg['task']!r}: {type(e).__name__}: {e}")
        return
    if task.OUTPUT_TYPE != OUTPUT_TYPE[t.kind]:
        problems.append(
            f"{where}: output_type: {task.OUTPUT_TYPE!r} but suite kind {t.kind} needs {OUTPUT_TYPE[t.kind]!r}"
        )
        return
    docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
    metrics = {m["metric"] for m in (cfg.get("metric_list") or []) if isinstance(m, dict)}
    base_metric = t.metric.split(",")[0]
    if base_metric not in metrics:
        problems.append(
            f"{where}: metric_list: has no metric {base_metric!r} (suite tasks[{t._index}].metric); has {sorted(metrics)}"
        )
    if test_rows and len(docs) != len(test_rows):
        problems.append(f"{where}: lm-eval sees {len(docs)} test documents, the file has {len(test_rows)}")
    mismatches = 0
    for i, doc in enumerate(docs):
        try:
            ok, got, want = _compare_doc(t, task, doc, test_rows[i] if i < len(test_rows) else doc)
        except Exception as e:  # noqa: BLE001 - a user's YAML can make lm-eval raise anything
            ok, got, want = False, f"{type(e).__name__}: {e}", {}
        if not ok:
            mismatches += 1
            if mismatches <= 2:
                problems.append(
                    f"{where}: test document {i}: lm-eval renders {got!r}, the suite (training format) "
                    f"renders {(want.get('prompt'), want.get('completion'))!r}"
                )
    if mismatches > 2:
        problems.append(f"{where}: {mismatches} of {len(docs)} test documents render differently in lm-eval")


def _check_train(t: TaskSpec, tw: str, problems: list[str]) -> list[dict]:
    """Local training data: parses, renders, has the declared size and every label; returns the rendered examples."""
    try:
        rows = data.selected_train_records(
            t
        )  # with the validation split: it must not overlap the test documents either
        data.validation_indices(t)  # a validation split larger than the data is refused here
        file = data.train_file(t)
        where = f"{tw}.train ({display(file)})"
        rendered = _check_records(t, rows, where, problems)
        if file is not None and t._train_override is None and len(rows) != t.sizes.train:
            problems.append(f"{tw}.sizes.train: {t.sizes.train}, but {display(file)} gives {len(rows)} examples")
        if t.kind == "multiple_choice":
            _check_labels(t, rows, where, problems)
        return rendered
    except SuiteError as e:
        problems.append(str(e))
        return []


def _check_test(t: TaskSpec, tw: str, cfg: dict, train_rendered: list[dict], problems: list[str]) -> None:
    """Local test data: parses, renders, sized, labels, disjoint from train; then lm-eval on it."""
    test_file = data.test_file(t)
    try:
        test_rows = t.test_records()
    except SuiteError as e:
        problems.append(str(e))
        return
    twhere = f"{display(t.lm_eval_path)}: test data ({display(test_file)})"
    test_rendered = _check_records(t, test_rows, twhere, problems)
    if t.kind == "multiple_choice":
        _check_labels(t, test_rows, twhere, problems)
    if t._test_override is None and len(test_rows) != t.sizes.test:
        problems.append(f"{tw}.sizes.test: {t.sizes.test}, but {display(test_file)} has {len(test_rows)} examples")
    if train_rendered and test_rendered:
        overlap = {r["prompt"] for r in train_rendered} & {r["prompt"] for r in test_rendered}
        if overlap:
            ex = next(iter(sorted(overlap)))
            problems.append(f"{tw}: train and test share {len(overlap)} prompt(s), e.g. {ex!r}")
    if len(test_rendered) == len(test_rows):  # lm-eval's comparison would only repeat bad records
        _check_lm_eval_task(t, cfg, test_rows, problems)


def _check_task(t: TaskSpec, where_suite: str, problems: list[str], notes: list[str]) -> None:
    tw = f"{where_suite}: tasks[{t._index}]"
    try:
        raw_cfg = data.read_lm_eval_yaml(t)
        cfg = t.lm_eval_config()
    except SuiteError as e:
        problems.append(str(e))
        return
    ot = raw_cfg.get("output_type")
    if ot != OUTPUT_TYPE[t.kind]:
        problems.append(
            f"{display(t.lm_eval_path)}: output_type: {ot!r} but suite kind {t.kind} needs {OUTPUT_TYPE[t.kind]!r}"
        )
    try:
        _ = t.metric_key
    except SuiteError as e:
        problems.append(str(e))
    train_rendered: list[dict] = []
    if t.is_hub:
        notes.append(f"{t.name}: training data is the hub dataset {t.train.hf.path} (not downloaded: not checked)")
    else:
        train_rendered = _check_train(t, tw, problems)
    if data.test_file(t) is None:
        notes.append(
            f"{t.name}: test data is the hub dataset {cfg.get('dataset_path')} (not downloaded: "
            f"lm-eval task not built; config checked only)"
        )
        _check_config_only(t, cfg, problems)
        return
    _check_test(t, tw, cfg, train_rendered, problems)


def validate_suite(name_or_path: str | Path, data_overrides: str | Path | dict | None = None) -> Suite:
    """Everything :func:`load_suite` checks, plus the data and lm-eval; all problems in one SuiteError.

    Data files exist and parse, every record renders, labels are in `choices`, sizes match (local
    data), train and test are disjoint by prompt (local data), and every lm-eval task builds in
    lm-eval and renders the same prompts and gold answers as the suite. Hub data is not downloaded
    (noted in ``suite.validation_notes`` and the log)."""
    suite = load_suite(name_or_path, data_overrides)
    where_suite = display(suite.file)
    problems: list[str] = []
    notes: list[str] = []
    for t in suite.tasks:
        _check_task(t, where_suite, problems, notes)
    if problems:
        raise SuiteError(f"suite {suite.name}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    if notes:
        log.info("suite %s: not checked (hub data, not downloaded): %s", suite.name, "; ".join(notes))
    suite._notes = notes
    return suite
