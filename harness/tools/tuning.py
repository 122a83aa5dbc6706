"""The baselines' strength, tuned on the validation split (`make tune-baselines`, `harness tuning`).

Each baseline with a strength knob (`Method.strength`: EWC's λ, N-LoRA's λ, O-LoRA's λ1, MIGU's fraction, InfLoRA's
threshold) runs a small grid over that knob on a suite (seed 0). The value whose final model scores the highest ACC
on the suite's validation split (records carved from the training data, never trained on, disjoint from the test
documents) is chosen; the test split never chooses. A tie goes to the knob's default if it is among the tied, else to
the first tied value in grid order. A choice at an end of the grid is flagged: the best may lie beyond it.

    results/evidence/tuning-<suite>/
        tuning.json                                   the choice per method (keys below)
        <method>/<knob>=<value>/summary.json          each finished sequence's summary and config (about 6 KB)
        <method>/<knob>=<value>/config.yaml

A tuning grows over sessions: `collect` joins the values already in the evidence with the finished sequences under
the run folder (a value run again replaces its evidence), refusing runs whose settings differ from the evidence's
(other than the strength knobs and the grid), and `pending` names the values of a grid that have no evidence yet, so
`make tune-baselines` on a fresh clone runs only those.

tuning.json: {"suite", "selection", "methods": {method: {"knob", "default", "chosen" (null while fewer than two values
have finished), "at_grid_end", "values":
[{"value", "seed", "validation_acc", "acc", "bwt", "forgetting", "la"}, ...]}}}. The chosen values go into the suite's
`method_knobs` (suite.yaml), where runs read them as the suite's defaults (harness/run/suite_knobs.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from harness.analysis.numbers import json_clean
from harness.errors import HarnessError
from harness.io import atomic_write_bytes, atomic_write_text, read_json
from harness.methods import METHODS
from harness.run.folder import sequence_folders
from harness.run.suite_knobs import knob_default
from harness.tools.evidence import EVIDENCE_DIR, _differences, _sections, _settings

SELECTION = (
    "the highest ACC of the final model on the validation split of every task (seed 0); a tie goes to the "
    "knob's default, else to the first value in grid order; the test split never chooses"
)


def _knob_value(config: dict, knob: str) -> Any:
    section, key = knob.split(".")
    return (config.get(section) or {}).get(key)


def _rows(folders: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """method -> one row per finished sequence of a method with a strength knob."""
    out: dict[str, list[dict[str, Any]]] = {}
    for f in folders:
        summary, config = read_json(f / "summary.json"), yaml.safe_load((f / "config.yaml").read_text())
        knob = METHODS[summary["method"]].strength
        if knob is None:
            continue
        val = summary.get("validation") or {}
        out.setdefault(summary["method"], []).append(
            {
                "value": _knob_value(config, knob),
                "seed": summary["seed"],
                "folder": f,
                "validation_acc": val.get("acc") if val.get("complete") else None,
                "acc": summary.get("acc"),
                "bwt": summary.get("bwt"),
                "forgetting": summary.get("forgetting"),
                "la": summary.get("la"),
            }
        )
    return out


def choose(rows: list[dict[str, Any]], default: Any) -> dict[str, Any]:
    """The chosen row (SELECTION) of one method's rows in grid order; HarnessError when one has no validation ACC."""
    missing = [r["value"] for r in rows if r["validation_acc"] is None or not math.isfinite(r["validation_acc"])]
    if missing:
        raise HarnessError(
            f"values {missing}: no validation ACC in summary.json; tuning needs a suite whose every task "
            f"has a validation split (suite.yaml `validation: {{size: N}}`)"
        )
    best = max(r["validation_acc"] for r in rows)
    tied = [r for r in rows if r["validation_acc"] == best]
    return next((r for r in tied if r["value"] == default), tied[0])


def summarize(by_method: dict[str, list[dict[str, Any]]], suite: str) -> dict[str, Any]:
    """tuning.json's content from each method's rows (_rows)."""
    methods = {}
    for method, rows in sorted(by_method.items()):
        knob = METHODS[method].strength
        rows.sort(key=lambda r: r["value"])
        default = knob_default(knob)
        chosen = choose(rows, default)["value"] if len(rows) > 1 else None  # one value finished: nothing chosen yet
        methods[method] = {
            "knob": knob,
            "default": default,
            "chosen": chosen,
            "at_grid_end": chosen is not None and chosen in (rows[0]["value"], rows[-1]["value"]),
            "values": [{k: v for k, v in r.items() if k != "folder"} for r in rows],
        }
    if not methods:
        raise HarnessError(
            f"no finished sequence of a method with a strength knob "
            f"({', '.join(m for m, c in METHODS.items() if c.strength)}) under these folders"
        )
    return {"suite": suite, "selection": SELECTION, "methods": methods}


def _evidence_folders(out: Path, method: str = "*") -> list[Path]:
    """The value folders already in a suite's tuning evidence, of one method or all (both files present: a folder
    being written is not)."""
    found = sorted(p.parent for p in out.glob(f"{method}/*/summary.json")) if out.is_dir() else []
    return [f for f in found if (f / "config.yaml").is_file()]


