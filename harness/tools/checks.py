"""A verification check's result, as `harness verify` prints it (harness/tools/verify.py, verify_merge.py)."""

from __future__ import annotations

from dataclasses import dataclass

OK, FAIL, SKIP = "ok", "FAIL", "skipped"


@dataclass
class Check:
    name: str
    status: str
    detail: str
