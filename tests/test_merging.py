"""Merging: exactness of PEFT combinations against Σ w_i s_i B_i A_i, folding with exact restore, the merge protocol end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from scipy import stats
from transformers import LlamaConfig, LlamaForCausalLM

from harness.adapters.combine import MERGED, folded, load_adapters, lora_layers, merge, relative_error
from harness.cli import main

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            max_position_embeddings=64,
        )
    )


def adapter_folders(tmp_path: Path, shared_A: bool) -> dict[str, Path]:
    """Two trained-looking LoRA adapters (random A and B), saved as PEFT folders."""
    folders, first_A = {}, None
    for i, name in enumerate(("a", "b")):
        model = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for mod_name, layer in lora_layers(model):
                A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                A.copy_(torch.randn(A.shape, generator=g) if not shared_A or first_A is None else first_A[mod_name])
                B.copy_(torch.randn(B.shape, generator=g))
        if shared_A and first_A is None:
            first_A = {n: l.lora_A["default"].weight.detach().clone() for n, l in lora_layers(model)}
        folders[name] = tmp_path / name
        model.save_pretrained(str(folders[name]))
    return folders


def test_cat_merge_is_the_exact_weighted_sum(tmp_path):
    model = load_adapters(tiny(), adapter_folders(tmp_path, shared_A=False))
    merge(model, ["a", "b"], [0.4, 0.7], "cat", 0.5)
    assert relative_error(model, ["a", "b"], [0.4, 0.7]) < 1e-6
    for _, layer in lora_layers(model):  # and directly, module by module
        exact = 0.4 * layer.get_delta_weight("a") + 0.7 * layer.get_delta_weight("b")
        torch.testing.assert_close(layer.get_delta_weight(MERGED), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combination", ["linear", "ties", "dare_linear"])
def test_combinations_over_different_As_have_measured_cross_terms(tmp_path, combination):
    model = load_adapters(tiny(), adapter_folders(tmp_path, shared_A=False))
    torch.manual_seed(0)
    merge(model, ["a", "b"], [0.5, 0.5], combination, 0.5)
    assert relative_error(model, ["a", "b"], [0.5, 0.5]) > 0.1


def test_linear_over_a_shared_A_has_no_cross_terms_and_is_exactly_proportional(tmp_path):
    """PEFT's linear gives (Σ √(w_i s_i) B_i)(Σ √(w_j s_j) A): with equal w·s that is T·Σ w_i s_i B_i A, no cross terms."""
    model = load_adapters(tiny(), adapter_folders(tmp_path, shared_A=True))
    merge(model, ["a", "b"], [0.5, 0.5], "linear", 0.5)
    for _, layer in lora_layers(model):
        exact = 0.5 * layer.get_delta_weight("a") + 0.5 * layer.get_delta_weight("b")
        torch.testing.assert_close(layer.get_delta_weight(MERGED), 2 * exact, rtol=1e-5, atol=1e-6)
    merge(model, ["a", "b"], [0.5, 0.5], "cat", 0.5)  # and the run's own measure agrees with cat being exact
    assert relative_error(model, ["a", "b"], [0.5, 0.5]) < 1e-6


def test_folding_gives_the_adapter_outputs_and_restores_base_weights_bit_for_bit(tmp_path):
    model = load_adapters(tiny(), adapter_folders(tmp_path, shared_A=False))
    merge(model, ["a", "b"], [0.4, 0.4], "cat", 0.5)
    model.eval()
    before = {n: l.get_base_layer().weight.detach().clone() for n, l in lora_layers(model)}
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        with folded(model, MERGED):
            fast = model(input_ids=x).logits
        with model.disable_adapter():
            base = model(input_ids=x).logits
    torch.testing.assert_close(fast, unmerged, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fast, base, atol=1e-3), "the merged adapter must change the outputs"
    for n, l in lora_layers(model):
        assert torch.equal(l.get_base_layer().weight, before[n])


MERGE_ARGS = [
    "--suite",
    "smoke",
    "--model",
    "tiny-llama",
    "--seeds",
    "0",
    "--epochs",
    "2",
    "--merge-methods",
    "cat,linear",
]
MERGE_ARGS += ["--merge-pairs", "true", "--no-progress", "--no-report", "--experiment", "mg"]


@pytest.fixture(scope="module")
def merge_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("merge")
    assert main(["merge", *MERGE_ARGS, "--methods", "lora,lori-s", "--results-dir", str(results)]) == 0
    return results


