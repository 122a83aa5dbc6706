"""An experiment config from a YAML file and command-line flags: parsing, nesting, validation, error messages.

The knobs themselves (type, default, help) are declared once, in harness/config_fields.py; the CLI builds its flags
from `cli_fields()` here (--rank, --olora-lambda-orth, and LoRI's old names such as --mask-density as aliases).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from harness.config import ExperimentConfig
from harness.errors import ConfigError
from harness.parsing import parse_bool


def parse_grid(raw: str) -> dict[str, list[str]]:
    """ "lr_lora=1e-3,2e-3;warmup_steps=0,5" -> {"lr_lora": ["1e-3", "2e-3"], "warmup_steps": ["0", "5"]}."""
    out: dict[str, list[str]] = {}
    for part in (p.strip() for p in raw.split(";") if p.strip()):
        key, sep, values = part.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f'--grid: {part!r} is not knob=v1,v2 (e.g. --grid "lr_lora=1e-3,2e-3;warmup_steps=0,5")')
        out[key.strip().replace("-", "_")] = [v.strip() for v in values.split(",") if v.strip()]
    return out


def _section_model(field) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def cli_fields() -> list[tuple[str, Any]]:
    """(dest, FieldInfo) for every knob in definition order; a method section's knobs are "section.knob".

    The CLI builds its flags from this: --rank, --olora-lambda-orth, ..."""
    out = []
    for name, field in ExperimentConfig.model_fields.items():
        sub = _section_model(field)
        if sub is None:
            out.append((name, field))
        else:
            out.extend(
                (f"{name}.{f.alias or k}", f) for k, f in sub.model_fields.items()
            )  # ewc.lambda: alias of lambda_
    return out


def _field(dest: str):
    top, _, sub = dest.partition(".")
    field = ExperimentConfig.model_fields[top]
    return next(f for k, f in _section_model(field).model_fields.items() if (f.alias or k) == sub) if sub else field


def parse_cli_value(name: str, raw: str) -> Any:
    """Turn a CLI string into what the config field expects (comma lists, booleans); pydantic checks the rest."""
    if name == "grid":
        return parse_grid(raw)
    ann = str(_field(name).annotation)
    if ann.startswith("list") or "list[" in ann:
        return [x.strip() for x in raw.split(",") if x.strip()]
    if ann == "<class 'bool'>":
        parsed = parse_bool(raw)
        return raw if parsed is None else parsed  # pydantic complains about anything else
    if raw.lower() in ("none", "null") and "None" in ann:
        return None
    return raw


def nest_overrides(flat: dict[str, Any]) -> dict[str, Any]:
    """{"olora.lambda_orth": 1} -> {"olora": {"lambda_orth": 1}} (flags of method sections)."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        top, _, sub = k.partition(".")
        if sub:
            out.setdefault(top, {})[sub] = v
        else:
            out[k] = v
    return out


def format_errors(err: ValidationError, source: str, cli_keys: set[str]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(config)"
        nested, top = ".".join(str(p) for p in e["loc"][:2]), (str(e["loc"][0]) if e["loc"] else "")
        flag = nested if nested in cli_keys else top
        where = f"--{flag.replace('.', '-').replace('_', '-')}" if flag in cli_keys else f"{source}: {loc}"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            known = ", ".join(ExperimentConfig.model_fields)
            msg = f"unknown key (known keys: {known})"
        elif e["type"] == "literal_error":
            msg = f"{msg}; got {e.get('input')!r}"
        lines.append(f"{where}: {msg}")
    return "invalid experiment config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (optional), apply CLI overrides, validate; ConfigError names file and key."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found. Pass an existing YAML file, or omit it to use defaults.")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of config keys, got {type(loaded).__name__}")
        data.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    flat = overrides or {}
    for k, v in nest_overrides(flat).items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}  # a flag overrides one knob of a YAML section, not the section
        else:
            data[k] = v
    try:
        return ExperimentConfig(**data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source, set(flat))) from None
