"""Mask capacity is exact on real module shapes: floor(1/p) disjoint tasks fit, one more is refused up front."""

import math

import pytest
import torch

from harness.errors import CapacityError
from harness.methods.lori import masks as M
from harness.models import linear_shapes, model_config
from harness.run.planning import b_shapes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def smollm2_b_shapes():
    config = model_config("smollm2-135m")  # read without loading weights
    assert config is not None
    return b_shapes(linear_shapes(config), TARGETS, 8)


def test_real_shapes_are_smollm2s(smollm2_b_shapes):
    q = smollm2_b_shapes["model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert q == (576, 8) and math.prod(q) == 4608  # the module where round(p·n) broke the promise
    assert len(smollm2_b_shapes) == 30 * 7


@pytest.mark.parametrize("p", [0.1, 0.2, 0.3, 0.07, 0.125, 1 / 3])
def test_floor_one_over_p_disjoint_tasks_fit_and_one_more_is_refused(smollm2_b_shapes, p):
    fit = M.max_disjoint_tasks(p)
    assert fit == math.floor(1 / p + 1e-12)
    for scope in ("module", "global"):
        M.check_capacity(smollm2_b_shapes, fit, density=p, policy="disjoint", max_overlap=0.0, scope=scope)
        with pytest.raises(CapacityError, match=f"floor\\(1/density\\) = {fit}\\b"):
            M.check_capacity(smollm2_b_shapes, fit + 1, density=p, policy="disjoint", max_overlap=0.0, scope=scope)


def test_the_masks_really_fit_on_the_largest_and_smallest_modules(smollm2_b_shapes):
    shapes = {k: v for k, v in smollm2_b_shapes.items() if k.startswith("model.layers.0.")}
    masks = []
    for t in range(M.max_disjoint_tasks(0.1)):  # 10 tasks: with round(), q_proj ran out at the 10th
        masks.append(
            M.allocate(
                M.random_scores(shapes, t),
                M.union(masks) if masks else None,
                density=0.1,
                policy="disjoint",
                scope="module",
            )
        )
    for k, shape in shapes.items():
        assert int(sum(m[k].int() for m in masks).max()) == 1
        assert all(int(m[k].sum()) == math.floor(0.1 * math.prod(shape)) for m in masks)
    assert torch.all(M.union(masks)["model.layers.0.self_attn.q_proj.lora_B.weight"].sum() == 4600)


def test_refusal_message_says_ten_for_a_tenth():
    with pytest.raises(CapacityError, match=r"floor\(1/density\) = 10\b"):
        M.check_capacity({"a": (576, 8)}, 11, density=0.1, policy="disjoint", max_overlap=0.0, scope="module")


@pytest.mark.parametrize("density,ok", [(0.25, True), (0.3, False)])
def test_validate_checks_capacity_on_the_real_model_before_anything_is_written(tmp_path, capsys, density, ok):
    from harness.cli import main

    results = tmp_path / "results"
    rc = main(
        [
            "validate",
            "--suite",
            "default",
            "--model",
            "smollm2-135m",
            "--methods",
            "lori-s",
            "--mask-density",
            str(density),
            "--results-dir",
            str(results),
        ]
    )
    err = capsys.readouterr().err
    assert (rc == 0) == ok, err
    if not ok:
        assert rc == 2 and "capacity" in err and "floor(1/density) = 3" in err
    assert not results.exists()
