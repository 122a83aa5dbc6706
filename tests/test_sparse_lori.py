"""LoRI-S state as sparse as LoRI-S: same training as the old dense path, O(nnz) optimizer, stage files and checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_adapters import EXAMPLES, TARGETS, ByteTok, tiny_model

from harness.adapters.sequence import AdapterSequence
from harness.config import ExperimentConfig
from harness.errors import HarnessError
from harness.methods import METHODS, StageContext
from harness.methods.lori import masks as M
from harness.methods.lori import stage_files as SF
from harness.methods.lori.sparse import SparseStage, mask_index
from harness.run.checkpoint import Progress, StageCheckpointer
from harness.run.recipe import Recipe, make_optimizer
from harness.run.train import train_stage, train_step
from harness.seeding import stable_seed


class DenseReference:
    """The old LoRI-S step, kept here as the reference: dense B trains, its gradient is masked after backward,
    and every entry outside the mask is copied back from a stage-start snapshot after the optimizer step."""

    def __init__(self, params, masks):
        self.params, self.masks = params, masks
        self.snapshot = {k: p.detach().clone() for k, p in params.items()}

    def extra_loss(self):
        return None

    @torch.no_grad()
    def after_backward(self):
        for k, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[k].to(p.grad.dtype))

    @torch.no_grad()
    def after_step(self):
        for k, p in self.params.items():
            p.copy_(torch.where(self.masks[k], p, self.snapshot[k]))


def recipe(wd=0.1, clip=0.0):
    return Recipe(
        weight_decay=wd,
        grad_clip=clip,
        warmup_steps=2,
        warmup_ratio=0.0,
        loss_reduction="token",
        completion_eos="always",
    )


DENSE_LAYOUT: dict[int, tuple] = {}  # id(values parameter) -> (flat positions, B's shape), for dense_order_clip


def dense_order_clip(params, max_norm, *args, **kw):
    """clip_grad_norm_ with the norm summed over B-shaped gradients (values scattered into zeros), as the dense path sums it."""
    params = [p for p in params if p.grad is not None]
    dense = []
    for p in params:
        index, shape = DENSE_LAYOUT.get(id(p), (None, None))
        dense.append(p.grad if index is None else torch.zeros(shape).reshape(-1).index_put((index,), p.grad))
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(dense)))
    torch._foreach_mul_([p.grad for p in params], torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def two_stages(sparse: bool, clip: float, policy="independent", steps=8):
    """Two tasks on one shared adapter; task 2's mask may reuse task 1's positions (policy), weight decay on."""
    seq = AdapterSequence(tiny_model(), rank=4, alpha=8, targets=TARGETS, train_A=False, seed=0)
    DENSE_LAYOUT.clear()  # ids of freed tensors get reused
    masks = []
    for t in (1, 2):
        name = seq.begin_task(t)
        shapes = {k: tuple(m.weight.shape) for k, m in seq.b_modules(name).items()}
        m = M.allocate(
            M.random_scores(shapes, stable_seed(0, "task", t)),
            M.union(masks) if masks else None,
            density=0.3,
            policy=policy,
            max_overlap=0.5,
            scope="module",
        )
        masks.append(m)
        stage = SparseStage(seq.b_modules(name), {k: mask_index(v) for k, v in m.items()}) if sparse else None
        if sparse:
            DENSE_LAYOUT.update({id(v): (stage.index()[k], shapes[k]) for k, v in stage.values().items()})
        params = {n: p for n, p in seq.model.named_parameters() if p.requires_grad}
        hooks = None if sparse else DenseReference(seq.b_params(name), m)
        train_stage(
            seq.model,
            ByteTok(),
            EXAMPLES,
            params,
            recipe=recipe(clip=clip),
            lr=5e-2,
            epochs=10,
            batch_size=4,
            max_steps=steps,
            stage=t,
            hooks=hooks,
            progress=False,
        )
        if sparse:
            stage.commit()
            DENSE_LAYOUT.clear()
    return {k: p.detach().clone() for k, p in seq.b_params(name).items()}, masks


@pytest.mark.parametrize("policy", ["disjoint", "independent"])
def test_sparse_training_equals_the_dense_reference_bit_for_bit_without_clipping(policy):
    dense, masks = two_stages(False, clip=0.0, policy=policy)
    sparse, _ = two_stages(True, clip=0.0, policy=policy)
    for k in dense:
        assert torch.equal(dense[k], sparse[k]), k
    assert any(torch.count_nonzero(v) for v in sparse.values())


def test_with_active_clipping_the_difference_is_rounding_of_the_norm():
    """Clipping sums the squared gradient in another order (the dense path's zeros add nothing), so its
    coefficient can differ in the last bit: B then differs by rounding only. Bound: 1e-5 of max |B| after 8 steps."""
    dense, masks = two_stages(False, clip=1e-3)  # far below the gradient norm: clipping acts at every step
    sparse, _ = two_stages(True, clip=1e-3)
    scale = max(float(v.abs().max()) for v in dense.values())
    diff = max(float((dense[k] - sparse[k]).abs().max()) for k in dense)
    assert scale > 0 and diff <= 1e-5 * scale, (diff, scale)
    union = M.union(masks)
    for k in sparse:  # and the invariant is exact either way
        assert torch.all(sparse[k][~union[k]] == 0)


def test_with_clipping_the_only_difference_is_the_norms_summation_order(monkeypatch):
    """Summing the norm over B-shaped gradients in both paths makes them bit-identical again, clipping active."""
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", dense_order_clip)
    dense, _ = two_stages(False, clip=1e-3)
    sparse, _ = two_stages(True, clip=1e-3)
    for k in dense:
        assert torch.equal(dense[k], sparse[k]), k


def lori_s(tmp_path, a_mode="shared", **kw):
    cfg = ExperimentConfig(model="tiny-llama", rank=4, alpha=8, targets=TARGETS, a_mode=a_mode, mask_density=0.2, **kw)
    return METHODS["lori-s"](cfg, seed=0, tasks=["a", "b"], base_model=tiny_model())


def run_stage(method, t, tmp_path, steps=4, checkpointer=None, resumed_extra=None):
    method.begin_stage(
        StageContext(stage=t, task="ab"[t - 1], run_dir=tmp_path, calibrate=None, resumed_extra=resumed_extra)
    )
    if checkpointer is not None:
        checkpointer.extra = method.checkpoint_extra()
    train_stage(
        method.model,
        ByteTok(),
        EXAMPLES,
        method.trainable(),
        recipe=recipe(clip=1.0),
        lr=5e-2,
        epochs=10,
        batch_size=4,
        max_steps=steps,
        stage=t,
        hooks=method,
        checkpointer=checkpointer,
        progress=False,
    )


def test_optimizer_gradients_and_moments_cover_only_the_mask(tmp_path):
    method = lori_s(tmp_path)
    method.begin_stage(StageContext(stage=1, task="a", run_dir=tmp_path, calibrate=None))
    nnz = sum(v.numel() for v in method.stage_index.values())
    params = list(method.trainable().values())
    assert sum(p.numel() for p in params) == nnz and all(
        ".parametrizations.weight.0.values" in n for n in method.trainable()
    )
    opt, sched = make_optimizer(params, 1e-2, recipe(), 4)
    batch = {"input_ids": torch.randint(2, 60, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    train_step(method.model, batch, params, opt, sched, recipe(), method)
    moments = [v for st in opt.state.values() for key, v in st.items() if key in ("exp_avg", "exp_avg_sq")]
    assert sum(v.numel() for v in moments) == 2 * nnz
    assert all(not p.requires_grad for n, p in method.model.named_parameters() if not n.endswith(".values"))
    assert sum(t.numel() for t in method.held_tensors()) == nnz  # the mask positions, once; no copy of B


@pytest.mark.parametrize("a_mode", ["shared", "per_task"])
def test_restore_from_stage_files_rebuilds_the_trained_model_exactly(tmp_path, a_mode):
    method = lori_s(tmp_path, a_mode)
    folders = {}
    for t in (1, 2):
        run_stage(method, t, tmp_path)
        method.end_stage()
        folders[t] = tmp_path / f"stage{t}"
        folders[t].mkdir()
        method.save_stage(folders[t])
    assert {p.name for p in folders[2].iterdir()} == {SF.MASKS, SF.VALUES, SF.META}  # no dense B, no A
    x = torch.randint(2, 60, (2, 12))
    method.model.eval()
    ref = method.model(input_ids=x).logits
    fresh = lori_s(tmp_path, a_mode)
    fresh.restore(folders)
    fresh.model.eval()
    assert torch.equal(fresh.model(input_ids=x).logits, ref)
    for name in method.adapters.adapters:
        for k, p in method.adapters.b_params(name).items():
            assert torch.equal(fresh.adapters.b_params(name)[k], p)
    assert [M.mask_nnz(fresh._dense(m)) for m in fresh.task_masks] == [
        M.mask_nnz(method._dense(m)) for m in method.task_masks
    ]


def test_a_that_does_not_regenerate_to_its_stored_hash_is_refused(tmp_path):
    method = lori_s(tmp_path)
    run_stage(method, 1, tmp_path, steps=1)
    method.end_stage()
    method.save_stage(tmp_path)
    meta = json.loads((tmp_path / SF.META).read_text())
    (tmp_path / SF.META).write_text(json.dumps({**meta, "a_sha256": "0" * 64}))
    with pytest.raises(HarnessError, match="does not match the A this stage trained with"):
        lori_s(tmp_path).restore({1: tmp_path})


def test_mid_stage_checkpoint_holds_only_the_values_and_resumes_exactly(tmp_path):
    whole = lori_s(tmp_path)
    run_stage(whole, 1, tmp_path, steps=6)
    whole.end_stage()
    ckdir = tmp_path / "seq"
    first = lori_s(tmp_path)
    run_stage(first, 1, tmp_path, steps=3, checkpointer=StageCheckpointer(ckdir, 1, "a", every=3))
    tensors = load_file(str(ckdir / "checkpoint" / "tensors.safetensors"))
    nnz = sum(v.numel() for v in first.stage_index.values())
    assert sum(v.numel() for k, v in tensors.items() if k.startswith("param/")) == nnz
    assert sum(v.numel() for k, v in tensors.items() if k.startswith("opt/") and not k.endswith("/step")) == 2 * nnz
    assert sum(v.numel() for k, v in tensors.items() if k.startswith("extra/mask/")) == nnz
    second = lori_s(tmp_path)  # a fresh process: the mask comes back from the checkpoint
    ck = StageCheckpointer(ckdir, 1, "a", every=3)
    run_stage(second, 1, tmp_path, steps=6, checkpointer=ck, resumed_extra=ck.load_extra())
    second.end_stage()
    for k, p in whole.adapters.b_params("default").items():
        assert torch.equal(second.adapters.b_params("default")[k], p), k


def test_a_mid_stage_checkpoint_from_the_older_dense_layout_is_one_clear_refusal(tmp_path):
    """A dense-era checkpoint (lora_B.weight, not the sparse values) cannot be restored: say so and what to do."""
    ckdir = tmp_path / "seq"
    dense = {"model.q_proj.lora_B.default.weight": torch.nn.Parameter(torch.zeros(4, 2))}
    opt = torch.optim.AdamW(dense.values(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ck = StageCheckpointer(ckdir, 2, "b", every=1)
    ck.save(dense, opt, sched, torch.Generator(), Progress())
    sparse = {"model.q_proj.lora_B.default.parametrizations.weight.0.values": torch.nn.Parameter(torch.zeros(3))}
    opt2 = torch.optim.AdamW(sparse.values(), lr=1e-3)
    with pytest.raises(HarnessError, match=r"another harness version\. Delete that folder .* stage 2 restarts"):
        ck.restore(sparse, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0), torch.Generator())


def test_a_lori_s_stage_folder_is_a_small_fraction_of_a_lora_stage(tmp_path):
    """Measured on tiny-llama (r=8, all 7 projections, density 0.1): every file the method writes for a stage."""
    from harness.models import load_model

    sizes = {}
    for name in ("lora", "lori-s"):
        model, _ = load_model("tiny-llama")
        method = METHODS[name](ExperimentConfig(model="tiny-llama"), seed=0, tasks=["a"], base_model=model)
        method.begin_stage(StageContext(stage=1, task="a", run_dir=tmp_path, calibrate=None))
        with (
            torch.no_grad()
        ):  # trained-looking values (file sizes do not depend on them, but zeros would hide a dense write)
            for p in method.trainable().values():
                p.uniform_(-1, 1)
        method.end_stage()
        folder = tmp_path / name
        folder.mkdir()
        method.save_stage(folder)
        sizes[name] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert sizes["lori-s"] <= 0.15 * sizes["lora"], sizes


@pytest.mark.parametrize("a_mode", ["shared", "per_task"])
def test_a_sequence_begun_in_the_older_dense_layout_resumes_and_exports(tmp_path, a_mode):
    """Stage 1 committed by an older harness (dense adapter/, uint8 masks), stage 2 by this one: restore and export agree."""
    from peft import PeftModel
    from safetensors.torch import save_file

    from harness.models import load_model
    from harness.run.export import export_adapter

    cfg = ExperimentConfig(model="tiny-llama", a_mode=a_mode)
    method = METHODS["lori-s"](cfg, seed=0, tasks=["a", "b"], base_model=load_model("tiny-llama")[0])
    run_dir = tmp_path / "run"
    (run_dir / "config.yaml").parent.mkdir()
    (run_dir / "config.yaml").write_text(
        "model: tiny-llama\nmethods: [lori-s]\n"
    )  # every config.yaml names its methods
    folders = {t: run_dir / "stages" / f"{t}-{'ab'[t - 1]}" for t in (1, 2)}
    for t, folder in folders.items():
        method.begin_stage(StageContext(stage=t, task="ab"[t - 1], run_dir=run_dir, calibrate=None))
        with torch.no_grad():
            for p in method.trainable().values():
                p.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(t))
        method.end_stage()
        folder.mkdir(parents=True)
        if t == 1:  # what the older harness wrote
            method.adapters.save(folder)
            save_file(
                {k: v.to(torch.uint8) for k, v in method._dense(method.stage_index).items()}, str(folder / SF.MASKS)
            )
        else:
            method.save_stage(folder)
        (folder / "stage.json").write_text("{}")
    x = torch.randint(2, 500, (2, 10))
    method.model.eval()
    ref = method.model(input_ids=x).logits.detach()
    fresh = METHODS["lori-s"](cfg, seed=0, tasks=["a", "b"], base_model=load_model("tiny-llama")[0])
    fresh.restore(folders)
    fresh.model.eval()
    assert torch.equal(fresh.model(input_ids=x).logits, ref)
    assert len(fresh.task_masks) == 2
    loaded = PeftModel.from_pretrained(load_model("tiny-llama")[0], str(export_adapter(run_dir, tmp_path / "out")))
    loaded.eval()
    if a_mode == "shared":
        assert torch.equal(loaded(input_ids=x).logits, ref)
    else:  # two adapters stacked into one: float rounding
        torch.testing.assert_close(loaded(input_ids=x).logits, ref, rtol=1e-5, atol=1e-5)
