"""Knob names from before method sections: the one shim that still reads them.

Until 2026-12 LoRI's knobs sat at the top level of the config (`mask_density: 0.1`, `--mask-density`). A method
whose knobs once were top-level keys says so (`Method.flat_knobs`); their old names still work in YAML, in flags, in
grids and in older run folders' config.yaml: `upgrade_flat_keys` moves them into the method's section, and says so
once per key (a one-line deprecation note on stderr). Nothing else in the harness knows these names.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel

from harness.methods import METHODS


def _flat_sections() -> dict[str, str]:
    """old top-level name -> its section, for every method with flat_knobs."""
    out: dict[str, str] = {}
    for m in METHODS.values():
        if m.flat_knobs and m.section:
            for k in m.knobs.model_fields:
                out.setdefault(k, m.section)
    return out


FLAT: dict[str, str] = _flat_sections()
_noted: set[str] = set()


def _note(key: str) -> None:
    if key not in _noted:
        _noted.add(key)
        section, flag = FLAT[key], key.replace("_", "-")
        sys.stderr.write(
            f"note: `{key}` is now `{section}.{key}` (YAML `{section}: {{{key}: ...}}`, flag --{section}-{flag}); "
            "the old name still works\n"
        )


def _runs(section: str, methods: Any, absent_methods_run: bool) -> bool:
    if not isinstance(methods, list):
        return absent_methods_run
    return any(m in METHODS and METHODS[m].section == section for m in methods)


def upgrade_flat_keys(data: dict[str, Any], *, absent_methods_run: bool = True, note: bool = True) -> dict[str, Any]:
    """A config mapping with old top-level knob names (and grid keys) moved into their sections.

    A knob given both ways is refused (ValueError). When no method of the section is in the run's `methods` (or
    `methods` is absent and not absent_methods_run), the old keys are dropped, as they always did nothing there (the
    section would be refused as knobs of an absent method)."""
    flat = [k for k in FLAT if k in data]
    grid = data.get("grid") if isinstance(data.get("grid"), dict) else None
    old_grid = [k for k in (grid or {}) if k in FLAT]
    if not flat and not old_grid:
        return data
    out = dict(data)
    if grid is not None and old_grid:
        out["grid"] = {(f"{FLAT[k]}.{k}" if k in FLAT else k): v for k, v in grid.items()}
    sections: dict[str, dict[str, Any]] = {}
    for k in flat:
        name = FLAT[k]
        if name not in sections:
            current = out.get(name)
            sections[name] = dict(current.model_dump() if isinstance(current, BaseModel) else current or {})
        value = out.pop(k)
        if k in sections[name] and sections[name][k] != value:
            raise ValueError(f"{k} and {name}.{k} both given; keep {name}.{k}")
        sections[name][k] = value
    for k in [*flat, *old_grid]:
        if note:
            _note(k)
    for name, section in sections.items():
        if _runs(name, data.get("methods"), absent_methods_run) or name in data:
            out[name] = section
    return out


def flat_name(key: str) -> str:
    """A knob's name as variant ids hash it: a section's knob under its old top-level name, so a sweep over
    mask_density keeps its variant-<id>/ folders whichever way it is written."""
    top, _, sub = key.partition(".")
    return sub if FLAT.get(sub) == top else key


def old_flags(dest: str) -> list[str]:
    """Flags a knob also answers to: its old top-level name (--mask-density for lori.mask_density)."""
    top, _, sub = dest.partition(".")
    return [f"--{sub.replace('_', '-')}"] if sub and FLAT.get(sub) == top else []
