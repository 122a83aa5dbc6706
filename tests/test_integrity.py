"""Integrity: every committed file is hashed at commit; a changed byte is named by `harness verify` and refused (exit 2)
by export, resume and report; folders from before hashes keep working."""

import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.integrity import IntegrityError, check_recorded, folder_hashes
from harness.methods.lori import stage_files as SF

RUN = [
    "--suite",
    "smoke",
    "--model",
    "tiny-llama",
    "--seeds",
    "0",
    "--methods",
    "lori-s",
    "--epochs",
    "1",
    "--no-progress",
    "--no-report",
]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def stage(seq: Path, t: int) -> Path:
    return next((seq / "stages").glob(f"{t}-*"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished LoRI-S smoke sequence; each test works on its own copy."""
    results = tmp_path_factory.mktemp("integrity")
    assert main(["run", *RUN, "--results-dir", str(results), "--experiment", "ig"]) == 0
    return results


@pytest.fixture
def seq(finished, tmp_path):
    results = tmp_path / "r"
    shutil.copytree(finished, results)
    return results / "ig" / "lori-s" / "seed-0"


def test_a_commit_marker_records_the_sha256_of_every_other_file(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "w.bin").write_bytes(b"weights")
    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "stage.json").write_text("{}")
    recorded = folder_hashes(tmp_path, exclude=frozenset({"stage.json"}))
    assert set(recorded) == {"adapter/w.bin", "eval.json"}
    assert check_recorded(tmp_path, recorded, tmp_path / "stage.json", "redo it") is True
    assert (
        check_recorded(tmp_path, None, tmp_path / "stage.json", "redo it") is False
    )  # no hashes recorded: read as before
    (tmp_path / "adapter" / "w.bin").write_bytes(b"weightz")
    with pytest.raises(IntegrityError, match=r"adapter/w.bin: SHA-256 differs .* redo it"):
        check_recorded(tmp_path, recorded, tmp_path / "stage.json", "redo it")
    (tmp_path / "eval.json").unlink()
    with pytest.raises(IntegrityError, match=r"eval.json: missing"):
        check_recorded(tmp_path, {"eval.json": recorded["eval.json"]}, tmp_path / "stage.json", "redo it")


@pytest.mark.slow
def test_verify_passes_on_a_finished_sequence(seq, capsys):
    assert main(["verify", str(seq)]) == 0
    out = capsys.readouterr().out
    for check in ("hashes", "masks", "metrics", "mlflow"):
        assert f"  {check:<8} ok" in out, out
    assert "A regenerated from seed 0 matches at 3 stage(s)" in out and out.strip().endswith(
        "1 sequence folder(s) checked"
    )


@pytest.mark.slow
def test_a_flipped_byte_is_named_by_verify_and_refused_by_export_resume_and_report(seq, tmp_path, capsys):
    values = stage(seq, 2) / SF.VALUES
    flip_byte(values)
    assert main(["verify", str(seq.parent.parent)]) == 1
    out = capsys.readouterr().out
    assert f"hashes   FAIL     {values} SHA-256 differs" in out and out.strip().splitlines()[-1].startswith("FAILED")

    assert main(["export", str(seq), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{values}: SHA-256 differs" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing is exported from a damaged stage"

    assert main(["resume", str(seq), "--no-report", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{values}: SHA-256 differs" in err and "and every later stage folder" in err
    )  # stage 2 of 3: not simply redone

    assert main(["report", "ig", "--results-dir", str(seq.parents[2])]) == 2
    assert f"{values}: SHA-256 differs" in capsys.readouterr().err


@pytest.mark.slow
def test_a_damaged_last_stage_is_redone_by_the_command_resume_prints(seq, capsys):
    evj = stage(seq, 3) / "eval.json"
    flip_byte(evj)
    assert main(["resume", str(seq), "--no-report", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{evj}: SHA-256 differs" in err
    assert f"`rm -r {stage(seq, 3)} && harness resume {seq}`" in err
    shutil.rmtree(stage(seq, 3))
    assert main(["resume", str(seq), "--no-report", "--no-progress"]) == 0
    assert main(["verify", str(seq)]) == 0, capsys.readouterr().out


@pytest.mark.slow
def test_verify_names_masks_that_overlap_and_metrics_that_disagree(seq, capsys):
    shutil.copyfile(stage(seq, 1) / SF.MASKS, stage(seq, 2) / SF.MASKS)  # stage 2 claims stage 1's positions
    summary = json.loads((seq / "summary.json").read_text())
    (seq / "summary.json").write_text(
        json.dumps({**summary, "acc": summary["acc"] + 0.25, "la": summary["la"] - 0.125})
    )
    assert main(["verify", str(seq)]) == 1
    out = capsys.readouterr().out
    assert "masks    FAIL     stage 2:" in out and "used by an earlier stage" in out
    assert "metrics  FAIL     summary.json acc" in out and "mlflow   FAIL     parent ACC" in out
    assert f"summary.json la = {summary['la'] - 0.125}, recomputed from the matrix" in out


@pytest.mark.slow
def test_folders_written_before_hashes_keep_working(seq, tmp_path, capsys):
    for marker in [*(seq / "stages").glob("*/stage.json"), seq / "summary.json"]:
        info = json.loads(marker.read_text())
        info.pop("sha256")
        marker.write_text(json.dumps(info))
    assert main(["verify", str(seq)]) == 0
    assert "hashes   skipped  no hashes recorded" in capsys.readouterr().out
    assert main(["export", str(seq), str(tmp_path / "out")]) == 0
    assert main(["resume", str(seq), "--no-report", "--no-progress"]) == 0
