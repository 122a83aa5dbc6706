"""Names and orderings of methods and metrics, shared by every part of the report."""

from __future__ import annotations

from typing import Any

METRICS = ("ACC", "BWT", "FWT", "forgetting")
# Higher is better for ACC/BWT/FWT, lower is better for forgetting.
HIGHER_IS_BETTER = {"ACC": True, "BWT": True, "FWT": True, "forgetting": False}
METHOD_ORDER = ("lori-s", "lori-d", "lora")
DISPLAY_NAMES = {"lori-s": "LoRI-S", "lori-d": "LoRI-D", "lora": "LoRA"}


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


def method_sort_key(method: str) -> tuple[int, str]:
    """Known methods in METHOD_ORDER, then the rest alphabetically."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def num_sort_key(value: str) -> tuple[int, Any]:
    """Seeds and orders are strings: sort "10" after "2", and non-numbers last."""
    try:
        return (0, int(value))
    except (TypeError, ValueError):
        return (1, str(value))


def uniq(values) -> list[str]:
    """Distinct non-empty values as strings, in numeric order."""
    return sorted({str(v) for v in values if v not in (None, "")}, key=num_sort_key)
