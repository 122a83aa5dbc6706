"""Several processes on one stage (torchrun, gloo on CPU): the one-process result, rank 0 alone writes, resume, errors.

Multi-process runs go through `python -m torch.distributed.run` (torchrun) exactly as a user launches them,
on the smoke suite's first two tasks with LoRI-S; every wait is bounded. One DDP sequence is killed (SIGKILL,
both workers) in the middle of stage 2 and resumed with two processes; one FSDP2 sequence likewise.

Tolerance: two processes sum the global batch's gradient as two half-batch sums (all-reduce) and pad each
half to its own length, so trained values differ from the one-process run by float rounding only (measured
≤ 5e-7 on values of ~0.08 after 8 steps, DDP and FSDP alike; asserted ≤ 2e-5; losses ≤ 1e-4). The accuracy
matrix came out identical and is asserted exactly; masks and A are identical by construction (seeded).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sequence import mlflow_client, read_matrix

from harness import distributed as D
from harness.errors import ConfigError, HarnessError
from harness.losses import lm_loss
from harness.methods.lori.stage_files import load_masks
from harness.run.batches import collate, rank_batch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
ARGS = [
    "--suite",
    "smoke",
    "--model",
    "tiny-llama",
    "--seeds",
    "0",
    "--methods",
    "lori-s",
    "--tasks",
    "parity,weather",
    "--eval-limit",
    "16",
    "--checkpoint-every",
    "3",
    "--no-progress",
    "--no-report",
]
SEQ = Path("dist") / "lori-s" / "seed-0"
STAGES = ["1-parity", "2-weather"]
HASH_LINE = re.compile(r"\[rank (\d)/2\] \[[^\]]+\] stage (\d+) state hash ([0-9a-f]{64})")


def torchrun(*args, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(
        [*TORCHRUN, "-m", "harness.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def children_of(pid: int) -> list[int]:
    """Direct children (torchrun starts each worker in its own session: killing torchrun's group misses them)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_values(results: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {s: load_file(str(results / SEQ / "stages" / s / "values.safetensors")) for s in STAGES}


def assert_close_to(results: Path, reference: Path):
    """Same matrix, same masks and A, trained values and losses equal up to the stated tolerance."""
    np.testing.assert_array_equal(
        read_matrix(results / SEQ / "matrix.csv")[1], read_matrix(reference / SEQ / "matrix.csv")[1]
    )
    for s in STAGES:
        mine, ref = results / SEQ / "stages" / s, reference / SEQ / "stages" / s
        m_mine, m_ref = load_masks(mine), load_masks(ref)
        assert m_mine.keys() == m_ref.keys() and all(torch.equal(m_mine[k], m_ref[k]) for k in m_ref)
        assert (
            json.loads((mine / "lori.json").read_text())["a_sha256"]
            == json.loads((ref / "lori.json").read_text())["a_sha256"]
        )
        l_mine, l_ref = (json.loads((d / "train.json").read_text())["losses"] for d in (mine, ref))
        np.testing.assert_allclose(l_mine, l_ref, rtol=0, atol=1e-4)
    for s, values in stage_values(results).items():
        for k, v in values.items():
            torch.testing.assert_close(v, stage_values(reference)[s][k], rtol=0, atol=2e-5)


def check_one_sequence_in_mlflow(results: Path):
    """Rank 0 alone logged: one FINISHED parent, one FINISHED child per stage, nothing twice."""
    c = mlflow_client(results)
    assert sorted(e.name for e in c.search_experiments()) == ["Default", "dist"]  # MLflow makes Default itself
    exp = c.get_experiment_by_name("dist")
    runs = c.search_runs([exp.experiment_id], "")
    parents = [r for r in runs if r.data.tags.get("harness.kind") == "sequence"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(r.data.tags["harness.stage"]) for r in children) == [1, 2] and len(runs) == 3
    assert all(r.info.status == "FINISHED" for r in children)


# --- the loss of a rank's share ----------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["token", "example"])
@pytest.mark.parametrize("world", [2, 3, 8])
def test_rank_losses_and_gradients_average_to_the_one_process_ones(reduction, world, monkeypatch):
    g = torch.Generator().manual_seed(0)
    vocab = 11
    table = torch.randn(
        vocab, vocab, generator=g, requires_grad=True
    )  # logits = table[input_ids]: rows depend on their token only
    items = [
        (torch.randint(1, vocab, (n,), generator=g).tolist(), p) for n, p in [(5, 2), (7, 6), (3, 1), (6, 3), (4, 4)]
    ]

    def loss_and_grad(batch, scale):
        table.grad = None
        loss = lm_loss(table[batch["input_ids"]], batch["labels"], reduction, scale=scale)
        loss.backward()
        return float(loss.detach()), table.grad.clone()

    ref_loss, ref_grad = loss_and_grad(collate(items, 0, "cpu"), None)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    shares = []
    for r in range(world):  # world 8 > 5 examples: three ranks get a zero-weight stand-in
        monkeypatch.setenv("RANK", str(r))
        shares.append(loss_and_grad(*rank_batch(items, 0, "cpu", reduction)))
    assert sum(s[0] for s in shares) / world == pytest.approx(ref_loss, rel=1e-6)
    torch.testing.assert_close(sum(s[1] for s in shares) / world, ref_grad, rtol=1e-5, atol=1e-7)


def test_a_global_batch_is_cut_into_contiguous_near_equal_slices():
    assert [D.shard(list(range(8)), r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [D.shard(list(range(5)), r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [D.shard([9], r, 3) for r in range(3)] == [[9], [], []]


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    D.init("auto")
    assert not torch.distributed.is_initialized() and D.is_main() and not D.is_distributed()
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.check_batch_size(7, "anywhere")  # any batch size fits one process


# --- refusals -------------------------------------------------------------------------------------------
def test_more_processes_than_gpus_on_a_node_is_refused_before_joining(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(HarnessError, match="4 processes were launched on this node but it has 2 CUDA device"):
        D.init("auto")
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        D.init("cuda:1")
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_batch_size_not_divisible_by_the_world_exits_2_on_every_rank_with_the_message(tmp_path):
    # Each worker as torchrun starts it (torchrun itself always exits 1 when a worker fails, and prints each exit code).
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harness.cli",
                "run",
                *ARGS,
                "--batch-size",
                "7",
                "--results-dir",
                str(tmp_path),
                "--experiment",
                "dist",
            ],
            cwd=ROOT,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={
                **os.environ,
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err[-2000:]
        assert "batch_size 7 is not divisible by the 2 processes" in err and "Traceback" not in err
    assert not (tmp_path / SEQ).exists()


def test_fsdp_refuses_a_method_that_acts_between_backward_and_step(monkeypatch):
    from harness.methods import METHODS, Method

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="olora .*extra_loss.*--distributed ddp"):
        D.check_fsdp_method(METHODS["olora"], Method, "fsdp")
    D.check_fsdp_method(METHODS["olora"], Method, "ddp")
    D.check_fsdp_method(METHODS["lori-s"], Method, "fsdp")  # hook-free: values scattered into B in the forward pass


def test_ranks_with_different_masks_fail_the_hash_check_on_every_rank():
    script = (
        "import os, torch; from harness import distributed as D; from harness.errors import HarnessError\n"
        "D.init('cpu'); r = D.rank()\n"
        "print('same', D.check_identical({'mask': torch.tensor([True, False]), 'w': torch.ones(3)}, 'masks'))\n"
        "try:\n    D.check_identical({'mask': torch.tensor([r == 0, True])}, 'stage 1 masks')\n"
        "except HarnessError as e:\n    print('refused', e)\n"
    )
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={
                **os.environ,
                "WORLD_SIZE": "2",
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    same = {re.search(r"same ([0-9a-f]{64})", o[0]).group(1) for o in outs}
    assert len(same) == 1
    for out, _ in outs:
        assert "refused stage 1 masks differ between ranks (rank 0 " in out and "rank 1 " in out


# --- end to end: two processes against one ----------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    from harness.cli import main

    results = tmp_path_factory.mktemp("one")
    assert main(["run", *ARGS, "--results-dir", str(results), "--experiment", "dist"]) == 0
    assert not torch.distributed.is_initialized()
    return results


# Installed in every worker through PYTHONPATH: a Python audit hook that logs each file the process opens for
# writing, creates, renames or deletes under the results folder, and each sqlite database it connects to.
AUDIT = """
import os, sys
_root = os.environ["AUDIT_ROOT"]
_log = open(f"{os.environ['AUDIT_LOG']}.{os.environ.get('RANK', 'x')}.{os.getpid()}", "w")  # a worker's subprocesses too
_EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "sqlite3.connect"}
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        if not ((mode and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
            return
    elif event not in _EVENTS:
        return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(_root):
        _log.write(event + " " + os.path.abspath(os.fsdecode(path)) + "\\n")
        _log.flush()
sys.addaudithook(_hook)
"""


def kill_mid_stage_2_and_resume(results: Path, *extra: str, env_extra=None) -> str:
    """Launch with torchrun, SIGKILL both workers after stage 2's first checkpoint (step 3), resume with torchrun.

    Returns both launches' stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_FAULT_PAUSE": "mid-train:2", **(env_extra or {})}
    proc = subprocess.Popen(
        [*TORCHRUN, "-m", "harness.cli", "run", *ARGS, *extra, "--results-dir", str(results), "--experiment", "dist"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    paused, deadline = results / SEQ / ".paused-mid-train", time.time() + 240
    try:
        while not paused.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, f"{paused} did not appear"
            time.sleep(0.1)
    finally:
        for pid in children_of(proc.pid):
            os.kill(pid, signal.SIGKILL)
        _, first = proc.communicate(timeout=60)
    assert (results / SEQ / "checkpoint" / "state.json").exists(), "rank 0 wrote a mid-stage checkpoint before the kill"
    out = torchrun("resume", str(results / SEQ), "--no-report", "--no-progress", env_extra=env_extra)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((results / SEQ / "stages" / STAGES[1] / "train.json").read_text())["resumed_from_step"] == 3
    assert not (results / SEQ / "checkpoint").exists()
    return first + out.stderr


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """DDP, 2 processes: stage 1, then a SIGKILL of both workers in the middle of stage 2, then a 2-process resume."""
    results, audit = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("audit")
    (audit / "sitecustomize.py").write_text(AUDIT)
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(audit), os.environ.get("PYTHONPATH")])),
        "AUDIT_ROOT": str(results),
        "AUDIT_LOG": str(audit / "writes"),
    }
    err = kill_mid_stage_2_and_resume(results, env_extra=env)
    return (
        results,
        err,
        {r: [w for f in audit.glob(f"writes.{r}.*") for w in f.read_text().splitlines()] for r in (0, 1)},
    )


@pytest.mark.slow
def test_every_rank_prints_the_same_state_hash_per_stage_and_stage_json_records_it(two_processes):
    results, err, _ = two_processes
    hashes: dict[int, dict[int, set[str]]] = {}
    for r, stage, h in HASH_LINE.findall(err):
        hashes.setdefault(int(stage), {}).setdefault(int(r), set()).add(h)
    assert sorted(hashes) == [1, 2]
    for stage, by_rank in hashes.items():  # stage 2 started twice (killed, resumed): the same hash both times
        assert sorted(by_rank) == [0, 1] and len(set.union(*by_rank.values())) == 1, by_rank
        info = json.loads((results / SEQ / "stages" / STAGES[stage - 1] / "stage.json").read_text())
        assert {info["state_hash"]} == by_rank[0] and info["world_size"] == 2 and info["distributed"] == "ddp"
        assert info["rank0_trainable_elements"] == info["mask/nnz"]  # DDP: every rank holds all trainable values


@pytest.mark.slow
def test_two_processes_resumed_after_a_kill_give_the_one_process_matrix_and_weights(two_processes, one_process):
    assert_close_to(two_processes[0], one_process)


@pytest.mark.slow
def test_two_processes_keep_the_mask_invariants_in_the_files(two_processes, tmp_path):
    """Read back from the stage files: B is zero outside M_1 ∪ .. ∪ M_t, M_1's entries of B are unchanged by stage 2, A never moves."""
    from harness.run.export import export_adapter

    seq = two_processes[0] / SEQ
    masks = [load_masks(seq / "stages" / s) for s in STAGES]
    adapters = [
        load_file(str(export_adapter(seq, tmp_path / s, stage=t) / "adapter_model.safetensors"))
        for t, s in enumerate(STAGES, 1)
    ]
    for k, m1 in masks[0].items():
        m2 = masks[1][k]
        assert not (m1 & m2).any(), "disjoint masks overlap"
        a_key = k.replace("lora_B", "lora_A")  # masks are keyed like the exported lora_B weights
        B1, B2 = adapters[0][k], adapters[1][k]
        assert (B1[~m1] == 0).all() and (B2[~(m1 | m2)] == 0).all()
        assert torch.equal(B2[m1], B1[m1]), "task 1's entries moved during stage 2"
        assert (B2[m2] != 0).any(), "stage 2 trained nothing"
        assert torch.equal(adapters[0][a_key], adapters[1][a_key]), "A moved"


@pytest.mark.slow
def test_rank_0_alone_wrote_files_and_logged_to_mlflow(two_processes):
    results, _, writes = two_processes
    check_one_sequence_in_mlflow(results)  # the killed stage-2 run was discarded on resume
    assert json.loads((results / SEQ / "summary.json").read_text())["complete"] is True
    seq = str(results / SEQ)
    assert any(w.startswith("sqlite3.connect") for w in writes[0]) and any(
        seq in w for w in writes[0]
    )  # the hook sees writes
    res = re.escape(str(results))
    # Before the sequences, every rank still runs the preflight's writability probe (a folder made and removed): the
    # only write allowed here. Rank 1 never writes the experiment's config.yaml, the sequence folder, the lock or the store.
    before_sequences = re.compile(rf"(os.(mkdir|rmdir) {res}/\.harness-probe-\w+)$")
    assert [w for w in writes[1] if not before_sequences.match(w)] == []


# --- FSDP2 ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp2_shards_trains_checkpoints_and_resumes_like_one_process(one_process, tmp_path):
    kill_mid_stage_2_and_resume(tmp_path, "--distributed", "fsdp")
    assert_close_to(tmp_path, one_process)
    check_one_sequence_in_mlflow(tmp_path)
    for s in STAGES:
        info = json.loads((tmp_path / SEQ / "stages" / s / "stage.json").read_text())
        assert (
            info["distributed"] == "fsdp" and 0 < info["rank0_trainable_elements"] < info["mask/nnz"]
        )  # rank 0 held its shards
