"""A full disk (ENOSPC) during a checkpoint or a commit: one message with what was needed and where, exit 2, no
traceback, nothing half-written, the committed stages intact (they verify), and the run continues once there is space.

The disk is a real small tmpfs (mounting needs root; the tests are skipped, loudly, where mount is refused)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import DiskFullError
from harness.io import atomic_dir, atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "--suite",
    "smoke",
    "--model",
    "tiny-llama",
    "--seeds",
    "0",
    "--no-progress",
    "--no-report",
    "--methods",
    "lori-s",
    "--epochs",
    "3",
    "--checkpoint-every",
    "5",
]


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(
            f"!!! disk-full tests NOT RUN: cannot mount a tmpfs here ({out.stderr.strip()}); they need root !!!"
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Write a ballast file until the disk is full (not one byte left)."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return ballast


def test_a_commit_on_a_full_disk_leaves_nothing_half_written_and_the_previous_folder_intact(small_disk):
    stage = small_disk / "stages" / "1-parity"
    with atomic_dir(stage) as tmp:
        (tmp / "eval.json").write_text('{"ok": true}')
    fill(small_disk)
    with pytest.raises(
        DiskFullError,
        match=r"no space left on the disk of .*stages \(0 B free\) while writing 1-parity/, "
        r"which needs about 1\.0 MB",
    ):
        with atomic_dir(stage, need=1_000_000) as tmp:
            (tmp / "values.safetensors").write_bytes(b"\1" * 1_000_000)
    assert (stage / "eval.json").read_text() == '{"ok": true}'
    assert not [p for p in stage.parent.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(DiskFullError, match="while writing summary.json, which needs about 300 B"):
        atomic_write_bytes(small_disk / "summary.json", b"x" * 300)
    assert not list(small_disk.glob(".summary.json.*")) and not (small_disk / "summary.json").exists()


@pytest.mark.slow
def test_disk_full_during_a_run_is_exit_2_without_traceback_and_the_run_continues_once_space_is_freed(
    small_disk, tmp_path
):
    results = small_disk / "results"
    seq = results / "full" / "lori-s" / "seed-0"
    store = [
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # the mirror elsewhere: this is about the run folder
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_FAULT_PAUSE": "between-stages:1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            *RUN,
            *store,
            "--results-dir",
            str(results),
            "--experiment",
            "full",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (seq / ".paused-between-stages").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    ballast = fill(small_disk)
    (seq / ".paused-between-stages").unlink()  # stage 2 now starts on a full disk
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert (
        "no space left on the disk of" in line
        and "stage 2" in line
        and "needs about" in line
        and "Free space there" in line
    )
    assert not list(seq.rglob(".tmp-*")) and not (seq / "checkpoint").exists()
    assert sorted(p.name.split("-")[0] for p in (seq / "stages").iterdir()) == ["0", "1"]
    verify = subprocess.run(
        [sys.executable, "-m", "harness.cli", "verify", str(seq)], cwd=ROOT, capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    ballast.unlink()
    out = subprocess.run(
        [sys.executable, "-m", "harness.cli", "resume", str(seq), "--no-report", "--no-progress", *store],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    verify = subprocess.run(
        [sys.executable, "-m", "harness.cli", "verify", str(seq)], cwd=ROOT, capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout
