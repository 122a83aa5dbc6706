"""Integrity of committed folders: the SHA-256 of every file, recorded when the folder is committed, checked when read.

A stage folder's commit marker (stage.json) holds `sha256: {relative path: hex digest}` of every other file
in the folder; a merge adapter folder's marker (train.json) and a finished sequence's summary.json do the
same for the files written before them. A flipped byte on a shared file system or a partial copy between
machines is then caught by whoever reads the folder (resume, export, merge, report, `harness verify`)
instead of flowing silently into an adapter or a table. Folders committed before hashes were recorded
have no `sha256` key: they are read as before and reported as "no hashes recorded".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from harness.errors import HarnessError

HASHES = "sha256"  # the key of the digests in a commit marker
_CHUNK = 1 << 20


class IntegrityError(HarnessError):
    """A committed file that no longer matches the digest recorded at its commit (or is missing)."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_hashes(folder: Path, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """SHA-256 of every file under folder (recursively), keyed by its path relative to folder, but for `exclude`."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in exclude
    }


def file_hashes(folder: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of the named files of folder that exist (a sequence's top-level results)."""
    return {n: file_sha256(Path(folder) / n) for n in names if (Path(folder) / n).is_file()}


def mismatches(folder: Path, recorded: dict[str, str]) -> list[tuple[Path, str]]:
    """(file, what is wrong) for each recorded file that is missing or whose digest differs; [] when all match."""
    out = []
    for rel, digest in sorted(recorded.items()):
        p = Path(folder) / rel
        if not p.is_file():
            out.append((p, "missing"))
        elif file_sha256(p) != digest:
            out.append((p, "SHA-256 differs from the one recorded at commit"))
    return out


def check_recorded(folder: Path, recorded: dict[str, str] | None, marker: Path, todo: str) -> bool:
    """Raise IntegrityError naming the first bad file; True when verified, False when no hashes were recorded.

    todo: what the reader should do about it (the error's last sentence)."""
    if recorded is None:
        return False
    bad = mismatches(folder, recorded)
    if bad:
        path, what = bad[0]
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        raise IntegrityError(
            f"{path}: {what}{more}, so it changed after {marker.name} was written (a flipped bit, "
            f"a partial copy). {todo}"
        )
    return True


def redo_hint(run_dir: Path, stage_dir: Path, last: bool) -> str:
    """What to do about a damaged stage: redo it when it is the sequence's last committed one, else restore a copy."""
    if last:
        return (
            f"It is the last committed stage: to redo it, delete that stage folder and continue: "
            f"`rm -r {stage_dir} && harness resume {run_dir}`."
        )
    return (
        f"Restore {stage_dir} from a good copy; or delete it and every later stage folder, then "
        f"`harness resume {run_dir}` redoes them."
    )
