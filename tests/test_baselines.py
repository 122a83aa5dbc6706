"""N-LoRA, InfLoRA, EWC and MIGU: their loss terms, designed projections, stored state and gradient masks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_export import harness_model, logits, stock
from test_methods import assert_earlier_adapters_unchanged, stage_dirs

from harness import distributed as D
from harness.cli import main
from harness.config import ExperimentConfig
from harness.errors import ConfigError
from harness.methods import METHODS, Method, StageContext
from harness.methods.ewc import ewc_penalty
from harness.methods.inflora import design_A, grow_basis
from harness.methods.migu import row_mask
from harness.models import load_model
from harness.run.batches import collate, tokenize_examples
from harness.run.export import export_adapter

BASE = ["--suite", "smoke", "--model", "tiny-llama", "--seeds", "0", "--no-progress", "--no-report"]
NEW = ["nlora", "inflora", "ewc", "migu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every new method on the smoke suite in one `harness run`."""
    results = tmp_path_factory.mktemp("newbaselines")
    assert (
        main(
            [
                "run",
                *BASE,
                "--methods",
                ",".join(NEW),
                "--eval-limit",
                "8",
                "--eval-schedule",
                "diagonal_final",
                "--ewc-fisher-samples",
                "16",
                "--results-dir",
                str(results),
                "--experiment",
                "nb",
            ]
        )
        == 0
    )
    return results / "nb"


@pytest.fixture(scope="module")
def ewc_runs(tmp_path_factory):
    """EWC on two tasks with λ = 0 and λ large."""
    results = tmp_path_factory.mktemp("ewc")
    for lam in ("0", "1e6"):
        assert (
            main(
                [
                    "run",
                    *BASE,
                    "--methods",
                    "ewc",
                    "--tasks",
                    "parity,weather",
                    "--ewc-lambda",
                    lam,
                    "--ewc-fisher-samples",
                    "16",
                    "--eval-limit",
                    "8",
                    "--eval-schedule",
                    "diagonal_final",
                    "--results-dir",
                    str(results),
                    "--experiment",
                    f"l{lam}",
                ]
            )
            == 0
        )
    return {lam: results / f"l{lam}" / "ewc" / "seed-0" for lam in ("0", "1e6")}


def tiny_method(name: str, tmp_path: Path, **knobs):
    model, tok = load_model("tiny-llama")
    cfg = ExperimentConfig(model="tiny-llama", methods=[name], **knobs)
    return METHODS[name](cfg, seed=0, tasks=["a", "b"], base_model=model), tok


def ctx(t: int, tmp_path: Path, **kw) -> StageContext:
    return StageContext(stage=t, task="ab"[t - 1], run_dir=tmp_path, calibrate=None, **kw)


def batch(tok):
    exs = [
        {"prompt": "the cat sat on", "completion": " the mat"},
        {"prompt": "one two", "completion": " three four five"},
    ]
    return collate(tokenize_examples(tok, exs, None), tok.pad_token_id or 0, torch.device("cpu"))


def flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([sd[k].flatten() for k in sorted(sd)])


# --- N-LoRA ------------------------------------------------------------------------------------------------
def test_nlora_loss_is_lambda_times_the_l1_of_the_new_update_by_hand(tmp_path):
    method, _ = tiny_method("nlora", tmp_path, nlora={"lambda_l1": 0.3})
    for t in (1, 2):
        method.begin_stage(ctx(t, tmp_path))
        with torch.no_grad():
            for i, p in enumerate(method.trainable().values()):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * t + i)))
    hand = 0.0
    for _, layer in method.adapters.layers():
        A, B = layer.lora_A["task2"].weight.tolist(), layer.lora_B["task2"].weight.tolist()
        for row in B:
            for j in range(len(A[0])):
                hand += abs(sum(row[k] * A[k][j] for k in range(len(A))))
    loss = method.extra_loss()
    assert loss.item() == pytest.approx(0.3 * hand, rel=1e-5)
    loss.backward()
    for name, p in method.model.named_parameters():
        has_grad = p.grad is not None and bool(torch.any(p.grad != 0))
        assert has_grad == (".task2." in name and "lora_" in name), name


def test_nlora_tiled_l1_equals_the_dense_product_in_value_and_gradients(monkeypatch):
    from harness.methods import nlora

    monkeypatch.setattr(nlora, "TILE_ROWS", 7)  # several tiles and a ragged last one
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 33, generator=g, dtype=torch.float64), torch.randn(50, 8, generator=g, dtype=torch.float64)
    A1, B1, A2, B2 = (x.clone().requires_grad_(True) for x in (A, B, A, B))
    tiled = nlora.update_l1([(A1, B1)])
    dense = (B2 @ A2).abs().sum()
    (3.0 * tiled).backward()
    (3.0 * dense).backward()
    assert torch.allclose(tiled, dense) and torch.allclose(A1.grad, A2.grad) and torch.allclose(B1.grad, B2.grad)


def test_nlora_a_larger_lambda_moves_the_new_adapter_less(tmp_path):
    """Same data, same start: the update B_t A_t after a few steps is smaller in ℓ1 with λ > 0 than with λ = 0."""
    sizes = {}
    for lam in (0.0, 0.05):
        method, tok = tiny_method("nlora", tmp_path, nlora={"lambda_l1": lam})
        method.begin_stage(ctx(1, tmp_path))
        params = list(method.trainable().values())
        with torch.no_grad():
            for i, p in enumerate(params):  # B starts at 0: give it a common start
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        opt = torch.optim.SGD(params, lr=0.05)
        b = batch(tok)
        for _ in range(5):
            opt.zero_grad()
            loss = method.model(**b).loss
            extra = method.extra_loss()
            (loss + extra if extra is not None else loss).backward()
            opt.step()
        with torch.no_grad():
            sizes[lam] = float(method.end_stage()["nlora/update_l1"])
    assert sizes[0.05] < sizes[0.0], sizes


# --- InfLoRA -----------------------------------------------------------------------------------------------
def test_inflora_kept_basis_follows_the_codes_energy_criterion_by_hand():
    C = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.0]))  # energies (squared singular values) 16, 4, 1 of 21
    U1 = grow_basis(C, None, 0.95)  # cumulative 0.76 < 0.95, 0.95 is not: one direction (the code counts those below)
    assert U1.shape == (4, 1) and abs(float(U1[0, 0])) == pytest.approx(1.0)
    U2 = grow_basis(C, U1, 0.95)  # covered 16/21 < 0.95: add the next direction (then 20/21 >= 0.95)
    assert U2.shape == (4, 2) and torch.allclose(U2.abs(), torch.eye(4, dtype=U2.dtype)[:, :2], atol=1e-12)
    A = design_A(C, U2, 1)  # the largest direction outside span(e1, e2) is e3, scaled by 1/√3
    assert torch.allclose(A.abs(), torch.tensor([[0.0, 0.0, 3**-0.5, 0.0]]), atol=1e-7)


def test_inflora_top_r_solver_gives_the_same_bits_whatever_blas_threads_the_process_has():
    """scipy's OpenBLAS defaults to one thread per CPU; the solver holds it to torch's count, so a --jobs process (two
    OpenBLAS threads) and a pinned one (one) design the same A bit for bit. Without the limit the bits differ here."""
    from threadpoolctl import threadpool_limits

    from harness.methods.inflora import top_eigvecs

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 1536, generator=g, dtype=torch.float64)
    S = X.T @ X / 3000
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with threadpool_limits(limits=1, user_api="blas"):
            one = top_eigvecs(S, 8)
        with threadpool_limits(limits=2, user_api="blas"):
            two = top_eigvecs(S, 8)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.slow
def test_inflora_top_r_solver_and_shared_inputs_give_the_full_decompositions_result():
    """The top-r eigensolver equals the full eigh's first r vectors (up to sign), and modules fed one input share one
    decomposition whose result is each module's own copy."""
    from harness.methods.inflora import left_singular, per_input, project_out, top_left_singular

    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 60, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 60, dtype=torch.float64)
    C = X.T @ X / 400
    U = left_singular(C)[0][:, :5]
    for basis in (None, U):
        full = left_singular(project_out(C, basis))[0][:, :8]
        top = top_left_singular(project_out(C, basis), 8)
        assert torch.allclose(top.abs(), full.abs(), atol=1e-8) and torch.allclose(
            (top * full).sum(0).abs(), torch.ones(8, dtype=torch.float64)
        )
    # With nothing kept, A and the first basis come from C's own eigenpairs (never C Cᵀ): the same subspaces, and the
    # same energy count, as the left singular vectors of C.
    ref = left_singular(C)[0]
    A = design_A(C, None, 8).double() * 3**0.5
    assert torch.allclose((A @ ref[:, :8]).abs(), torch.eye(8, dtype=torch.float64), atol=1e-6)
    for threshold in (0.5, 0.9, 0.99):
        s = left_singular(C)[1]
        r = int((torch.cumsum(s**2 / (s**2).sum(), 0) < threshold).sum())
        basis = grow_basis(C, None, threshold)
        assert basis.shape[1] == max(r, 1) and torch.allclose(
            (basis.T @ ref[:, : max(r, 1)]).abs().diagonal(), torch.ones(max(r, 1), dtype=torch.float64)
        )
    calls = []
    covs = {"q": C, "k": C, "o": C.clone()}
    got = per_input(["q", "k", "o"], covs, {}, lambda c, u: calls.append(1) or design_A(c, u, 4))
    assert len(calls) == 2 and torch.equal(got["q"], got["k"]) and got["q"] is not got["k"]
    assert torch.equal(got["o"], design_A(C, None, 4))