def _shared_settings(folder: Path) -> dict[str, Any]:
    """A run's settings less what a tuning varies: the methods' sections (the knob) and the grid."""
    sections = _sections()
    return {k: v for k, v in _settings(folder / "config.yaml").items() if k not in sections and k != "grid"}


def _check_settings(folders: list[Path]) -> None:
    """HarnessError unless every run agrees with the first (the evidence's oldest) on what the tuning holds fixed."""
    if not folders:
        return
    reference = _shared_settings(folders[0])
    for f in folders[1:]:
        diff = _differences(_shared_settings(f), reference)
        if diff:
            raise HarnessError(
                f"{f}: its settings differ from {folders[0]}'s in {', '.join(diff)}; a tuning compares values at "
                f"the same settings: run it with those, or tune into a fresh evidence folder"
            )


def collect(run_folder: Path, suite: str, root: Path = EVIDENCE_DIR) -> dict[str, Any]:
    """Write results/evidence/tuning-<suite>/ from its evidence and the finished sequences under run_folder (which
    may be absent when the evidence has values); the tuning.json written."""
    out = root / f"tuning-{suite}"
    held = _evidence_folders(out)
    runs = [f for f in sequence_folders(Path(run_folder)) if (f / "summary.json").is_file()]
    if not runs and not held:
        raise HarnessError(
            f"{run_folder}: no finished sequence under it and no evidence in {out}; pass the tuning experiment's "
            f"folder, e.g. results/tune-{suite}/tune-{suite}"
        )
    _check_settings(held + runs)
    fresh = _rows(runs)
    by_method = _rows(held)
    for method, rows in fresh.items():
        values = {r["value"] for r in rows}
        by_method[method] = [r for r in by_method.get(method, []) if r["value"] not in values] + rows
    result = summarize(by_method, suite)
    for method, rows in fresh.items():
        for r in rows:
            dst = out / method / f"{METHODS[method].strength}={r['value']}"
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("summary.json", "config.yaml"):
                atomic_write_bytes(dst / name, (r["folder"] / name).read_bytes())
    atomic_write_text(out / "tuning.json", json.dumps(json_clean(result), indent=1))
    return result


def pending(grid: str, suite: str, root: Path = EVIDENCE_DIR) -> str:
    """The part of one method's grid ("METHOD:KNOB=V1,V2,...", as TUNE_GRIDS writes it) with no evidence yet, in the
    same form, or "" when every value has some (values compare as numbers: 1e-6 is 1e-06)."""
    method, _, spec = grid.partition(":")
    knob, _, values = spec.partition("=")
    if method not in METHODS or METHODS[method].strength != knob or not values:
        strong = ", ".join(f"{m}:{c.strength}" for m, c in METHODS.items() if c.strength)
        raise HarnessError(f"--pending {grid!r}: expected METHOD:KNOB=V1,V2,... with one of {strong}")
    done = {float(f.name.partition("=")[2]) for f in _evidence_folders(root / f"tuning-{suite}", method)}
    try:
        left = [v for v in values.split(",") if float(v) not in done]
    except ValueError:
        raise HarnessError(f"--pending {grid!r}: the values must be numbers") from None
    return f"{method}:{knob}={','.join(left)}" if left else ""


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def format_tuning(result: dict[str, Any]) -> str:
    """The table `harness tuning` prints, and the suite.yaml lines that record the choice."""
    lines = [
        f"suite {result['suite']}: chosen by {result['selection']}",
        "",
        f"{'method':8} {'knob':20} {'value':>8} {'val ACC':>8} {'ACC':>7} {'BWT':>7} {'LA':>6}",
    ]
    snippet = []
    for method, m in result["methods"].items():
        for r in m["values"]:
            mark = (
                " <- chosen" + (" (at the grid's end)" if m["at_grid_end"] else "") if r["value"] == m["chosen"] else ""
            )
            lines.append(
                f"{method:8} {m['knob']:20} {r['value']:>8g} {_fmt(r['validation_acc']):>8} "
                f"{_fmt(r['acc']):>7} {_fmt(r['bwt']):>7} {_fmt(r['la']):>6}{mark}"
            )
        section, key = m["knob"].split(".")
        if m["chosen"] is not None:
            snippet.append(f"  {section}: {{{key}: {m['chosen']}}}")
    return "\n".join(lines + ["", "suite.yaml:", "method_knobs:", *snippet])


def markdown_tuning(result: dict[str, Any]) -> str:
    """The same choice as a Markdown table (docs/baselines.md pastes it)."""
    lines = [
        "| method | knob | value | validation ACC | ACC (test) | BWT | LA | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, m in result["methods"].items():
        for r in m["values"]:
            mark = (
                ("**chosen**" + (", at the grid's end" if m["at_grid_end"] else ""))
                if r["value"] == m["chosen"]
                else ""
            )
            mark += " (default)" if r["value"] == m["default"] else ""
            lines.append(
                f"| {method} | `{m['knob']}` | {r['value']:g} | {_fmt(r['validation_acc'])} | {_fmt(r['acc'])} | "
                f"{_fmt(r['bwt'])} | {_fmt(r['la'])} | {mark.strip()} |"
            )
    return "\n".join(lines)
