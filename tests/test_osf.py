"""OSF through PEFT's OSF tuner: the frozen subspace stays put, resume, export, verify, the base model given back."""

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
from harness.methods.osf import FILE, frozen_share
from harness.models import load_model
from harness.run.export import export_adapter


def osf(**knobs):
    return build("osf", **knobs)


def frozen_basis(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_h, V_h): the top-k singular directions of W, as PEFT's OSF layer computes them (fp32 SVD)."""
    U, _, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return U[:, :k], Vh[:k]


def zero(x: torch.Tensor, of: torch.Tensor) -> None:
    """x, a projection of `of`, is zero up to fp32 rounding: below 1e-3 of `of`'s largest entry (a broken property
    leaves a part of the order of `of` itself; SVD rounding differs with the CPU thread count, ~1e-5 here)."""
    scale = float(of.detach().abs().max())
    assert float(x.abs().max()) <= 1e-3 * scale, f"{float(x.abs().max()):.3g} is not zero next to {scale:.3g}"


# --- the defining property --------------------------------------------------------------------------------------
def test_training_leaves_each_weights_part_in_its_frozen_subspace_unchanged_and_the_trained_factors_orthogonal(
    tmp_path,
):
    method, tok = osf()
    first = {}  # module -> (W_0, U_h, V_h of stage 1)
    for t in (1, 2):
        method.begin_stage(ctx(t, tmp_path))
        layers = dict(method.layers())
        before = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}  # W_{t-1}
        train(method, tok, t)
        moved = 0.0
        for n, layer in layers.items():
            k = layer.effective_rank["default"]
            assert k == int(min(before[n].shape) * frozen_share(method.cfg.osf, t, 3))
            Uh, Vh = frozen_basis(before[n], k)
            p = layer.osf_svd_params["default"]
            with torch.no_grad():
                delta = layer.get_delta_weight("default")  # W_t - W_{t-1}
            zero(Uh.T @ delta, delta)  # the weight's part in its frozen subspace did not move ...
            zero(delta @ Vh.T, delta)
            zero(Uh.T @ p["U_low"].detach(), p["U_low"])  # ... because what trains is orthogonal to it
            zero(p["V_low"].detach() @ Vh.T, p["V_low"])
            first.setdefault(n, (before[n], Uh, Vh))
            if (
                t == 2
            ):  # stage 1's frozen subspace, inside stage 2's here (see harness/methods/osf.py): unchanged since W_0
                W0, Uh1, Vh1 = first[n]
                zero(Uh1.T @ (before[n] + delta - W0), before[n] + delta - W0)
                zero((before[n] + delta - W0) @ Vh1.T, before[n] + delta - W0)
            moved = max(moved, float(delta.abs().max()))
        assert moved > 0.1, "training must move the weights for the check to mean anything"
        assert method.end_stage()["osf/frozen_drift"] < 1e-6


def test_unload_gives_the_base_model_back_bit_identical(tmp_path):
    method, tok = osf()
    original = {n: p.detach().clone() for n, p in method.base.named_parameters()}
    for t in (1, 2):
        method.begin_stage(ctx(t, tmp_path))
        train(method, tok, t, steps=2)
        method.end_stage()
    assert not torch.equal(
        next(method.layers())[1].base_layer.weight, original["model.layers.0.self_attn.q_proj.weight"]
    )
    base = method.unload()
    got = dict(base.named_parameters())
    assert got.keys() == original.keys() and all(torch.equal(got[n], original[n]) for n in original)


def test_the_frozen_share_grows_linearly_and_the_knobs_are_checked():
    k = ExperimentConfig(methods=["osf"]).osf
    assert [frozen_share(k, t, 3) for t in (1, 2, 3)] == pytest.approx([0.3, 0.5, 0.7])
    assert frozen_share(k, 1, 1) == 0.3
    for bad in ({"freeze_first": 0.8, "freeze_last": 0.5}, {"freeze_first": 0}, {"freeze_last": 1.0}, {"share": 0.5}):
        with pytest.raises(ValidationError, match="osf"):
            ExperimentConfig(methods=["osf"], osf=bad)


# --- resume ------------------------------------------------------------------------------------------------------
def state(method) -> dict[str, torch.Tensor]:
    """Every tensor of the model: base weights (W_{t-1}), OSF factors and their initial values."""
    return {n: t.detach().clone() for n, t in [*method.model.named_parameters(), *method.model.named_buffers()]}


def test_a_stage_resumed_from_the_stage_folder_and_a_mid_stage_checkpoint_ends_bit_identical(tmp_path):
    check_mid_stage_resume(osf, state, tmp_path)


# --- a whole sequence --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`harness run --methods osf` on the smoke suite's three tasks; the sequence folder. The experiment shares the
    method's name (results/osf/osf/seed-0): resume must still find the experiment folder, not the method's."""
    results = tmp_path_factory.mktemp("osf")
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
                "osf",
                "--tasks",
                ",".join(TASKS),
                "--eval-limit",
                "8",
                "--eval-schedule",
                "diagonal_final",
                "--results-dir",
                str(results),
                "--experiment",
                "osf",
            ]
        )
        == 0
    )
    return results / "osf" / "osf" / "seed-0"


@pytest.mark.slow
def test_a_smoke_run_passes_harness_verify_and_keeps_safetensors_stage_files(run):
    assert main(["verify", str(run)]) == 0
    shares = [float(json_share(d)) for d in stage_dirs(run)]
    assert shares == pytest.approx([0.3, 0.5, 0.7])  # freeze_first → freeze_last
    assert all(load_file(str(d / FILE)) for d in stage_dirs(run))
    assert not [p for p in run.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]


def json_share(stage_dir: Path) -> float:
    import json  # noqa: PLC0415 - lazy: test helper only

    return json.loads((stage_dir / "osf.json").read_text())["frozen_share"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_export_gives_a_stock_peft_adapter_with_the_harness_models_logits(run, tmp_path, stage):
    out = export_adapter(run, tmp_path / "out", stage=stage)
    ref, got = logits(harness_model(run, stage).model), logits(stock(out))
    # W0 + one float64 ΔW (SVD) against the harness's weights merged stage by stage in fp32: float rounding apart
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, logits(load_model("tiny-llama")[0])), "the adapter must change the outputs"


@pytest.mark.slow
def test_a_dropped_last_stage_is_retrained_bit_identically_on_resume(run, tmp_path):
    again_dir, last = resume_without_last_stage(run, tmp_path)
    again, before = load_file(str(again_dir / FILE)), load_file(str(last / FILE))
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in again)
