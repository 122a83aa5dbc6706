"""Numbers in the report: finiteness, text formatting, JSON-safe conversion."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def json_clean(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (json.dumps(allow_nan=False) safe)."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def fmt(x: Any, digits: int = 3) -> str:
    return f"{float(x):.{digits}f}" if finite(x) else "—"


def fmt_pm(mean: Any, std: Any, digits: int = 3) -> str:
    """Mean ± std as text; just the mean when std is undefined, a dash when the mean is."""
    if not finite(mean):
        return "—"
    if finite(std):
        return f"{float(mean):.{digits}f} ± {float(std):.{digits}f}"
    return f"{float(mean):.{digits}f}"


def fmt_count(x: Any) -> str:
    """A parameter count in three significant digits with k/M/B."""
    if not finite(x):
        return "—"
    x = float(x)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"
