"""Downloading a parent run's JSON artifacts (sequence or merge runs): parsed, or a note on why not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def download_json(client, run_id: str, name: str, available: set[str], dst: Path) -> tuple[Any, str | None]:
    """(parsed JSON or None, a note when it was expected but unreadable)."""
    if name not in available:
        return None, None
    try:
        local = client.download_artifacts(run_id, name, str(dst))
        with open(local, encoding="utf-8") as fh:
            return json.load(fh), None
    except Exception as exc:  # noqa: BLE001 - any download/parse failure falls back, with a note
        return None, f"{name} could not be read ({type(exc).__name__}: {exc})"


def download_jsons(client, run_id: str, names: tuple[str, ...], dst: Path, notes: list[str]) -> tuple[set[str], list[Any]]:
    """(artifact names, one parsed JSON or None per name); problems are appended to notes."""
    try:
        available = {a.path for a in client.list_artifacts(run_id)}
    except Exception as exc:  # noqa: BLE001 - the run's metrics still give the numbers
        available = set()
        notes.append(f"artifacts could not be listed ({type(exc).__name__}: {exc})")
    dst.mkdir(parents=True, exist_ok=True)
    parsed = []
    for name in names:
        value, note = download_json(client, run_id, name, available, dst)
        if note:
            notes.append(note)
        parsed.append(value)
    return available, parsed