def test_merge_folders_hold_the_documented_files(merge_run):
    for method in ("lora", "lori-s"):
        d = merge_run / "mg" / "merge" / method / "seed-0"
        for task in ("parity", "weather", "copy"):
            a = d / "adapters" / task
            assert {"adapter_config.json", "adapter_model.safetensors", "train.json"} <= {p.name for p in a.iterdir()}
            assert (a / "masks.safetensors").exists() == (method == "lori-s")
        single = json.loads((d / "single.json").read_text())
        assert single["tasks"] == ["parity", "weather", "copy"] and len(single["S"]) == 3
        rows = json.loads((d / "merged.json").read_text())["rows"]
        assert len(rows) == 2 * (1 + 3)  # (all tasks + 3 pairs) x (cat, linear)
        cat = next(r for r in rows if r["combination"] == "cat" and len(r["tasks"]) == 3)
        assert cat["relative_error"] < 1e-5 and not cat["cross_terms"]
        lin = next(r for r in rows if r["combination"] == "linear" and len(r["tasks"]) == 3)
        assert lin["cross_terms"]  # LoRI's per-task A's (and LoRA's trained A's) differ
        summary = json.loads((d / "summary.json").read_text())
        assert summary["complete"] and set(summary["merges"]) == {"cat", "linear"}
        I = summary["interference"]["cat"]
        assert I[0][0] is None and I[0][1] == pytest.approx(
            next(r for r in rows if r["combination"] == "cat" and r["tasks"] == ["parity", "weather"])["scores"][
                "parity"
            ]
            - single["S"][0][0]
        )
        assert (d / "single.csv").exists() and (d / "merged.csv").exists()
        # Each document's score: the adapters alone on their own task and every full merge recompute exactly.
        from harness.analysis.documents import merge_matrix

        docs = json.loads((d / "documents.json").read_text())
        for r in (cat, lin):
            assert merge_matrix(docs, r["combination"]).tolist() == [
                [single["S"][j][j] for j in range(3)],
                [r["scores"][t] for t in single["tasks"]],
            ]


