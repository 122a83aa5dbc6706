"""Names and orderings of methods and metrics, shared by the analysis and the report.

Method names, their display spelling, their order and whether a method is a reference row all come
from the method layer (harness.methods.METHODS, one definition). A method a run folder names but the
harness no longer knows (an old folder) keeps its raw name and sorts after the known ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness import metrics as MX
from harness.methods import METHODS


class _MatrixMetrics(Sequence):
    """The names of the metrics defined on the accuracy matrix, in harness.metrics.TABLE's order, read when used."""

    def __getitem__(self, i):
        return [m.name for m in MX.table("matrix")][i]

    def __len__(self) -> int:
        return len(MX.table("matrix"))

    def __repr__(self) -> str:
        return repr(tuple(self))


class _Directions(Mapping):
    """Metric name -> whether higher is better, for every metric in harness.metrics.TABLE, read when used."""

    def __getitem__(self, name: str) -> bool:
        for m in MX.TABLE:
            if m.name == name:
                return m.higher_is_better
        raise KeyError(name)

    def __iter__(self):
        return iter([m.name for m in MX.TABLE])

    def __len__(self) -> int:
        return len(MX.TABLE)


# The report's metric columns (ACC, BWT, FWT, forgetting, LA, and any metric added to the table) and their directions.
METRICS = _MatrixMetrics()
HIGHER_IS_BETTER = _Directions()
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
