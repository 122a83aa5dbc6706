"""SD-LoRA: the update Σ α_i B_iA_i/‖B_iA_i‖_F, frozen directions with training magnitudes, resume, export, verify."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from stage_resume import TASKS, build, check_mid_stage_resume, ctx, resume_without_last_stage, train
from test_export import harness_model, logits, stock
from test_methods import stage_dirs

from harness.cli import main
from harness.config import ExperimentConfig
from harness.methods.sdlora import FILE
from harness.models import load_model
from harness.run.export import export_adapter


def sdlora(**knobs):
    return build("sdlora", **knobs)


def perturb(method, t: int) -> None:
    """Move every trainable tensor (B off zero, each α off its start), reproducibly."""
    with torch.no_grad():
        for i, p in enumerate(method.trainable().values()):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * t + i)))


def alphas(method, adapter: str) -> dict[str, float]:
    """α of one adapter per module, read from the model's own parameter names."""
    suffix = f".lora_B.{adapter}.parametrizations.weight.0.alpha"
    return {n[: -len(suffix)]: float(p.detach()) for n, p in method.model.named_parameters() if n.endswith(suffix)}


def direction(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """B A / ‖B A‖_F from the dense product, in float64."""
    BA = B.double() @ A.double()
    return BA / torch.linalg.matrix_norm(BA)


# --- the update ------------------------------------------------------------------------------------------------
def test_each_module_adds_the_sum_of_alpha_times_normalised_earlier_directions_plus_the_scaled_new_adapter(tmp_path):
    method, _ = sdlora()
    s = method.cfg.scale_alpha / method.cfg.rank
    for t in (1, 2, 3):
        method.begin_stage(ctx(t, tmp_path))
        perturb(method, t)
        if t < 3:
            method.end_stage()
    a = {name: alphas(method, name) for name in ("task1", "task2", "task3")}
    assert len(a["task1"]) == 14 and all(v != 1.0 for v in a["task3"].values())
    layers = dict(method.adapters.layers())
    xs = {n: torch.randn(3, lay.in_features, generator=torch.Generator().manual_seed(0)) for n, lay in layers.items()}
    before = {}
    for n, layer in layers.items():
        x = xs[n]
        A = {k: layer.lora_A[k].weight for k in a}
        B = {k: method.directions[i][n] for i, k in enumerate(("task1", "task2"))}
        B["task3"] = layer.lora_B["task3"].parametrizations.weight.original
        new = a["task3"][n] * s * (B["task3"].double() @ A["task3"].double())
        hand = sum(a[k][n] * direction(B[k], A[k]) for k in ("task1", "task2")) + new
        with torch.no_grad():
            before[n] = layer(x) - layer.base_layer(x)  # what PEFT's forward adds, through the parametrizations
        torch.testing.assert_close(before[n].double(), x.double() @ hand.T, rtol=1e-5, atol=1e-6)
    method.end_stage()
    # The new direction is frozen with α_3 := α_3·s·‖B_3A_3‖_F: the stored state says Σ_i α_i B_iA_i/‖B_iA_i‖_F, and
    # the folded plain adapters compute the same as the parametrized model did.
    for n, layer in layers.items():
        x = xs[n]
        A = [layer.lora_A[f"task{i}"].weight for i in (1, 2, 3)]
        stored = sum(float(method.magnitudes[i][n]) * direction(method.directions[i][n], A[i]) for i in range(3))
        with torch.no_grad():
            after = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(after.double(), x.double() @ stored.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(after, before[n], rtol=1e-5, atol=1e-6)


def test_only_the_new_adapter_and_every_magnitude_train_and_earlier_directions_stay_bit_identical(tmp_path):
    method, tok = sdlora()
    method.begin_stage(ctx(1, tmp_path))
    train(method, tok, 1)
    method.end_stage()
    B1 = {n: B.clone() for n, B in method.directions[0].items()}
    A1 = {n: layer.lora_A["task1"].weight.clone() for n, layer in method.adapters.layers()}
    alpha1 = {n: a.clone() for n, a in method.magnitudes[0].items()}
    method.begin_stage(ctx(2, tmp_path))
    names = set(method.trainable())
    per_module = {
        ".lora_A.task2.weight",
        ".lora_B.task2.parametrizations.weight.original",
        ".lora_B.task2.parametrizations.weight.0.alpha",
        ".lora_B.task1.parametrizations.weight.0.alpha",
    }
    assert names == {n + k for n, _ in method.adapters.layers() for k in per_module}
    train(method, tok, 2)
    for n, layer in method.adapters.layers():  # what the forward used: task 1's own B and A, bit for bit
        B_live = layer.lora_B["task1"].parametrizations.weight.original
        assert torch.equal(B_live, B1[n]) and torch.equal(layer.lora_A["task1"].weight, A1[n]), n
    method.end_stage()
    assert all(torch.equal(method.directions[0][n], B1[n]) for n in B1)
    assert all(not torch.equal(method.magnitudes[0][n], alpha1[n]) for n in alpha1), "every α_1 trains in stage 2"


def test_alpha_init_constant_starts_every_magnitude_at_alpha_value_and_the_knobs_are_checked(tmp_path):
    method, _ = sdlora(sdlora={"alpha_init": "constant", "alpha_value": 0.5})
    for t in (1, 2):
        method.begin_stage(ctx(t, tmp_path))
        assert {v for k in method.adapters.adapters for v in alphas(method, k).values()} == {0.5}
        perturb(method, t)
        method.end_stage()
    assert ExperimentConfig(methods=["sdlora"]).sdlora.alpha_init == "carry"
    for bad in ({"alpha_value": 0.5}, {"alpha_init": "constant", "alpha_value": 0}, {"alpha_init": "reset"}):
        with pytest.raises(ValidationError, match="sdlora"):
            ExperimentConfig(methods=["sdlora"], sdlora=bad)


# --- resume ----------------------------------------------------------------------------------------------------
def state(method) -> dict[str, torch.Tensor]:
    """Directions, magnitudes and the adapters' weights (folded lora_B, lora_A) after a stage."""
    out = {f"B/{i}/{n}": B for i, d in enumerate(method.directions) for n, B in d.items()}
    out.update({f"alpha/{i}/{n}": a for i, d in enumerate(method.magnitudes) for n, a in d.items()})
    out.update({n: p.detach().clone() for n, p in method.model.named_parameters() if "lora_" in n})
    return out


def test_a_stage_resumed_from_the_stage_folder_and_a_mid_stage_checkpoint_ends_bit_identical(tmp_path):
    check_mid_stage_resume(sdlora, state, tmp_path)


# --- a whole sequence ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`harness run --methods sdlora` on the smoke suite's three tasks; the sequence folder."""
    results = tmp_path_factory.mktemp("sdlora")
    assert (
        main(
            [
                "run",
                "--suite",
                "smoke",
                "--model",
                "tiny-llama",
                "--seeds",
                "0",
                "--no-progress",
                "--no-report",
                "--methods",
                "sdlora",
                "--tasks",
                ",".join(TASKS),
                "--eval-limit",
                "8",
                "--eval-schedule",
                "diagonal_final",
                "--results-dir",
                str(results),
                "--experiment",
                "sd",
            ]
        )
        == 0
    )
    return results / "sd" / "sdlora" / "seed-0"


@pytest.mark.slow
def test_a_smoke_run_passes_harness_verify(run):
    assert main(["verify", str(run)]) == 0


@pytest.mark.slow
def test_stage_files_keep_earlier_directions_bit_identical_while_their_alphas_change(run):
    stages = stage_dirs(run)
    files = [load_file(str(d / FILE)) for d in stages]
    adapters = [
        {i: load_file(str(d / "adapter" / f"task{i}" / "adapter_model.safetensors")) for i in range(1, t + 1)}
        for t, d in enumerate(stages, start=1)
    ]
    s = 16.0 / 8  # the default alpha 2r over r
    for t in (2, 3):
        for i in range(1, t):
            B = {k: v for k, v in files[t - 1].items() if k.startswith(f"B/{i}/")}
            assert B and all(torch.equal(v, files[i - 1][k]) for k, v in B.items()), f"direction {i} moved in stage {t}"
            A_keys = [k for k in adapters[t - 1][i] if ".lora_A." in k]
            assert all(torch.equal(adapters[t - 1][i][k], adapters[i - 1][i][k]) for k in A_keys)
            now, before = files[t - 1], files[t - 2]
            moved = [k for k in now if k.startswith(f"alpha/{i}/") and not torch.equal(now[k], before[k])]
            assert len(moved) == len(A_keys), f"every α_{i} trains in stage {t}"
    # Each adapter file holds the folded B' with s·B'·A = α·BA/‖BA‖_F, the sum stock PEFT computes.
    last = files[-1]
    for i, sd in adapters[-1].items():
        for k in (k for k in sd if ".lora_B." in k):
            n = k[: -len(".lora_B.weight")]
            want = last[f"alpha/{i}/{n}"].double() * direction(last[f"B/{i}/{n}"], sd[n + ".lora_A.weight"])
            got = s * sd[k].double() @ sd[n + ".lora_A.weight"].double()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def by_hand(run: Path) -> torch.nn.Module:
    """A fresh base model with W0 + Σ_i α_i B_iA_i/‖B_iA_i‖_F written into its weights, from the last stage's files."""
    model = load_model("tiny-llama")[0]
    last = stage_dirs(run)[-1]
    sd = load_file(str(last / FILE))
    with torch.no_grad():
        for key, B in sd.items():
            kind, i, n = key.split("/", 2)
            if kind == "B":
                A = load_file(str(last / "adapter" / f"task{i}" / "adapter_model.safetensors"))[n + ".lora_A.weight"]
                weight = model.get_submodule(n.removeprefix("base_model.model.")).weight
                weight.add_((sd[f"alpha/{i}/{n}"].double() * direction(B, A)).to(weight.dtype))
    return model


@pytest.mark.slow
def test_export_gives_a_stock_peft_adapter_with_the_harness_models_logits(run, tmp_path):
    out = export_adapter(run, tmp_path / "out")
    ref, got = logits(harness_model(run, 3).model), logits(stock(out))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # one stacked rank-3r adapter: another summation order
    torch.testing.assert_close(got, logits(by_hand(run)), rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, logits(load_model("tiny-llama")[0])), "the adapter must change the outputs"


@pytest.mark.slow
def test_a_dropped_last_stage_is_retrained_bit_identically_on_resume(run, tmp_path):
    again_dir, last = resume_without_last_stage(run, tmp_path)
    for f in (FILE, *(f"adapter/task{i}/adapter_model.safetensors" for i in (1, 2, 3))):
        again, before = load_file(str(again_dir / f)), load_file(str(last / f))
        assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in again), f
