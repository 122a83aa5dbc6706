"""General-ability forgetting: the cross-entropy on the fixed general text, per stage and method.

Each finished sequence's summary.json holds general_ce (one value per stage, stage 0 = the base model),
general_ce_base and general_ce_rise (after the last stage − base; harness/general_text.py). Runs written
before it existed have none and are left out of these numbers (the page says when no run has them).
"""

from __future__ import annotations

import numpy as np

from harness.analysis.numbers import finite
from harness.analysis.runs import SequenceRun


def _curve(run: SequenceRun) -> list[float]:
    vals = (run.summary or {}).get("general_ce") or []
    return [float(v) if finite(v) else float("nan") for v in vals]


def curves(by_method: dict[str, list[SequenceRun]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """method -> (mean, std) of the cross-entropy per stage over its runs that logged it (reference runs left out)."""
    out = {}
    for method, runs in by_method.items():
        cs = [_curve(r) for r in runs if not r.reference and _curve(r)]
        if not cs:
            continue
        n = max(len(c) for c in cs)
        stack = np.full((len(cs), n), np.nan)
        for k, c in enumerate(cs):
            stack[k, : len(c)] = c
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(stack, axis=0)
            std = np.nanstd(stack, axis=0, ddof=1) if len(cs) > 1 else np.full(n, np.nan)
        out[method] = (mean, std)
    return out
