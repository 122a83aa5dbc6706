"""Continual-learning methods, one module each, behind the interface in base.py.

Adding a method: a module with a subclass of Method decorated with `@register` (set name, display, summary,
source; override the verbs it changes; its knobs as a pydantic model `knobs` with a `section` name; its own
learning-rate family with `lr_method = name` and `lr_default`). Config sections, lr_<family> knobs, CLI flags and
`harness methods` are built from the registry. A module inside this package is imported below; one outside it is
named in $HARNESS_METHODS (importable module names, comma-separated), which every process of a run imports before
the config is built (docs/methods.md).
"""

from __future__ import annotations

import importlib
import os
import sys

# The built-in methods register themselves when their modules are imported.
from harness.methods import ewc, inclora, inflora, lora, migu, mtl, nlora, osf, replay, sdlora  # noqa: F401
from harness.methods.base import REGISTRY, Method, StageContext, register
from harness.methods.lori import method as lori_method  # noqa: F401

PLUGINS_ENV = "HARNESS_METHODS"


def _import_plugins() -> None:
    """Import the modules $HARNESS_METHODS names; one that cannot be imported stops the process with one message and
    exit code 2 (it happens while the config is built, before any command could report it)."""
    for name in (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(
                f"error: ${PLUGINS_ENV} names {name!r}, which cannot be imported ({exc}); put its folder on PYTHONPATH "
                f"or install it, or remove it from ${PLUGINS_ENV}",
                file=sys.stderr,
            )
            raise SystemExit(2) from exc


_import_plugins()
_ORDER = (
    "lori-s",
    "lori-d",
    "lora",
    "inclora",
    "olora",
    "replay",
    "mtl",
    "nlora",
    "inflora",
    "ewc",
    "migu",
    "sdlora",
    "osf",
)
METHODS: dict[str, type[Method]] = {**{n: REGISTRY[n] for n in _ORDER}, **REGISTRY}
BUILT_IN = _ORDER  # the methods this package ships (the all-methods table's rows), before any plugin

# Learning-rate families: each method that starts one (lr_method == its name) and its default rate.
LR_FAMILIES: dict[str, float] = {m.lr_method: m.lr_default for m in METHODS.values() if m.lr_default is not None}
_orphans = sorted({m.name for m in METHODS.values() if m.lr_method not in LR_FAMILIES})
if _orphans:
    raise ValueError(
        f"methods {_orphans} train at a learning-rate family no method starts (set lr_default on the "
        f"method named by their lr_method)"
    )

__all__ = ["LR_FAMILIES", "METHODS", "Method", "StageContext", "get_method", "lr_knob", "register"]


def lr_knob(family: str) -> str:
    """The config knob of a learning-rate family: lora -> lr_lora, lori-s -> lr_lori_s."""
    return "lr_" + family.replace("-", "_")


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
