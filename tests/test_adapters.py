"""LoRI invariants: frozen A, exact masks, untouched earlier tasks, allocation policies, counting, persistence."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from harness.adapters.sequence import AdapterSequence, init_A
from harness.errors import CapacityError
from harness.methods.lori import masks as M
from harness.methods.lori import stage_files as SF
from harness.methods.lori.sparse import SparseStage, mask_index
from harness.run.recipe import Recipe
from harness.run.train import train_stage
from harness.seeding import stable_seed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ByteTok:
    """Minimal tokenizer for train_stage: bytes as ids."""

    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + b % 60 for b in text.encode()]}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


EXAMPLES = [{"prompt": f"q{i} is", "completion": f" a{i % 3}"} for i in range(24)]


def train(seq, name, masks=None, wd=0.1, steps=6, lr=5e-2, stage=1):
    """Train like the lori-s method: only the mask's values are parameters (masks=None: everything that requires grad)."""
    sparse = (
        SparseStage(seq.b_modules(name), {k: mask_index(v) for k, v in masks.items()}) if masks is not None else None
    )
    recipe = Recipe(
        weight_decay=wd,
        grad_clip=1.0,
        warmup_steps=0,
        warmup_ratio=0.0,
        loss_reduction="token",
        completion_eos="always",
    )
    params = {n: p for n, p in seq.model.named_parameters() if p.requires_grad}
    if sparse is not None:
        assert sum(p.numel() for p in params.values()) == M.mask_nnz(
            masks
        )  # the optimizer sees only the mask's entries
    train_stage(
        seq.model,
        ByteTok(),
        EXAMPLES,
        params,
        recipe=recipe,
        lr=lr,
        epochs=10,
        batch_size=4,
        max_steps=steps,
        stage=stage,
        progress=False,
    )
    if sparse is not None:
        sparse.commit()


def allocate_random(seq, name, t, policy="disjoint", density=0.1, max_overlap=0.0):
    shapes = {k: tuple(p.shape) for k, p in seq.b_params(name).items()}
    used = M.union(seq.task_masks) if seq.task_masks else None
    m = M.allocate(
        M.random_scores(shapes, stable_seed(0, "task", t)),
        used,
        density=density,
        policy=policy,
        max_overlap=max_overlap,
        scope="module",
    )
    seq.task_masks.append(m)
    return m


def lori_s(a_mode="shared"):
    seq = AdapterSequence(tiny_model(), rank=4, alpha=8, targets=TARGETS, a_mode=a_mode, train_A=False, seed=0)
    seq.task_masks = []  # M_1..M_t, as the lori-s method keeps them
    return seq


def test_masked_entries_stay_exactly_zero_with_weight_decay():
    seq = lori_s()
    name = seq.begin_task(1)
    m = allocate_random(seq, name, 1)
    train(seq, name, m, wd=0.5)
    for k, p in seq.b_params(name).items():
        assert torch.all(p[~m[k]] == 0.0), k
        assert torch.count_nonzero(p[m[k]]) > 0, f"{k}: masked-in entries should have trained"


def test_A_is_frozen_and_bit_identical_after_training():
    seq = lori_s()
    name = seq.begin_task(1)
    before = {k: v.clone() for k, v in seq.a_tensors(name).items()}
    assert all(not p.requires_grad for p in [l.lora_A[name].weight for _, l in seq.layers()])
    train(seq, name, allocate_random(seq, name, 1))
    for k, v in seq.a_tensors(name).items():
        assert torch.equal(v, before[k])


def test_earlier_task_entries_unchanged_after_later_stage_shared_A():
    seq = lori_s("shared")
    name = seq.begin_task(1)
    m1 = allocate_random(seq, name, 1)
    train(seq, name, m1)
    after1 = {k: p.detach().clone() for k, p in seq.b_params(name).items()}
    name2 = seq.begin_task(2)
    assert name2 == name
    m2 = allocate_random(seq, name2, 2)
    train(seq, name2, m2, wd=0.5, stage=2)
    for k, p in seq.b_params(name).items():
        assert torch.equal(p[m1[k]], after1[k][m1[k]]), k  # task 1's entries: bit-identical
        assert torch.all(p[~(m1[k] | m2[k])] == 0)


def test_per_task_mode_freezes_earlier_adapters_bit_identical():
    seq = lori_s("per_task")
    n1 = seq.begin_task(1)
    train(seq, n1, allocate_random(seq, n1, 1))
    b1 = {k: p.detach().clone() for k, p in seq.b_params(n1).items()}
    a1 = {k: v.clone() for k, v in seq.a_tensors(n1).items()}
    n2 = seq.begin_task(2)
    assert n2 != n1 and seq.model.active_adapters == [n1, n2]
    train(seq, n2, allocate_random(seq, n2, 2), stage=2)
    for k, p in seq.b_params(n1).items():
        assert torch.equal(p, b1[k])
    for k, v in seq.a_tensors(n2).items():
        assert not torch.equal(v, a1[k]), "per-task A must differ between tasks"


def test_disjoint_masks_share_no_position():
    shapes = {"a": (64, 8), "b": (32, 8)}
    masks = []
    for t in range(1, 6):
        masks.append(
            M.allocate(
                M.random_scores(shapes, t),
                M.union(masks) if masks else None,
                density=0.2,
                policy="disjoint",
                scope="module",
            )
        )
    for i in range(5):
        for j in range(i):
            assert all(not torch.any(masks[i][k] & masks[j][k]) for k in shapes)
    assert all(int(m[k].sum()) == math.floor(0.2 * math.prod(shapes[k])) for m in masks for k in shapes)


@pytest.mark.parametrize("x", [0.0, 0.25, 0.5])
def test_max_overlap_is_respected(x):
    shapes = {"a": (100, 10)}
    m1 = M.allocate(M.random_scores(shapes, 1), None, density=0.3, policy="independent", scope="module")
    # Scores that favour exactly the used positions: the policy must still cap the overlap.
    scores = {"a": m1["a"].float() + 0.01 * torch.rand(100, 10, generator=torch.Generator().manual_seed(0))}
    m2 = M.allocate(scores, m1, density=0.3, policy="max_overlap", max_overlap=x, scope="module")
    k = int(m2["a"].sum())
    overlap = int((m1["a"] & m2["a"]).sum())
    assert overlap <= math.floor(x * k)
    assert overlap == math.floor(x * k)  # the best positions are reused up to the cap


def test_magnitude_mask_is_top_k_of_allowed_positions_global():
    g = torch.Generator().manual_seed(3)
    scores = {"a": torch.rand(20, 4, generator=g), "b": torch.rand(10, 4, generator=g)}
    used = {"a": torch.rand(20, 4, generator=g) < 0.3, "b": torch.zeros(10, 4, dtype=torch.bool)}
    m = M.allocate(scores, used, density=0.25, policy="disjoint", scope="global")
    chosen = torch.cat([scores[k][m[k]] for k in scores])
    allowed_not_chosen = torch.cat([scores[k][~m[k] & ~used[k]] for k in scores])
    assert chosen.numel() == math.floor(0.25 * 120)
    assert not any(torch.any(m[k] & used[k]) for k in scores)
    assert chosen.min() >= allowed_not_chosen.max()


def test_capacity_error_for_impossible_disjoint_sequence():
    with pytest.raises(CapacityError, match="at most 10 tasks fit"):
        M.check_capacity({"a": (100, 10)}, 11, density=0.1, policy="disjoint", max_overlap=0.0, scope="module")
    M.check_capacity({"a": (100, 10)}, 10, density=0.1, policy="disjoint", max_overlap=0.0, scope="module")
    M.check_capacity({"a": (100, 10)}, 50, density=0.1, policy="independent", max_overlap=0.0, scope="module")


def test_allocator_refuses_when_positions_run_out():
    shapes = {"a": (10, 2)}
    masks = []
    with pytest.raises(CapacityError):
        for t in range(4):
            masks.append(
                M.allocate(
                    M.random_scores(shapes, t),
                    M.union(masks) if masks else None,
                    density=0.3,
                    policy="disjoint",
                    scope="module",
                )
            )


def test_parameter_counts_match_llama3_8b_hand_computed():
    # Llama-3-8B, 32 layers: (d_out, d_in) of q,k,v,o,gate,up,down; r = 32.
    layer = {
        "q": (4096, 4096),
        "k": (1024, 4096),
        "v": (1024, 4096),
        "o": (4096, 4096),
        "gate": (14336, 4096),
        "up": (14336, 4096),
        "down": (4096, 14336),
    }
    shapes = {f"{i}.{n}": s for i in range(32) for n, s in layer.items()}
    c = M.count_params(shapes, 32)
    assert c["lora"] == 83_886_080
    assert c["lori_d"] == 44_040_192
    lori_s = sum(M.k_for(32 * d_out, 0.1) for d_out, _ in shapes.values())
    assert lori_s == pytest.approx(4_404_019, abs=224)
    assert lori_s / c["lora"] == pytest.approx(0.0525, abs=5e-4)


def test_param_counts_know_masks(tmp_path):
    from harness.config import ExperimentConfig
    from harness.methods import METHODS, StageContext

    cfg = ExperimentConfig(rank=4, alpha=8, targets=TARGETS, model="tiny-llama")
    method = METHODS["lori-s"](cfg, seed=0, tasks=["a"], base_model=tiny_model())
    method.begin_stage(StageContext(stage=1, task="a", run_dir=tmp_path, calibrate=None))
    nnz = sum(v.numel() for v in method.stage_index.values())
    assert nnz == sum(p.numel() for p in method.trainable().values())
    method.end_stage()
    counts = method.param_counts()
    assert counts["trainable_params_effective"] == nnz
    assert counts["trainable_params_lora_equivalent"] == sum(
        4 * (o + i) for o, i in method.adapters.linear_shapes().values()
    )


