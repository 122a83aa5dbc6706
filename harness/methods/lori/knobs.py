"""LoRI's knobs (methods lori-d and lori-s): the config section `lori`, like every other method's section.

Until 2026-12 these knobs sat at the top level of the config (`mask_density: 0.1`, `--mask-density`). Those
names still work in YAML, in flags, in grids and in older run folders' config.yaml: `upgrade_flat_keys` moves
them into the section, and the config says so once per key (a one-line deprecation note on stderr).
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SECTION = "lori"


class LoRIKnobs(BaseModel):
    """How LoRI's frozen A is shared and how LoRI-S's masks are chosen (defaults: the LoRI reference)."""

    model_config = ConfigDict(extra="forbid")

    a_mode: Literal["shared", "per_task"] = Field(
        "shared", description="shared: one frozen A, one adapter continued; per_task: a fresh A_t and B_t per task."
    )
    mask_strategy: Literal["random", "magnitude"] = Field(
        "random", description="lori-s masks: random (uniform) or magnitude (calibrate LoRI-D, keep top-k |B|)."
    )
    mask_density: float = Field(0.1, gt=0, le=1, description="Fraction of B entries trainable per task (lori-s).")
    mask_scope: Literal["global", "module"] = Field(
        "global", description="Magnitude top-k across all modules (global, as the paper) or per module."
    )
    calibration_steps: int | None = Field(
        None, ge=1, description="LoRI-D steps to calibrate a magnitude mask (default: the task's full budget)."
    )
    overlap_policy: Literal["disjoint", "max_overlap", "independent"] = Field(
        "disjoint", description="How task t's mask may reuse positions of earlier masks."
    )
    max_overlap: float = Field(
        0.0, ge=0, le=1, description="With overlap_policy max_overlap: max fraction of M_t already used earlier."
    )

    @model_validator(mode="after")
    def _overlap(self) -> "LoRIKnobs":
        if self.overlap_policy != "max_overlap" and self.max_overlap != 0.0:
            raise ValueError("max_overlap is only used with overlap_policy: max_overlap")
        return self


FLAT_KEYS = tuple(LoRIKnobs.model_fields)  # their names before the section existed
_noted: set[str] = set()


def _note(key: str) -> None:
    if key not in _noted:
        _noted.add(key)
        flag = key.replace("_", "-")
        sys.stderr.write(f"note: `{key}` is now `{SECTION}.{key}` (YAML `{SECTION}: {{{key}: ...}}`, flag --{SECTION}-{flag}); "
                         "the old name still works\n")


def upgrade_flat_keys(data: dict[str, Any], *, runs_lori: bool = True, note: bool = True) -> dict[str, Any]:
    """A config mapping with LoRI's old top-level keys (and grid keys) moved into the `lori` section.

    A knob given both ways is refused. Without a LoRI method in the run (runs_lori false) the old keys are
    dropped, as they always did nothing there (the section would be refused as knobs of an absent method)."""
    flat = [k for k in FLAT_KEYS if k in data]
    grid = data.get("grid") if isinstance(data.get("grid"), dict) else None
    old_grid = [k for k in (grid or {}) if k in FLAT_KEYS]
    if not flat and not old_grid:
        return data
    out = dict(data)
    if grid is not None and old_grid:
        out["grid"] = {(f"{SECTION}.{k}" if k in FLAT_KEYS else k): v for k, v in grid.items()}
    section = out.get(SECTION)
    section = dict(section.model_dump() if isinstance(section, BaseModel) else section or {})
    for k in flat:
        value = out.pop(k)
        if k in section and section[k] != value:
            raise ValueError(f"{k} and {SECTION}.{k} both given; keep {SECTION}.{k}")
        section[k] = value
    for k in [*flat, *old_grid]:
        if note:
            _note(k)
    if runs_lori or SECTION in data:
        out[SECTION] = section
    return out


def flat_name(key: str) -> str:
    """A knob's name as variant ids hash it: LoRI's knobs under their old top-level names, so a sweep over
    mask_density keeps its variant-<id>/ folders whichever way it is written."""
    top, _, sub = key.partition(".")
    return sub if top == SECTION and sub in FLAT_KEYS else key
