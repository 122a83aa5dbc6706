"""Where suites live (the suites folder, a name or path -> suite.yaml) and how paths read in messages."""

from __future__ import annotations

import os
import re
from pathlib import Path

import harness
from harness.errors import SuiteError

SUITE_FILE = "suite.yaml"
# A suite's name is also its folder's name, so the same rule decides what resolves as a name.
SUITE_NAME_RE = re.compile(r"^[a-z0-9_-]+$")


def suites_dir() -> Path:
    """Folder that suite names resolve in: $HARNESS_SUITES_DIR, else <repo>/task_suites."""
    env = os.environ.get("HARNESS_SUITES_DIR")
    if env:
        return Path(env).expanduser().resolve()

    return Path(harness.__file__).resolve().parent.parent / "task_suites"


def display(path: Path) -> str:
    """A path as short as possible for messages (relative to the cwd when inside it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def resolve_suite_file(name_or_path: str | Path) -> Path:
    """The suite.yaml of a suite name, a suite folder or a suite.yaml path; SuiteError naming the known suites."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        if (p / SUITE_FILE).is_file():
            return (p / SUITE_FILE).resolve()
        raise SuiteError(f"{display(p)}: no {SUITE_FILE} in this folder")
    name = str(name_or_path)
    if SUITE_NAME_RE.match(name):
        cand = suites_dir() / name / SUITE_FILE
        if cand.is_file():
            return cand.resolve()
    known = ", ".join(sorted(d.name for d in suites_dir().glob("*") if (d / SUITE_FILE).is_file())) or "none"
    raise SuiteError(
        f"suite {name!r}: not a suite name in {display(suites_dir())} (known: {known}) "
        f"nor a path to a suite folder or {SUITE_FILE}"
    )