def test_overlap_diagnostics():
    a = {"x": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)}
    b = {"x": torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)}
    O = M.mask_overlap_matrix([a, b])
    assert O[0][1] == pytest.approx(1 / 3) and O[1][0] == pytest.approx(1 / 2) and O[0][0] == 1.0
    A = torch.eye(2, 4)
    assert M.subspace_overlap(A, A) == pytest.approx(1 / math.sqrt(2))
    assert M.subspace_overlap(A, torch.eye(4)[2:]) == 0.0


def test_A_init_is_seeded_and_has_the_reference_bound():
    a = init_A((4, 100), init="kaiming_uniform", seed=1, task=1, key="m")
    assert torch.equal(a, init_A((4, 100), init="kaiming_uniform", seed=1, task=1, key="m"))
    assert not torch.equal(a, init_A((4, 100), init="kaiming_uniform", seed=1, task=2, key="m"))
    assert a.abs().max() <= 1 / math.sqrt(100)
    g = init_A((64, 400), init="gaussian", seed=1, task=1, key="m")
    assert g.var().item() == pytest.approx(1 / (3 * 400), rel=0.1)


@pytest.mark.parametrize("a_mode", ["shared", "per_task"])
def test_save_load_gives_identical_logits_and_mask_keys_match_B(tmp_path, a_mode):
    seq = lori_s(a_mode)
    for t in (1, 2):
        name = seq.begin_task(t)
        m = allocate_random(seq, name, t)
        train(seq, name, m, stage=t)
    seq.save(tmp_path)
    SF.save_masks(tmp_path, m)
    x = torch.randint(2, 60, (2, 12))
    seq.model.eval()
    ref = seq.model(input_ids=x).logits
    # Masks file: one tensor per module under the SAME key as its lora_B weight in the adapter file.
    weights = load_file(str(AdapterSequence.adapter_file(tmp_path, name)))
    masks = SF.load_masks(tmp_path)
    assert set(masks) == set(load_file(str(tmp_path / "masks.safetensors"))) == {k for k in weights if ".lora_B." in k}
    zero_outside = M.union(seq.task_masks) if a_mode == "shared" else m
    for k, v in masks.items():
        assert v.shape == weights[k].shape
        assert torch.equal(v, m[k])
        assert torch.all(weights[k][~zero_outside[k]] == 0)

    fresh = lori_s(a_mode)
    for t in (1, 2):
        fresh.begin_task(t)
    fresh.load_weights(tmp_path)
    fresh.model.eval()
    assert torch.equal(fresh.model(input_ids=x).logits, ref)


def test_loading_a_mismatched_checkpoint_is_a_clear_error(tmp_path):
    seq = lori_s()
    seq.begin_task(1)
    seq.save(tmp_path)
    other = AdapterSequence(tiny_model(), rank=8, alpha=16, targets=TARGETS, train_A=False, seed=0)
    other.begin_task(1)
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="shape mismatches"):
        other.load_weights(tmp_path)


def test_lora_trains_A_and_B():
    seq = AdapterSequence(tiny_model(), rank=4, alpha=8, targets=TARGETS, train_A=True, seed=0)
    name = seq.begin_task(1)
    before = {k: v.clone() for k, v in seq.a_tensors(name).items()}
    train(seq, name, None, steps=3)
    assert any(not torch.equal(v, before[k]) for k, v in seq.a_tensors(name).items())


@pytest.mark.parametrize("rank", [1, 5, 8, 12])
def test_mask_bit_packing_round_trips_and_takes_an_eighth_of_a_byte_per_entry(tmp_path, rank):
    g = torch.Generator().manual_seed(rank)
    masks = {
        "m.lora_B.weight": torch.rand(37, rank, generator=g) < 0.3,
        "n.lora_B.weight": torch.rand(3, rank, generator=g) < 0.5,
    }
    SF.save_masks(tmp_path, masks)
    raw = load_file(str(tmp_path / "masks.safetensors"))
    assert raw["m.lora_B.weight"].shape == (37, math.ceil(rank / 8)) and raw["m.lora_B.weight"].dtype == torch.uint8
    back = SF.load_masks(tmp_path)
    assert all(torch.equal(back[k], masks[k]) for k in masks)
    # Bit j (least significant first) of byte c is column 8c + j: a file reader needs nothing else.
    row = masks["m.lora_B.weight"][0]
    assert int(raw["m.lora_B.weight"][0, 0]) == sum(1 << j for j in range(min(8, rank)) if row[j])


def test_masks_of_the_older_dense_layout_still_load(tmp_path):
    from safetensors.torch import save_file

    m = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    save_file({"k.lora_B.weight": m.to(torch.uint8)}, str(tmp_path / "masks.safetensors"))
    assert torch.equal(SF.load_masks(tmp_path)["k.lora_B.weight"], m)
