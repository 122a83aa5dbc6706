"""`harness bench`: median training-step time and tokens/s per method on the same batch.

Rows, all on the same device and batch:
- `base`: a bare forward+backward through the frozen base model (input embeddings require grad, so the
  backward pass runs through every layer but computes no weight gradient): the floor every adapter pays;
- `peft-bare`: a bare PEFT LoRA loop (transformers + PEFT + AdamW, no harness code): what the harness's
  own step costs is measured against it;
- any of harness/methods, timed through the same train_step as training (with the method's hooks;
  LoRI-S's mask is part of its forward pass), eager and, when `compile` resolves to a mode, compiled.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from harness.io import atomic_write_json
from harness.losses import lm_loss
from harness.methods import METHODS, StageContext
from harness.models import load_model, set_torch_threads
from harness.models.environment import device_name
from harness.precision import autocast_ctx, precision_of, set_tf32
from harness.run.compiled import CompiledLoss, resolve_mode
from harness.run.recipe import Recipe, make_optimizer
from harness.run.train import forward_loss, train_step
from harness.tools.profile_step import format_profile, profile_step
from harness.tools.profile_step import sync as _sync

DEFAULT_METHODS = ("base", "peft-bare", "lora", "lori-d", "lori-s")


def _batch(vocab: int, batch_size: int, seq_len: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    return {
        "input_ids": ids.to(device),
        "labels": ids.clone().to(device),
        "attention_mask": torch.ones_like(ids).to(device),
    }


def _time_steps(step, warmup: int, steps: int, desc: str) -> list[float]:
    times = []
    for i in tqdm(range(warmup + steps), desc=desc, leave=False):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _base_step(model, batch, bf16_autocast: bool):
    """Forward + backward through the frozen model (input embeddings require grad): the floor every adapter pays."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    model.train()

    def step():
        with autocast_ctx(batch["input_ids"].device, bf16_autocast):
            loss = model(**batch).loss
        loss.backward()

    return step


def _nbytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def adapter_memory(method, opt, batch, recipe, bf16_autocast: bool) -> dict[str, int]:
    """Bytes held for training the adapter, measured from the tensors themselves (not from formulas).

    params: every adapter parameter (A and B of every adapter, frozen or not, and LoRI-S's trainable
    values vectors); grads: the gradients a step leaves on the trainable tensors; optimizer: AdamW's
    state tensors; snapshot: whatever the method keeps besides (Method.held_tensors; LoRI-S: the
    mask positions, no copy of B; it lists each tensor once)."""
    model = method.model
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    trainable = list(method.trainable().values())
    with autocast_ctx(batch["input_ids"].device, bf16_autocast):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lm_loss(logits, batch["labels"], recipe.loss_reduction).backward()
    grads = [p.grad for p in trainable if p.grad is not None]
    out = {
        "params_bytes": _nbytes(params),
        "grads_bytes": _nbytes(grads),
        "optimizer_bytes": _nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
        "snapshot_bytes": _nbytes(method.held_tensors()),
    }
    out["total_bytes"] = sum(out.values())
    for p in trainable:
        p.grad = None
    return out


def _peft_bare_step(model, batch, cfg):
    """A bare PEFT LoRA loop, no harness code: transformers + PEFT + AdamW as their users write it (HF's own loss)."""
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.rank, lora_alpha=cfg.scale_alpha, target_modules=list(cfg.targets), lora_dropout=0.0, bias="none"
        ),
    )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr_for("lora"), fused=params[0].device.type == "cuda" or None)
    peft_model.train()

    def step():
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return peft_model, step


def _method_step(name: str, model, batch, cfg, recipe, total: int, compile_mode: str):
    """A method's real harness step (train_step with its hooks), eager or compiled like a stage compiles it."""
    method = METHODS[name](cfg, seed=0, tasks=["bench"], base_model=model)
    method.begin_stage(
        StageContext(
            stage=1,
            task="bench",
            run_dir=Path("."),
            calibrate=lambda *a: None,
            batches=lambda idx, bs: iter([batch]),
            n_examples=batch["input_ids"].shape[0],  # inflora, ewc
            compiled=compile_mode != "none",
        )
    )
    params = list(method.trainable().values())
    opt, sched = make_optimizer(params, cfg.lr_for(name), recipe, total)
    method.model.train()
    loss_fn = CompiledLoss(forward_loss, compile_mode, batch["input_ids"].device)
    step = lambda: train_step(method.model, batch, params, opt, sched, recipe, method, cfg.bf16_autocast, None, loss_fn)  # noqa: E731
    return method, opt, step, loss_fn