def test_inflora_A_is_orthogonal_to_the_earlier_kept_input_subspace(runs):
    stages = stage_dirs(runs / "inflora" / "seed-0")
    for t in (2, 3):
        bases = {
            k[len("basis/") :]: v
            for k, v in load_file(str(stages[t - 2] / "inflora.safetensors")).items()
            if k.startswith("basis/")
        }
        designed = load_file(str(stages[t - 1] / "inflora.safetensors"))
        assert bases and all(0 < U.shape[1] < U.shape[0] for U in bases.values())
        for name, U in bases.items():
            A = designed[f"A/{name}"].double()
            assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-8)
            assert (A @ U).abs().max() <= 1e-4 * A.abs().max(), f"stage {t} {name}: A_t leaks into the kept subspace"


@pytest.mark.slow
def test_inflora_reports_the_kept_share_of_each_module_familys_inputs(runs):
    stage1 = stage_dirs(runs / "inflora" / "seed-0")[0]
    info = json.loads((stage1 / "stage.json").read_text())
    per = {k.rsplit("/", 1)[1]: v for k, v in info.items() if k.startswith("inflora/kept_dims_frac/")}
    bases = {
        k[len("basis/") :]: v
        for k, v in load_file(str(stage1 / "inflora.safetensors")).items()
        if k.startswith("basis/")
    }
    assert set(per) == {n.rsplit(".", 1)[-1] for n in bases} and len(per) > 1, per
    for family, share in per.items():
        us = [U for n, U in bases.items() if n.endswith(family)]
        assert share == pytest.approx(sum(U.shape[1] for U in us) / sum(U.shape[0] for U in us))
        assert 0 < share <= 1


def test_inflora_A_never_changes_during_its_stage(runs):
    for t, d in enumerate(stage_dirs(runs / "inflora" / "seed-0"), start=1):
        designed = load_file(str(d / "inflora.safetensors"))
        trained = load_file(str(d / "adapter" / f"task{t}" / "adapter_model.safetensors"))
        a_keys = [k for k in trained if ".lora_A." in k]
        assert len(a_keys) == len([k for k in designed if k.startswith("A/")]) > 0
        for k in a_keys:
            assert torch.equal(trained[k], designed["A/" + k[: -len(".lora_A.weight")]]), f"stage {t}: {k} moved"
        assert all(trained[k].abs().sum() > 0 for k in trained if ".lora_B." in k)  # B did train


@pytest.mark.slow
@pytest.mark.parametrize("method", ["inflora", "nlora"])
def test_earlier_adapters_stay_bit_identical_in_later_stage_files(runs, method):
    assert_earlier_adapters_unchanged(runs / method / "seed-0")


@pytest.mark.slow
def test_inflora_bases_are_restored_and_a_dropped_stage_retrains_bit_identically(runs, tmp_path):
    seq = runs / "inflora" / "seed-0"
    stages = stage_dirs(seq)
    saved = load_file(str(stages[1] / "inflora.safetensors"))
    method = harness_model(seq, 2)
    assert method.bases and all(torch.equal(U, saved[f"basis/{n}"]) for n, U in method.bases.items())
    shutil.copytree(seq.parents[2], tmp_path / "r")
    copy = tmp_path / "r" / seq.relative_to(seq.parents[2])
    shutil.rmtree(copy / "stages" / stages[2].name)
    (copy / "summary.json").unlink()
    assert main(["resume", str(copy), "--no-report", "--no-progress"]) == 0
    for f in ("inflora.safetensors", "adapter/task3/adapter_model.safetensors"):
        again, before = load_file(str(copy / "stages" / stages[2].name / f)), load_file(str(stages[2] / f))
        assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in again), f


