"""LoRI's knobs (methods lori-d and lori-s): the config section `lori`, like every other method's section.

Until 2026-12 these knobs sat at the top level of the config (`mask_density: 0.1`, `--mask-density`). Those
names still work (LoRID.flat_knobs; the shim is harness/legacy_keys.py).
"""

from __future__ import annotations

from typing import Literal

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