def run_bench(
    cfg,
    *,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    batch_size: int = 8,
    seq_len: int = 128,
    steps: int = 10,
    warmup: int = 2,
    memory: bool = False,
    profile: bool = False,
) -> dict:
    """Time the bare base step, a bare PEFT LoRA loop and each method's real training step (eager, and compiled when
    cfg.compile resolves to a mode) on one batch, on the same device.

    Rank, alpha, targets, mask density, recipe, device, dtype and compile come from the experiment config `cfg`.
    Rows: methods[NAME] (eager) and methods["NAME compiled:MODE"]; each has step_s_median, train_tok_s, vs_base,
    vs_peft_bare. With memory=True, also {"memory": {METHOD: {...bytes}}}; with profile=True, {"profile": {ROW: ...}}
    (harness/tools/profile_step.py)."""
    set_torch_threads()
    if cfg.lori.mask_strategy != "random":  # a magnitude mask needs a calibration run; the step itself is the same
        cfg = cfg.model_copy(update={"mask_strategy": "random"})
    model, tok = load_model(
        cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
    )
    set_tf32(cfg.tf32)
    dev = next(model.parameters()).device
    batch = _batch(len(tok), batch_size, seq_len, dev)
    recipe = Recipe.from_config(cfg)
    compiled = resolve_mode(cfg.compile, dev)
    out: dict = {
        "model": cfg.model,
        "device": str(dev),
        "device_name": device_name(dev),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rank": cfg.rank,
        "targets": cfg.targets,
        "steps": steps,
        "precision": precision_of(cfg, model).record(),
        "torch": torch.__version__,
        "methods": {},
    }
    for name in methods:
        for mode in ("none", compiled) if name not in ("base", "peft-bare") and compiled != "none" else ("none",):
            row = name if mode == "none" else f"{name} compiled:{mode}"
            model, times, extra = _time_row(name, model, batch, cfg, recipe, warmup, steps, mode, memory, profile, row)
            med = statistics.median(times)
            out["methods"][row] = {
                "step_s_median": med,
                "train_tok_s": batch_size * seq_len / med,
                "step_s_min": min(times),
                "step_s_max": max(times),
                **extra.get("row", {}),
            }
            for key in ("memory", "profile"):
                if key in extra:
                    out.setdefault(key, {})[row] = extra[key]
    for key in ("base", "peft-bare"):
        ref = out["methods"].get(key, {}).get("step_s_median")
        for m in out["methods"].values():
            if ref:
                m[f"vs_{key.replace('-', '_')}"] = m["step_s_median"] / ref
    return out


def _time_row(name, model, batch, cfg, recipe, warmup, steps, mode, memory, profile, row):
    """(the base model back, step times, extras) of one bench row; the model is unloaded to its base afterwards."""
    extra: dict = {}
    dev = batch["input_ids"].device
    if name == "base":
        step = _base_step(model, batch, cfg.bf16_autocast)
        times = _time_steps(step, warmup, steps, row)
        if profile:
            extra["profile"] = profile_step(step, dev)
        model.disable_input_require_grads()
        return model, times, extra
    if name == "peft-bare":
        peft_model, step = _peft_bare_step(model, batch, cfg)
        times = _time_steps(step, warmup, steps, row)
        if profile:
            extra["profile"] = profile_step(step, dev)
        return peft_model.unload(), times, extra
    method, opt, step, loss_fn = _method_step(name, model, batch, cfg, recipe, warmup + steps + 8, mode)
    t0 = time.perf_counter()
    step()  # the first step (compiles, if compiled) is timed alone
    _sync(dev)
    extra["row"] = {"first_step_s": time.perf_counter() - t0, "compile_used": loss_fn.used}
    times = _time_steps(step, warmup, steps, row)
    if memory and mode == "none":
        extra["memory"] = adapter_memory(method, opt, batch, recipe, cfg.bf16_autocast)
    if profile:
        extra["profile"] = profile_step(step, dev)
    method.end_stage()
    return method.unload(), times, extra


def format_table(res: dict) -> str:
    """Step times, ratios to the bare base step and the bare PEFT loop (and, with --memory, adapter memory in MB;
    with --profile, where each row's time goes) as a plain-text table."""
    rows = [
        f"model {res['model']} on {res.get('device_name', res['device'])}, batch {res['batch_size']}x{res['seq_len']}, "
        f"rank {res['rank']}, {len(res['targets'])} target modules, median of {res['steps']} steps",
        f"{'row':<26}{'step s (median)':>17}{'tokens/s':>11}{'vs base':>9}{'vs peft':>9}{'vs lora':>9}{'1st step s':>11}",
    ]
    lora = res["methods"].get("lora", {}).get("step_s_median")
    ratio = lambda m, k: f"{m[k]:>8.2f}x" if k in m else f"{'':>9}"  # noqa: E731
    for name, m in res["methods"].items():
        rel = f"{m['step_s_median'] / lora:>8.2f}x" if lora else f"{'':>9}"
        first = f"{m['first_step_s']:>11.2f}" if "first_step_s" in m else ""
        rows.append(
            f"{name:<26}{m['step_s_median']:>17.4f}{m['train_tok_s']:>11.0f}{ratio(m, 'vs_base')}{ratio(m, 'vs_peft_bare')}"
            f"{rel}{first}"
        )
    if res.get("memory"):
        mb = lambda b: f"{b / 2**20:>10.2f}"  # noqa: E731
        rows += [
            "",
            "adapter training memory, MB (measured from the tensors)",
            f"{'method':<8}{'params':>10}{'grads':>10}{'optimizer':>10}{'snapshot':>10}{'total':>10}",
        ]
        for name, m in res["memory"].items():
            rows.append(
                f"{name:<8}{mb(m['params_bytes'])}{mb(m['grads_bytes'])}{mb(m['optimizer_bytes'])}"
                f"{mb(m['snapshot_bytes'])}{mb(m['total_bytes'])}"
            )
    if res.get("profile"):
        rows += ["", "profile per step (torch.profiler; harness/tools/profile_step.py)"]
        rows += [format_profile(name, p) for name, p in res["profile"].items()]
    return "\n".join(rows)


def write_json(res: dict, path: Path) -> None:
    atomic_write_json(Path(path), res)