def test_inflora_mid_stage_checkpoint_holds_A_t_and_a_resumed_stage_takes_it_from_there(tmp_path):
    method, _ = tiny_method("inflora", tmp_path)
    method.adapters.begin_task(1)  # the modules' names and shapes (begin_stage finds the adapter there)
    names = [n for n, _ in method.adapters.layers()]
    given = {
        f"A/{n}": torch.randn(method.cfg.rank, layer.in_features, generator=torch.Generator().manual_seed(i))
        for i, (n, layer) in enumerate(method.adapters.layers())
    }
    method.begin_stage(ctx(1, tmp_path, resumed_extra=given))  # no data: it must not measure anything
    assert method.checkpoint_extra().keys() == {f"A/{n}" for n in names}
    for n, layer in method.adapters.layers():
        assert (
            torch.equal(layer.lora_A["task1"].weight, given[f"A/{n}"])
            and not layer.lora_A["task1"].weight.requires_grad
        )
        assert torch.equal(method.checkpoint_extra()[f"A/{n}"], given[f"A/{n}"])


# --- EWC ---------------------------------------------------------------------------------------------------
def test_ewc_penalty_equals_a_hand_computation():
    theta = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5, 3.0]])}
    F = [
        {"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([[4.0, 0.0]])},
        {"a": torch.tensor([0.5, 0.5]), "b": torch.tensor([[1.0, 2.0]])},
    ]
    star = [
        {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[0.0, 1.0]])},
        {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[1.5, 3.0]])},
    ]
    # task 1: 2·1 + 1·4 + 4·0.25 + 0·4 = 7;  task 2: 0.5·0 + 0.5·9 + 1·1 + 2·0 = 5.5;  λ/2 · 12.5 with λ = 3
    assert ewc_penalty(theta, F, star, 3.0).item() == pytest.approx(1.5 * 12.5)
    assert ewc_penalty(theta, [], [], 3.0).item() == 0.0


@pytest.mark.slow
def test_ewc_batched_fisher_is_the_mean_of_per_example_squared_gradients(tmp_path):
    """The batched estimate equals one backward per example, and is not the square of the mean gradient."""
    from harness.losses import lm_loss
    from harness.methods.ewc import empirical_fisher

    method, tok = tiny_method("ewc", tmp_path)
    method.begin_stage(ctx(1, tmp_path))
    params = method.trainable()
    with torch.no_grad():
        for i, p in enumerate(params.values()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    exs = [
        {"prompt": f"count {i} to", "completion": " " + " ".join(str(i + k) for k in range(1 + i % 4))}
        for i in range(6)
    ]
    items = tokenize_examples(tok, exs, None)
    pad = tok.pad_token_id or 0
    batched = empirical_fisher(
        method.model,
        params,
        [collate(items[:4], pad, torch.device("cpu")), collate(items[4:], pad, torch.device("cpu"))],
    )
    by_hand = {k: torch.zeros_like(p) for k, p in params.items()}
    mean_grad = {k: torch.zeros_like(p) for k, p in params.items()}
    for item in items:
        b = collate([item], pad, torch.device("cpu"))
        loss = lm_loss(
            method.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"], "token"
        )
        for k, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            by_hand[k] += g**2 / len(items)
            mean_grad[k] += g / len(items)
    for k in params:
        assert torch.allclose(batched[k], by_hand[k], rtol=1e-4, atol=1e-10), k
    assert not all(torch.allclose(batched[k], mean_grad[k] ** 2, rtol=1e-3) for k in params)


def test_a_methods_own_setup_and_teardown_time_is_recorded_per_stage_and_in_total(ewc_runs):
    seq = ewc_runs["1e6"]
    markers = [json.loads((d / "stage.json").read_text()) for d in stage_dirs(seq)]
    assert all(m["method_setup_s"] >= 0 and m["method_teardown_s"] >= 0 for m in markers)
    assert markers[0]["method_teardown_s"] > markers[-1]["method_teardown_s"]  # the Fisher runs after all but the last
    for m in markers:  # what the method took is no longer counted as "other"
        parts = m["train_s"] + m["eval_s"] + m["calibration_s"] + m.get("general_ce_s", 0.0) + m["overhead_s"]
        assert m["wall_s"] == pytest.approx(parts + m["method_setup_s"] + m["method_teardown_s"])
    summary = json.loads((seq / "summary.json").read_text())
    for k in ("method_setup_s", "method_teardown_s"):
        assert summary[k] == pytest.approx(sum(m[k] for m in markers))


def test_ewc_fisher_is_stored_per_task_and_restored_on_resume(ewc_runs, tmp_path):
    seq = ewc_runs["1e6"]
    s1, s2 = stage_dirs(seq)
    f1, f2 = load_file(str(s1 / "ewc.safetensors")), load_file(str(s2 / "ewc.safetensors"))
    adapter = load_file(str(s1 / "adapter" / "adapter_model.safetensors"))
    # Stage 2 is the last: no Fisher or anchor of task 2 (nothing would read them), task 1's carried on.
    assert {k.split("/", 2)[1] for k in f1} == {"1"} and {k.split("/", 2)[1] for k in f2} == {"1"}
    assert len([k for k in f1 if k.startswith("fisher/1/")]) == len(adapter)
    assert all(torch.equal(f1[k], f2[k]) for k in f1) and any(
        v.abs().sum() > 0 for k, v in f1.items() if k.startswith("fisher/")
    )
    method = harness_model(seq, 1)
    assert all(
        torch.equal(method.fishers[0][k], f1[f"fisher/1/{k}"])
        and torch.equal(method.anchors[0][k], f1[f"anchor/1/{k}"])
        for k in method.fishers[0]
    )
    # Drop stage 2 and resume: it is retrained from the restored Fisher and anchors, bit-identically.
    shutil.copytree(
        seq.parents[2], tmp_path / "r"
    )  # the results folder: resume needs the experiment around the sequence
    copy = tmp_path / "r" / seq.relative_to(seq.parents[2])
    shutil.rmtree(copy / "stages" / s2.name)
    (copy / "summary.json").unlink()
    assert main(["resume", str(copy), "--no-report", "--no-progress"]) == 0
    again = load_file(str(copy / "stages" / s2.name / "adapter" / "adapter_model.safetensors"))
    before = load_file(str(s2 / "adapter" / "adapter_model.safetensors"))
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in again)


