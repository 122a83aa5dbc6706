"""Names and orderings of methods and metrics, shared by the analysis and the report.

Method names, their display spelling, their order and whether a method is a reference row all come
from the method layer (harness.methods.METHODS, one definition). A method a run folder names but the
harness no longer knows (an old folder) keeps its raw name and sorts after the known ones.
"""

from __future__ import annotations

from typing import Any

from harness.methods import METHODS

METRICS = ("ACC", "BWT", "FWT", "forgetting", "LA")
# Higher is better for ACC/BWT/FWT and LA (learning accuracy: plasticity), lower is better for forgetting.
HIGHER_IS_BETTER = {"ACC": True, "BWT": True, "FWT": True, "forgetting": False, "LA": True}
# How a reference method (e.g. multi-task training) is marked wherever it appears.
REFERENCE_LABEL = "reference (upper bound)"


def method_order() -> tuple[str, ...]:
    """The known methods in the order the method layer lists them."""
    return tuple(METHODS)


def display_name(method: str) -> str:
    cls = METHODS.get(method)
    return getattr(cls, "display", None) or method


def is_reference_method(method: str) -> bool:
    """Whether the method layer defines `method` as a reference row (never ranked)."""
    return bool(getattr(METHODS.get(method), "reference", False))


def method_sort_key(method: str) -> tuple[int, str]:
    """Known methods in the method layer's order, then the rest alphabetically."""
    order = method_order()
    return (order.index(method) if method in order else len(order), method)


def num_sort_key(value: str) -> tuple[int, Any]:
    """Seeds and orders are strings: sort "10" after "2", and non-numbers last."""
    try:
        return (0, int(value))
    except (TypeError, ValueError):
        return (1, str(value))


def uniq(values) -> list[str]:
    """Distinct non-empty values as strings, in numeric order."""
    return sorted({str(v) for v in values if v not in (None, "")}, key=num_sort_key)
