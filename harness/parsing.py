"""Small values from strings (flags, environment variables)."""

from __future__ import annotations


def parse_bool(raw: str) -> bool | None:
    """True/False for 1/true/yes/on and 0/false/no/off (any case), None for anything else."""
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    return None