@pytest.mark.slow
def test_ewc_with_lambda_large_moves_the_earlier_tasks_adapter_less(ewc_runs):
    moved = {}
    for lam, seq in ewc_runs.items():
        s1, s2 = stage_dirs(seq)
        moved[lam] = float(
            (
                flat(load_file(str(s2 / "adapter" / "adapter_model.safetensors")))
                - flat(load_file(str(s1 / "adapter" / "adapter_model.safetensors")))
            ).norm()
        )
    assert 0 < moved["1e6"] < 0.5 * moved["0"], moved


# --- MIGU --------------------------------------------------------------------------------------------------
def test_migu_gradient_reaches_only_the_rows_with_the_largest_outputs(tmp_path):
    method, tok = tiny_method("migu", tmp_path, migu={"top_fraction": 0.25})
    for t in (1, 2):
        method.begin_stage(ctx(t, tmp_path))
        if t == 1:
            method.end_stage()
    with torch.no_grad():  # B off zero, so lora_A gets a gradient too
        for p in method.trainable().values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    seen: dict[str, torch.Tensor] = {}
    layers = dict(method.adapters.layers())
    spies = [
        m.register_forward_hook(lambda mod, a, out, key=key: seen.__setitem__(key, out.detach().abs().sum(dim=(0, 1))))
        for name, layer in layers.items()
        for key, m in ((f"{name}/out", layer), (f"{name}/A", layer.lora_A["default"]))
    ]
    b = batch(tok)
    logits_ = method.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    logits_.float().logsumexp(-1).mean().backward()
    method.after_backward()
    for h in spies:
        h.remove()
    for name, layer in layers.items():
        for key, W in ((f"{name}/out", layer.lora_B["default"].weight), (f"{name}/A", layer.lora_A["default"].weight)):
            mag = seen[key] / seen[key].sum()
            chosen = mag >= torch.quantile(mag.double(), 0.75).float()
            rows_with_grad = W.grad.abs().sum(dim=1) > 0
            assert not rows_with_grad[~chosen].any(), f"{key}: an unselected row got gradient"
            assert rows_with_grad[chosen].any() and 0 < int(chosen.sum()) <= max(1, round(0.25 * len(mag)) + 1)
    assert method.end_stage()["migu/kept_rows_frac"] < 0.5