def test_merge_mlflow_runs_and_resume_skips_finished_pieces(merge_run, capsys):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{merge_run / 'mlflow.db'}")
    exp = c.get_experiment_by_name("mg")
    parents = c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'merge'")
    assert sorted(p.data.tags["harness.method"] for p in parents) == ["lora", "lori-s"]
    for p in parents:
        assert p.info.status == "FINISHED" and p.data.tags["harness.protocol"] == "merge"
        kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{p.info.run_id}'")
        assert sorted(k.data.tags["harness.kind"] for k in kids).count("merge-adapter") == 3
        assert sorted(k.data.tags["harness.kind"] for k in kids).count("merge-combination") == 8
    assert (
        main(
            [
                "merge",
                "--suite",
                "smoke",
                "--model",
                "tiny-llama",
                "--methods",
                "lora,lori-s",
                "--seeds",
                "0",
                "--epochs",
                "2",
                "--merge-methods",
                "cat,linear",
                "--merge-pairs",
                "true",
                "--no-progress",
                "--no-report",
                "--results-dir",
                str(merge_run),
                "--experiment",
                "mg",
            ]
        )
        == 0
    )
    assert capsys.readouterr().err.count("already complete") == 2
    assert len(c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'merge'")) == 2


@pytest.mark.slow
def test_merge_units_run_as_concurrent_jobs_give_the_same_scores(merge_run, tmp_path):
    """`harness merge --jobs 2`: each (method, seed) in its own process, sharing the store the driver created."""
    from mlflow.tracking import MlflowClient

    assert (
        main(
            [
                "merge",
                "--suite",
                "smoke",
                "--model",
                "tiny-llama",
                "--methods",
                "lora,lori-s",
                "--seeds",
                "0",
                "--epochs",
                "2",
                "--merge-methods",
                "cat,linear",
                "--merge-pairs",
                "true",
                "--no-progress",
                "--no-report",
                "--results-dir",
                str(tmp_path),
                "--experiment",
                "mg",
                "--jobs",
                "2",
            ]
        )
        == 0
    )
    for method in ("lora", "lori-s"):
        ours, theirs = (r / "mg" / "merge" / method / "seed-0" for r in (tmp_path, merge_run))
        assert (
            json.loads((ours / "single.json").read_text())["S"] == json.loads((theirs / "single.json").read_text())["S"]
        )
        rows = [
            (r["combination"], r["tasks"], r["scores"]) for r in json.loads((ours / "merged.json").read_text())["rows"]
        ]
        assert rows == [
            (r["combination"], r["tasks"], r["scores"])
            for r in json.loads((theirs / "merged.json").read_text())["rows"]
        ]
        assert (tmp_path / "mg" / "jobs" / f"merge_{method}_seed-0.log").is_file()
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents = c.search_runs([c.get_experiment_by_name("mg").experiment_id], "tags.`harness.kind` = 'merge'")
    assert sorted(p.data.tags["harness.method"] for p in parents) == ["lora", "lori-s"]
    assert all(p.info.status == "FINISHED" for p in parents)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--methods", "inclora"], "cannot be merged"),
        (["--methods", "lora", "--merge-weights", "0.1,0.2"], "--merge-weights"),
        (["--methods", "lora", "--merge-methods", "avg"], "--merge-methods"),
    ],
)
def test_bad_merge_input_exits_2_and_writes_nothing(tmp_path, capsys, args, needle):
    results = tmp_path / "r"
    assert main(["merge", "--suite", "smoke", "--model", "tiny-llama", *args, "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not results.exists()


@pytest.mark.slow
def test_a_merge_killed_at_a_stage_boundary_resumes_to_the_same_merge_table(merge_run, tmp_path, capsys):
    """SIGKILL after the first task adapter is committed; the same command again finishes the merge, keeping that
    adapter, and gives the uninterrupted run's single matrix and merge table; MLflow counts every piece once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    results = tmp_path / "r"
    folder = results / "mg" / "merge" / "lora" / "seed-0"
    command = ["merge", *MERGE_ARGS, "--methods", "lora", "--results-dir", str(results)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_FAULT_PAUSE": "between-stages:1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *command], cwd=root, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not (folder / ".paused-between-stages").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = (folder / "adapters" / "parity" / "train.json").read_bytes()
    assert not (folder / "adapters" / "weather").exists() and not (folder / "single.json").exists()

    assert main(command) == 0
    assert (folder / "adapters" / "parity" / "train.json").read_bytes() == kept  # not retrained
    reference = merge_run / "mg" / "merge" / "lora" / "seed-0"
    for name in ("single.json", "merged.csv", "single.csv"):
        ours, theirs = (folder / name).read_text(), (reference / name).read_text()
        assert (json.loads(ours)["S"] == json.loads(theirs)["S"]) if name.endswith(".json") else ours == theirs, name
    rows = [
        (r["combination"], r["tasks"], r["scores"]) for r in json.loads((folder / "merged.json").read_text())["rows"]
    ]
    assert rows == [
        (r["combination"], r["tasks"], r["scores"]) for r in json.loads((reference / "merged.json").read_text())["rows"]
    ]
    c = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    exp = c.get_experiment_by_name("mg")
    [parent] = c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'merge'")
    kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and all(k.info.status == "FINISHED" for k in kids)
    assert sorted(k.data.tags["harness.kind"] for k in kids) == ["merge-adapter"] * 3 + ["merge-combination"] * 8


def _copy_run(src: Path, dst: Path, method: str, seed: int, merged: float, single: float) -> None:
    """An evidence folder for another (method, seed): the merged scores scaled by `merged`, each adapter's own score
    by `single` (documents.json then no longer recomputes them, so the table's intervals are over seeds alone, which
    a hand computation can check)."""
    shutil.copytree(src, dst)
    summary = json.loads((src / "summary.json").read_text())
    for entry in summary["merges"].values():
        entry["scores"] = {t: v * merged for t, v in entry["scores"].items()}
    summary["single_diagonal"] = {t: v * single for t, v in summary["single_diagonal"].items()}
    (dst / "summary.json").write_text(json.dumps({**summary, "method": method, "seed": seed}))


def _ci(x) -> str:
    """mean [low, high]: the 95% t interval over seeds, by hand, as the tables print it (signed for differences)."""
    mean, half = float(np.mean(x)), float(stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x)))
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def _signed(x) -> str:
    mean, half = float(np.mean(x)), float(stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x)))
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]".replace("-", "−")


# (merged, single) scale per seed 0, 1, 2 of each method's copies; lora seed 0 is the real run.
SCALES = {
    "lora": ((1.0, 1.0), (0.9, 0.98), (0.8, 1.02)),
    "lori-d": ((0.7, 1.0), (0.75, 0.97), (0.6, 1.0)),
    "lori-s": ((0.95, 0.99), (0.97, 1.01), (0.93, 0.96)),
}


def test_merge_evidence_gives_the_merge_table_with_its_tests_over_seeds(merge_run, tmp_path):
    from harness.errors import HarnessError
    from harness.tools.evidence import collect
    from harness.tools.merge_table import MergeTable, merge_block

    root = tmp_path / "evidence"
    written = collect(merge_run / "mg", "r8", root)
    assert sorted(str(w.relative_to(root)) for w in written) == ["r8/lora/seed-0", "r8/lori-s/seed-0"]
    assert all((w / n).is_file() for w in written for n in ("summary.json", "documents.json", "merged.csv"))
    assert not any((w / n).exists() for w in written for n in ("merged.json", "single.json", "adapters"))
    (root / "seq" / "lora" / "seed-0").mkdir(parents=True)
    (root / "seq" / "lora" / "seed-0" / "summary.json").write_text("{}")  # a sequence table
    with pytest.raises(HarnessError, match="table 'seq' holds sequences; these are merge runs"):
        collect(merge_run / "mg", "seq", root)
    src = root / "r8" / "lora" / "seed-0"
    shutil.move(root / "r8" / "lori-s", tmp_path / "lori-s")  # every other run is a scaled copy of LoRA's
    for table, rank_scale in (("r8", 1.0), ("r32", 0.5)):
        for m, scales in SCALES.items():
            for seed, (merged, single) in enumerate(scales):
                if (table, m, seed) != ("r8", "lora", 0):
                    _copy_run(src, root / table / m / f"seed-{seed}", m, seed, merged * rank_scale, single)
    block = merge_block(MergeTable("m", (("8", "r8"), ("32", "r32")), ("lora", "lori-d", "lori-s")), root)

    def by_hand(table: str, m: str, seed: int, key: str) -> float:
        s = json.loads((root / table / m / f"seed-{seed}" / "summary.json").read_text())
        S = s["single_diagonal"]
        if key == "alone":
            return float(np.mean(list(S.values())))
        scores = s["merges"]["cat"]["scores"]  # normalised accuracy: mean of m_j / S[j, j] where S[j, j] > 0
        return float(np.mean([scores[t] / S[t] for t in S if S[t] > 0]))

    for key, label in (("alone", "alone: mean S[j, j]"), ("cat", "`cat`")):
        cells = next(r for r in block.splitlines() if r.startswith(f"| 8 | {label} |")).split(" | ")
        values = {m: [by_hand("r8", m, k, key) for k in range(3)] for m in SCALES}
        for col, m in enumerate(("lora", "lori-d", "lori-s"), start=2):
            assert cells[col] == _ci(values[m]), (key, m, cells[col])
        best = max(values, key=lambda m: np.mean(values[m]))
        others = sorted((m for m in values if m != best), key=lambda m: -np.mean(values[m]))
        p = [stats.ttest_rel(values[best], values[o]).pvalue for o in others]
        holm = [min(1.0, 2 * min(p)), max(min(1.0, 2 * min(p)), max(p))]  # Holm over a family of 2
        holm = holm if p[0] <= p[1] else holm[::-1]
        for o, q in zip(others, holm):
            d = [a - b for a, b in zip(values[best], values[o])]
            assert f"{_signed(d)}, Holm {'p < 0.001' if q < 0.001 else f'p = {q:.3f}'}" in cells[5], (key, o, cells[5])
    assert "Seeds: rank 8: LoRA 0, 1, 2; LoRI-D 0, 1, 2; LoRI-S 0, 1, 2 | rank 32: LoRA 0, 1, 2;" in block
    assert "No cell is missing." in block
    between = next(line for line in block.splitlines() if line.startswith("| LoRA |")).split(" | ")
    lora_d = [by_hand("r32", "lora", k, "cat") - by_hand("r8", "lora", k, "cat") for k in range(3)]
    assert between[2].startswith(_signed(lora_d))
    shutil.rmtree(root / "r8" / "lori-d")
    short = merge_block(MergeTable("s", (("8", "r8"),), ("lora", "lori-d", "lori-s"), ("cat",)), root)
    assert "| 8 | `linear` |" not in short and "rank 32 − rank 8" not in short
    assert "Missing (fewer than 3 seeds): rank 8 LoRI-D 0/3." in short
