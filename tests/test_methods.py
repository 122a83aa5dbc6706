"""The method layer and the continual-learning baselines: inclora, olora, replay, mtl."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sequence import read_matrix

from harness.cli import main
from harness.config import ExperimentConfig
from harness.methods import METHODS, StageContext
from harness.methods.inclora import orth_l1
from harness.methods.replay import buffer_indices

BASE = ["--suite", "smoke", "--model", "tiny-llama", "--seeds", "0", "--no-progress", "--no-report"]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    results = tmp_path_factory.mktemp("baselines")
    assert (
        main(
            [
                "run",
                *BASE,
                "--methods",
                "inclora,olora,replay,mtl",
                "--epochs",
                "2",
                "--replay-fraction",
                "0.25",
                "--results-dir",
                str(results),
                "--experiment",
                "base",
            ]
        )
        == 0
    )
    return results / "base"


def stage_dirs(seq: Path) -> list[Path]:
    return sorted(
        (p for p in (seq / "stages").iterdir() if not p.name.startswith("0-")), key=lambda p: int(p.name.split("-")[0])
    )


def assert_earlier_adapters_unchanged(seq: Path, n_stages: int = 3) -> None:
    """Every earlier task's adapter file, as each later stage saved it, is bit-identical to its own stage's (A and B)."""
    stages = stage_dirs(seq)
    assert len(stages) == n_stages
    for t, later in enumerate(stages, start=1):
        for s in range(1, t):
            own = load_file(str(stages[s - 1] / "adapter" / f"task{s}" / "adapter_model.safetensors"))
            now = load_file(str(later / "adapter" / f"task{s}" / "adapter_model.safetensors"))
            assert own.keys() == now.keys() and any(".lora_A." in k for k in own) and any(".lora_B." in k for k in own)
            for k in own:
                assert torch.equal(own[k], now[k]), f"task{s} {k} changed in stage {t}"


@pytest.mark.parametrize("method", ["inclora", "olora"])
def test_earlier_adapters_stay_bit_identical_in_the_stage_files(baselines, method):
    assert_earlier_adapters_unchanged(baselines / method / "seed-0")


def test_olora_lowers_the_trained_orthogonality_term_below_inclora(baselines):
    diag = {
        m: json.loads((baselines / m / "seed-0" / "diagnostics.json").read_text())["orth_l1"]["matrix"]
        for m in ("inclora", "olora")
    }
    pairs = [(i, j) for i in range(3) for j in range(3) if i < j]
    inc = sum(diag["inclora"][i][j] for i, j in pairs)
    olo = sum(diag["olora"][i][j] for i, j in pairs)
    assert olo < inc, f"O-LoRA Σ‖A_i A_tᵀ‖₁ {olo} not below IncLoRA's {inc}"


def test_orth_l1_equals_a_hand_computation():
    a1 = {"m": torch.tensor([[1.0, -2.0, 0.5]]), "n": torch.tensor([[0.0, 1.0], [2.0, -1.0]])}
    a2 = {"m": torch.tensor([[3.0, 1.0, -4.0]]), "n": torch.tensor([[1.0, 1.0], [0.5, -0.5]])}
    at = {"m": torch.tensor([[1.0, 1.0, 1.0], [0.0, -1.0, 2.0]]), "n": torch.tensor([[2.0, 0.0], [1.0, 3.0]])}
    hand = 0.0
    for a in (a1, a2):
        for k in at:
            for row_i in a[k].tolist():
                for row_t in at[k].tolist():
                    hand += abs(sum(x * y for x, y in zip(row_i, row_t)))
    assert orth_l1([a1, a2], at).item() == pytest.approx(hand)


def test_olora_loss_gradient_reaches_only_the_new_adapter(tmp_path):
    from harness.models import load_model

    model, _ = load_model("tiny-llama")
    cfg = ExperimentConfig(model="tiny-llama", methods=["olora"], olora={"lambda_orth": 1.0, "lambda_l2": 0.1})
    method = METHODS["olora"](cfg, seed=0, tasks=["a", "b"], base_model=model)
    for t in (1, 2):
        method.begin_stage(StageContext(stage=t, task="ab"[t - 1], run_dir=tmp_path, calibrate=None))
    with torch.no_grad():  # mid-stage: the new B has moved off zero, so the λ2 term reaches it too
        for p in method.trainable().values():
            p.add_(0.01)
    loss = method.extra_loss()
    assert loss is not None and loss.item() > 0
    loss.backward()
    for name, p in method.model.named_parameters():
        has_grad = p.grad is not None and bool(torch.any(p.grad != 0))
        assert has_grad == (".task2." in name and "lora_" in name), name


def test_replay_buffer_is_seeded_sized_and_from_earlier_tasks_only(baselines):
    a = buffer_indices(64, seed=0, task="parity", fraction=0.25, per_task=None)
    assert a == buffer_indices(64, seed=0, task="parity", fraction=0.25, per_task=None)
    assert a != buffer_indices(64, seed=1, task="parity", fraction=0.25, per_task=None)
    assert len(a) == 16 and len(buffer_indices(64, seed=0, task="parity", fraction=0.1, per_task=5)) == 5
    seq = baselines / "replay" / "seed-0"
    tasks = json.loads((seq / "summary.json").read_text())["tasks"]
    for t, d in enumerate(stage_dirs(seq), start=1):
        replayed = json.loads((d / "replay.json").read_text())["replayed"]
        assert sorted(replayed) == sorted(tasks[: t - 1])  # earlier tasks only
        assert all(
            idx == buffer_indices(64, seed=0, task=task, fraction=0.25, per_task=None) for task, idx in replayed.items()
        )
        assert json.loads((d / "train.json").read_text())["train_examples"] == 64 + 16 * (t - 1)
        assert json.loads((d / "stage.json").read_text())["replay/stored_examples"] == 16 * (t - 1)


def test_mtl_trains_once_on_every_task_and_is_stored_as_a_reference(baselines):
    seq = baselines / "mtl" / "seed-0"
    assert [d.name for d in stage_dirs(seq)] == ["1-all"]
    train = json.loads((seq / "stages" / "1-all" / "train.json").read_text())
    assert train["train_examples"] == 3 * 64
    assert train["steps"] == 3 * 2 * 8  # the sequence's total: 3 tasks x 2 epochs x 8 batches
    tasks, R = read_matrix(seq / "matrix.csv")
    assert R.shape == (2, 3) and not np.isnan(R).any()
    summary = json.loads((seq / "summary.json").read_text())
    assert summary["reference"] is True and summary["acc"] == pytest.approx(R[1].mean())
    assert summary["bwt"] is None and summary["forgetting"] is None


def test_report_and_table_handle_every_method(baselines, capsys):
    from harness.report import write_report

    index = write_report("base", baselines.parent, None)
    html = Path(index).read_text()
    for name in ("IncLoRA", "O-LoRA", "Replay", "MTL"):
        assert name in html
    rows = json.loads((Path(index).parent / "comparison.json").read_text())
    mtl = [r for r in rows["rows"] if r["method"] == "mtl"]
    assert mtl and mtl[0]["reference"] is True


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--methods", "lora,nope"], "known methods: lori-s, lori-d, lora, inclora, olora, replay, mtl"),
        (["--methods", "olora", "--olora-lambda-orth", "-1"], "--olora-lambda-orth"),
        (["--methods", "lora", "--replay-fraction", "0.5"], "replay: knobs of method 'replay'"),
        # the four baselines of tests/test_baselines.py
        (["--methods", "nlora", "--nlora-lambda-l1", "-1"], "--nlora-lambda-l1"),
        (["--methods", "inflora", "--inflora-threshold", "1.5"], "--inflora-threshold"),
        (["--methods", "inflora", "--inflora-threshold", "0.99", "--inflora-threshold-end", "0.9"], "may only grow"),
        (["--methods", "ewc", "--ewc-lambda", "-1"], "--ewc-lambda"),
        (["--methods", "ewc", "--ewc-fisher-samples", "0"], "--ewc-fisher-samples"),
        (["--methods", "migu", "--migu-top-fraction", "0"], "--migu-top-fraction"),
        (["--methods", "migu", "--migu-top-fraction", "1.5"], "--migu-top-fraction"),
        (["--methods", "lora", "--ewc-lambda", "5"], "ewc: knobs of method 'ewc'"),
    ],
)
def test_bad_method_input_exits_2_and_writes_nothing(tmp_path, capsys, args, needle):
    results = tmp_path / "results"
    assert main(["run", *BASE, *args, "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not results.exists()