def test_migu_unselected_rows_stay_on_a_first_step_but_adamw_momentum_moves_them_later(tmp_path):
    """MIGU masks gradients, not updates: on the stage's first AdamW step a row without gradient keeps its value; on a
    later step a row unselected then but selected before still moves (the momentum of its earlier gradient). So
    top_fraction 0.3 does not freeze 70% of the rows, in the authors' code as here (docs/baselines.md)."""
    method, tok = tiny_method("migu", tmp_path, migu={"top_fraction": 0.25, "mask_first_task": True})
    method.begin_stage(ctx(1, tmp_path))
    with torch.no_grad():
        for p in method.trainable().values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    params = method.trainable()
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.0)  # the harness's default: no decay
    b = batch(tok)
    moved_unselected, prev_selected = 0, {}
    for step in range(3):
        before = {k: p.detach().clone() for k, p in params.items()}
        opt.zero_grad()
        method.model(
            input_ids=b["input_ids"] * (step + 1) % 400, attention_mask=b["attention_mask"]
        ).logits.float().logsumexp(-1).mean().backward()
        method.after_backward()
        selected = {k: p.grad.abs().sum(dim=1) > 0 for k, p in params.items()}
        opt.step()
        for k, p in params.items():
            moved = (p.detach() != before[k]).any(dim=1)
            if step == 0:
                assert not moved[~selected[k]].any(), f"{k}: an unselected row moved on the first step"
            else:
                moved_unselected += int((moved & ~selected[k] & prev_selected[k]).sum())
        prev_selected = selected
    assert moved_unselected > 0  # momentum: what the docs say top_fraction does not mean


def test_migu_row_mask_keeps_the_top_fraction():
    assert row_mask(torch.tensor([1.0, 8.0, 3.0, 2.0, 6.0, 0.5, 4.0, 7.0]), 0.25).tolist() == [0, 1, 0, 0, 0, 0, 0, 1]
    assert row_mask(torch.tensor([1.0, 2.0, 3.0]), 1.0).tolist() == [1, 1, 1]


# --- every method ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_and_table_show_every_new_method(runs, capsys):
    from harness.report import write_report

    index = write_report("nb", runs.parent, None)
    html = Path(index).read_text()
    rows = json.loads((Path(index).parent / "comparison.json").read_text())["rows"]
    for name, display in (("nlora", "N-LoRA"), ("inflora", "InfLoRA"), ("ewc", "EWC"), ("migu", "MIGU")):
        assert display in html and any(r["method"] == name for r in rows)
        assert json.loads((runs / name / "seed-0" / "summary.json").read_text())["complete"] is True


@pytest.mark.slow
@pytest.mark.parametrize("method", NEW)
def test_export_gives_a_stock_peft_adapter_with_the_same_logits(runs, tmp_path, method):
    run_dir = runs / method / "seed-0"
    out = export_adapter(run_dir, tmp_path / "out")
    ref, got = logits(harness_model(run_dir, 3).model), logits(stock(out))
    if METHODS[method].per_task_adapters:  # stacked into one rank-T·r adapter: the same ΔW, summed in another order
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, ref)
    assert not torch.equal(got, logits(load_model("tiny-llama")[0])), "the adapter must change the outputs"


def test_fsdp_refuses_the_methods_that_act_on_whole_tensors_in_the_step(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, verb in (("nlora", "extra_loss"), ("ewc", "extra_loss"), ("migu", "after_backward")):
        with pytest.raises(ConfigError, match=f"{name} .*{verb}.*--distributed ddp"):
            D.check_fsdp_method(METHODS[name], Method, "fsdp")
        D.check_fsdp_method(METHODS[name], Method, "ddp")
    D.check_fsdp_method(METHODS["inflora"], Method, "fsdp")  # A is designed before the stage; the step is plain


def test_ewc_lambda_is_spelled_lambda_in_yaml_flags_and_grid(tmp_path):
    from harness.config_loading import load_config, parse_cli_value
    from harness.run.planning import variants

    yml = tmp_path / "c.yaml"
    yml.write_text("methods: [ewc]\newc: {lambda: 7}\n")
    cfg = load_config(yml)
    assert cfg.ewc.lambda_ == 7 and cfg.to_yaml_dict()["ewc"] == {"lambda": 7.0, "fisher_samples": 64}
    assert (
        load_config(None, {**cfg.to_yaml_dict(), "ewc.lambda": "3"}).ewc.lambda_ == 3
    )  # the config a run folder keeps
    grid = load_config(None, {"methods": ["ewc"], "grid": parse_cli_value("grid", "ewc.lambda=0,5")})
    assert [(v[1], v[2].ewc.lambda_) for v in variants(grid)] == [
        ({"ewc.lambda": 0.0}, 0.0),
        ({"ewc.lambda": 5.0}, 5.0),
    ]
