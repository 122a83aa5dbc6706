"""A suite's defaults for method knobs (suite.yaml `method_knobs`), where each method's strength came from, and the
check of its recommended learning rates (budget.lr) against the registry's families.

A baseline's strength (EWC's λ, N-LoRA's λ, ...; `Method.strength`) is tuned per suite on the validation split by
`make tune-baselines` and recorded in the suite as a default. An experiment that sets the knob itself (YAML, flag,
grid) keeps its value. Every sequence's summary.json says which it ran at (`strength`), so a table can mark each
row as tuned on the suite, at the knob's untuned default, or set by the experiment.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from harness.config import ExperimentConfig, section_users
from harness.config_loading import format_errors
from harness.errors import ConfigError
from harness.methods import LR_FAMILIES, METHODS
from harness.suites.locations import display

# How the source of a strength reads in tables (summary.json `strength.source` is the key).
SOURCES = {
    "suite": "tuned on the suite's validation split (suite.yaml method_knobs; make tune-baselines)",
    "default": "the knob's default, not tuned for this suite",
    "experiment": "set by the experiment (config, flag or grid)",
}


def knob_field(model: type[BaseModel], key: str) -> str | None:
    """The field a YAML key names (ewc's `lambda` is the field lambda_), None if none does."""
    return next((name for name, f in model.model_fields.items() if key in (name, f.alias)), None)


def knob_default(knob: str) -> Any:
    """The default of a method knob named "section.key" (ewc.lambda -> 1000.0)."""
    section, key = knob.split(".")
    model = ExperimentConfig.model_fields[section].annotation
    return model.model_fields[knob_field(model, key)].default


def _check(suite) -> None:
    users = section_users()
    for section, knobs in suite.method_knobs.items():
        where = f"{display(suite.file)}: method_knobs.{section}"
        if section not in users:
            raise ConfigError(
                f"{where}: no method reads a section {section!r} (sections: {', '.join(sorted(users))}); "
                f"fix the name or drop it"
            )
        model = ExperimentConfig.model_fields[section].annotation
        for key in knobs:
            if knob_field(model, key) is None:
                known = ", ".join(f.alias or n for n, f in model.model_fields.items())
                raise ConfigError(f"{where}.{key}: {section} has no knob {key!r} (knobs: {known})")


def check_lr_families(suite) -> None:
    """ConfigError naming suite.yaml when a budget recommends a rate for a learning-rate family no method has."""
    where = [("budget.lr", suite.budget.lr)] + [
        (f"tasks[{i}].budget.lr", t.budget.lr)
        for i, t in enumerate(suite.tasks)
        if t.budget is not None and t.budget.lr
    ]
    for key, rates in where:
        unknown = sorted(set(rates or {}) - set(LR_FAMILIES))
        if unknown:
            raise ConfigError(
                f"{display(suite.file)}: {key}: {', '.join(map(repr, unknown))} is no learning-rate family "
                f"(families: {', '.join(sorted(LR_FAMILIES))}); fix the name or drop it"
            )


def with_suite_knobs(cfg: ExperimentConfig, suite) -> ExperimentConfig:
    """cfg with the suite's method_knobs filled in where the experiment leaves the knob unset (sections of the run's
    methods only); ConfigError naming suite.yaml for an unknown section or knob or an invalid value."""
    _check(suite)
    users, data, filled = section_users(), cfg.model_dump(exclude_unset=True), False
    for section, knobs in suite.method_knobs.items():
        if not set(users[section]) & set(cfg.methods):
            continue
        current = getattr(cfg, section)
        for key, value in knobs.items():
            if knob_field(type(current), key) not in current.model_fields_set:
                data.setdefault(section, {})[key], filled = value, True
    if not filled:
        return cfg
    try:
        return ExperimentConfig(**data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, f"{display(suite.file)}: method_knobs", set())) from None


def strength(cfg: ExperimentConfig, suite, method: str) -> dict[str, Any] | None:
    """{"knob", "value", "source"} of the method's strength knob (None for a method without one). The source follows
    from the value alone (suite: the suite's tuned value; default: the knob's default; experiment: anything else), so
    a resumed run, whose recorded config sets every knob, reports the same."""
    knob = METHODS[method].strength
    if knob is None:
        return None
    section, key = knob.split(".")
    model = getattr(cfg, section)
    name = knob_field(type(model), key)
    value = getattr(model, name)
    field = type(model).model_fields[name]
    tuned = suite.method_knobs.get(section, {})
    if key in tuned and value == TypeAdapter(field.annotation).validate_python(tuned[key]):
        source = "suite"
    else:
        source = "default" if value == field.default else "experiment"
    return {"knob": knob, "value": value, "source": source}
