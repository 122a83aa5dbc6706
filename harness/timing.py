"""Wall-clock timing of one call, for the seconds a stage records (stage.json)."""

from __future__ import annotations

import time
from typing import Any, Callable


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn(*args, **kwargs), the seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
