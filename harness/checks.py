"""A verification check's result, as `harness verify` prints it (tools/verify.py, tools/verify_merge.py, and a method's own checks: Method.checks)."""

from __future__ import annotations

from dataclasses import dataclass

OK, FAIL, SKIP = "ok", "FAIL", "skipped"


@dataclass
class Check:
    name: str
    status: str
    detail: str
